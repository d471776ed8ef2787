"""Parameters of one lateral layer as pytrees, and their initialisation.

``W_ff`` is He-normal, ``b_ff`` zero and the lateral kernels small He-normal
(``lateral_init_scale`` × the He std), so that a freshly initialised layer is close to its
feed-forward version.  Kernels are HWIO; ``W_lat[:, :, j, :]`` are the outgoing connections of
presynaptic channel ``j``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lateral_jax.core.config import LateralConfig, check_positive_int


class NormParams(NamedTuple):
    """Per-channel affine parameters of a GroupNorm/LayerNorm."""

    scale: Float[Array, " c"]
    bias: Float[Array, " c"]


class LateralParams(NamedTuple):
    """Parameters of one lateral layer (HWIO kernels).

    ``w_ff``/``b_ff`` may be ``None`` when the drive is supplied directly
    (:func:`lateral_jax.core.recurrence.recur`).  ``w_lat`` is ``[l, l, C, C]`` (full mixing) or
    ``[l, l, 1, C]`` (depthwise); in :func:`lateral_jax.core.recurrence.unroll_unshared` it carries a
    leading time axis ``[T, ...]``.
    """

    w_ff: Float[Array, "k k ci co"] | None
    b_ff: Float[Array, " co"] | None
    w_lat: Float[Array, ...]
    w_inh: Float[Array, "li li co co"] | None = None
    drive_norm: NormParams | None = None
    loop_norm: NormParams | None = None


def he_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int, scale: float = 1.0) -> jax.Array:
    """``scale · sqrt(2 / fan_in) · N(0, 1)`` in float32."""
    return scale * math.sqrt(2.0 / fan_in) * jax.random.normal(key, shape, jnp.float32)


def lateral_kernel_shape(config: LateralConfig, channels: int, size: int | None = None) -> tuple[int, int, int, int]:
    """``[l, l, C, C]`` for full mixing, ``[l, l, 1, C]`` for depthwise (``l = size or lateral_size``)."""
    l = config.lateral_size if size is None else size
    return (l, l, 1, channels) if config.mixing == "depthwise" else (l, l, channels, channels)


def init_lateral_kernel(key: jax.Array, config: LateralConfig, channels: int, size: int | None = None) -> jax.Array:
    """A small He-normal lateral kernel, ``lateral_init_scale`` × the He std."""
    shape = lateral_kernel_shape(config, channels, size)
    return he_normal(key, shape, fan_in=shape[0] * shape[1] * shape[2], scale=config.lateral_init_scale)


def init_afferent_kernel(key: jax.Array, config: LateralConfig, in_channels: int, out_channels: int) -> jax.Array:
    """He-normal ``W_ff`` of shape ``[k, k, C_in, C_out]``."""
    k = config.kernel_size
    return he_normal(key, (k, k, in_channels, out_channels), fan_in=k * k * in_channels)


def init_norm(channels: int) -> NormParams:
    """Unit scale, zero bias."""
    return NormParams(jnp.ones((channels,), jnp.float32), jnp.zeros((channels,), jnp.float32))


def init_params(
    key: jax.Array,
    *,
    in_channels: int,
    out_channels: int,
    config: LateralConfig = LateralConfig(),
) -> LateralParams:
    """Initialises one lateral layer: He-normal ``W_ff``, zero bias, small ``W_lat`` (and ``W_inh``)."""
    check_positive_int("in_channels", in_channels)
    check_positive_int("out_channels", out_channels)
    config.check_channels(out_channels)
    k_ff, k_lat, k_inh = jax.random.split(key, 3)
    w_inh = None
    if config.inhibitory_size is not None:
        w_inh = init_lateral_kernel(k_inh, config, out_channels, config.inhibitory_size)
    return LateralParams(
        w_ff=init_afferent_kernel(k_ff, config, in_channels, out_channels),
        b_ff=jnp.zeros((out_channels,), jnp.float32),
        w_lat=init_lateral_kernel(k_lat, config, out_channels),
        w_inh=w_inh,
        drive_norm=None if config.drive_norm == "none" else init_norm(out_channels),
        loop_norm=None if config.loop_norm == "none" else init_norm(out_channels),
    )
