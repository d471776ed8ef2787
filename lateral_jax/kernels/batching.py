"""Cutting a batch into equal chunks and putting it back together (used by the Winograd
convolution's cache-sized chunks and by ``"remat"`` mode's batch chunks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most`` (at least 1)."""
    size = max(1, min(n, at_most))
    while n % size:
        size -= 1
    return size


def split_batch(x: jax.Array, num_chunks: int, axis: int = 0, *, strided: bool | None = None) -> jax.Array:
    """``x`` with its batch axis cut into ``num_chunks`` equal chunks, stacked on a new leading axis.

    Contiguous (chunk ``k`` holds examples ``k·s … k·s + s - 1``) or strided (example ``i`` goes to
    chunk ``i mod num_chunks``).  A batch sharded over devices in contiguous blocks keeps its
    sharding inside every *strided* chunk, so a ``lax.scan`` over the chunks needs no cross-device
    traffic, while a contiguous split puts the scanned axis itself across devices.  On one device
    the contiguous split is a free reshape and the strided one costs a transpose.
    ``strided=None`` picks strided exactly when the process has more than one device.
    :func:`merge_batch` is the inverse.
    """
    if strided is None:
        strided = jax.device_count() > 1
    batch = x.shape[axis]
    if not strided:
        return jnp.moveaxis(x.reshape(*x.shape[:axis], num_chunks, batch // num_chunks, *x.shape[axis + 1 :]), axis, 0)
    split = x.reshape(*x.shape[:axis], batch // num_chunks, num_chunks, *x.shape[axis + 1 :])
    return jnp.moveaxis(split, axis + 1, 0)


def merge_batch(y: jax.Array, axis: int = 0, *, strided: bool | None = None) -> jax.Array:
    """The inverse of :func:`split_batch` (with the same ``strided``): ``[n, ..., b/n, ...]`` → ``[..., b, ...]``."""
    if strided is None:
        strided = jax.device_count() > 1
    y = jnp.moveaxis(y, 0, axis + 1 if strided else axis)
    return y.reshape(*y.shape[:axis], y.shape[axis] * y.shape[axis + 1], *y.shape[axis + 2 :])
