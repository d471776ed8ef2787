"""Non-overlapping max-pooling with an elementwise derivative, in forward and reverse mode.

``flax.linen.max_pool`` lowers to ``reduce_window`` whose gradient is XLA's ``select_and_scatter``;
on CPU that backward pass is several times slower than the forward pass (docs/performance.md).
For the non-overlapping windows of a CNN (window = stride, no padding) the derivative is a mask:
each window's output follows the *first* position (in row-major window order) that attains the
maximum, exactly as ``select_and_scatter`` does.  It is a ``jax.custom_jvp`` whose tangent is
``Σ_window mask · ẋ``, linear in ``ẋ``: forward mode (``jvp``, ``jacfwd``, Hessian-vector
products) uses it directly, and reverse mode transposes it into the elementwise gradient
``mask · g`` — a drop-in replacement with identical values and gradients.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _windows(x: jax.Array, size: int) -> jax.Array:
    """``[b, h, w, c]`` → ``[b, h/size, size, w/size, size, c]`` (a free reshape)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // size, size, w // size, size, c)


def _first_max_mask(z: jax.Array, y: jax.Array, size: int) -> jax.Array:
    """Boolean mask of the first position (row-major) of each window of ``z`` that equals its max ``y``."""
    position = (size * jnp.arange(size)[:, None, None] + jnp.arange(size)[None, None, :]).reshape(
        1, 1, size, 1, size, 1
    )  # row-major index of each element inside its window
    hit = z == y[:, :, None, :, None]
    first = jnp.min(jnp.where(hit, position, size * size), axis=(2, 4), keepdims=True)
    return position == first


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _pool(x: jax.Array, size: int) -> jax.Array:
    return jnp.max(_windows(x, size), axis=(2, 4))


@_pool.defjvp
def _pool_jvp(size, primals, tangents):
    (x,), (dx,) = primals, tangents
    y = _pool(x, size)
    mask = _first_max_mask(_windows(x, size), y, size)
    dy = jnp.sum(jnp.where(mask, _windows(dx, size), jnp.zeros((), dx.dtype)), axis=(2, 4))
    return y, dy


def max_pool(x: Float[Array, "b h w c"], size: int = 2) -> Float[Array, "b h/size w/size c"]:
    """``size``×``size`` max-pooling with stride ``size`` (VALID: trailing rows/columns are dropped).

    Equal in value and gradient to ``flax.linen.max_pool(x, (size, size), strides=(size, size))``.
    """
    if x.ndim != 4:
        raise ValueError(f"max_pool needs an NHWC batch; got shape {tuple(x.shape)}.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int.")
    h, w = (x.shape[1] // size) * size, (x.shape[2] // size) * size
    return _pool(x[:, :h, :w], size)
