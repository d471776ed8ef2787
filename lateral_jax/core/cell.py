"""The maths of one lateral layer: drive, lateral input, one loop step.

For input ``x`` (NHWC), afferent kernel ``W_ff`` (HWIO), bias ``b`` and lateral kernel ``W_lat``::

    d    = N_d(W_ff * x + b)                                   afferent drive, computed once
    a(0) = f(N_l(d))                                           the feed-forward (F-CNN) response
    a(t) = (1 - α) a(t-1) + α f(N_l(d + L(a(t-1)))),  t = 1..T
    L(a) = W_lat * a   [+ W_inh * a  in the two-population E/I form]

``N_d``/``N_l`` are optional GroupNorm/LayerNorm layers, ``f`` the activation, ``α`` the leak.
Every function here is pure; :func:`lateral_step` has the ``lax.scan`` body signature.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lateral_jax.core.config import Activation, LateralConfig, Norm
from lateral_jax.core.params import LateralParams, NormParams, lateral_kernel_shape
from lateral_jax.kernels.convolution import conv


class Unrolled(NamedTuple):
    """What a layer's loops return.

    Attributes:
      final: ``a(T)``, ``[B, H, W, C]`` (the fixed point in ``"implicit"`` mode).
      states: ``a(0..T)`` stacked time-first, ``[T+1, B, H, W, C]``, or ``None`` when not
        requested (and always ``None`` in ``"implicit"`` mode).
      residual: the relative change of the last loop ``‖a(T) - a(T-1)‖ / ‖a(T)‖`` (``0`` for T = 0);
        in ``"implicit"`` mode ``‖F(a*) - a*‖ / ‖a*‖`` of the returned fixed point.
    """

    final: Float[Array, "b h w c"]
    states: Float[Array, "t b h w c"] | None
    residual: Float[Array, ""]


_ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "identity": lambda z: z,
}


def group_norm(x: Float[Array, "b h w c"], params: NormParams, num_groups: int, eps: float = 1e-5) -> jax.Array:
    """GroupNorm over (H, W, channels of a group); ``num_groups = 1`` is LayerNorm over (H, W, C).

    ``y = (x - mean_g) / sqrt(var_g + eps) * scale + bias``, statistics in float32 (float64 for
    float64 inputs), the variance in two passes (``mean_g((x - mean_g)^2)``).  Each statistic is
    summed over (H, W) first, with the channels as the minor (vectorised) axis, then over the
    channels of a group: XLA:CPU reduces an NHWC map over a middle axis several times slower
    (docs/performance.md, "GroupNorm"); the result differs from a one-step mean by float
    summation order only.
    """
    b, h, w, c = x.shape
    size = c // num_groups
    count = h * w * size

    def group_mean(v: jax.Array) -> jax.Array:  # [b, h, w, c] -> [b, 1, 1, c], each channel its group's mean
        sums = v.sum(axis=(1, 2)).reshape(b, num_groups, size).sum(axis=-1) / count
        return jnp.repeat(sums, size, axis=1).reshape(b, 1, 1, c)

    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    centred = x32 - group_mean(x32)
    y = centred * jax.lax.rsqrt(group_mean(jnp.square(centred)) + eps)
    return (y * params.scale.reshape(1, 1, 1, -1) + params.bias.reshape(1, 1, 1, -1)).astype(x.dtype)


def group_norm_direct(x: Float[Array, "b h w c"], params: NormParams, num_groups: int, eps: float = 1e-5) -> jax.Array:
    """:func:`group_norm` with each statistic reduced in one step over (H, W, channels of a group)
    of a ``[B, H, W, G, C/G]`` view: the reference the tests and ``experiments.bench_models
    --ab-norm`` compare :func:`group_norm` with (equal up to float summation order)."""
    b, h, w, c = x.shape
    xg = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(b, h, w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * params.scale.reshape(1, 1, 1, -1) + params.bias.reshape(1, 1, 1, -1)).astype(x.dtype)


def normalise(x: jax.Array, params: NormParams | None, kind: Norm, num_groups: int) -> jax.Array:
    """``x`` unchanged (``"none"``), GroupNorm (``"group"``) or LayerNorm (``"layer"``)."""
    if kind == "none":
        return x
    if params is None:
        raise ValueError(f"norm={kind!r} needs NormParams, got None; initialise the params with the same config.")
    return group_norm(x, params, num_groups if kind == "group" else 1)


def activate(z: jax.Array, kind: Activation) -> jax.Array:
    """The activation ``f`` named ``kind``."""
    return _ACTIVATION_FNS[kind](z)


def check_input(x: jax.Array, in_channels: int) -> None:
    """Raises a ``ValueError`` unless ``x`` is an NHWC batch with ``in_channels`` channels."""
    if x.ndim != 4:
        raise ValueError(
            f"input must be a rank-4 NHWC batch [batch, height, width, channels]; got shape {tuple(x.shape)} "
            f"(rank {x.ndim}). Add a batch axis with x[None] for a single image."
        )
    if x.shape[-1] != in_channels:
        hint = (
            " It looks like NCHW: transpose with x.transpose(0, 2, 3, 1)."
            if x.shape[1] == in_channels
            else " Initialise the params with in_channels equal to the input's last axis."
        )
        raise ValueError(
            f"input has {x.shape[-1]} channels on its last (NHWC) axis but W_ff expects {in_channels}; "
            f"input shape {tuple(x.shape)}.{hint}"
        )


def check_lateral_params(params: LateralParams, drive: jax.Array, config: LateralConfig) -> None:
    """Raises a ``ValueError`` when the drive, the lateral params and the config disagree."""
    if drive.ndim != 4:
        raise ValueError(f"drive must be NHWC [batch, height, width, channels]; got shape {tuple(drive.shape)}.")
    channels = drive.shape[-1]
    expected = lateral_kernel_shape(config, channels)
    if tuple(params.w_lat.shape) != expected:
        raise ValueError(
            f"W_lat has shape {tuple(params.w_lat.shape)} but a {config.mixing!r} lateral kernel of size "
            f"{config.lateral_size} on {channels} channels needs {expected}; the params and config disagree."
        )
    if (params.w_inh is None) != (config.inhibitory_size is None):
        raise ValueError(
            "params.w_inh must be given exactly when config.inhibitory_size is set (the two-population form); "
            f"got w_inh={'None' if params.w_inh is None else 'an array'}, inhibitory_size={config.inhibitory_size}."
        )
    config.check_channels(channels)


def afferent_drive(params: LateralParams, x: Float[Array, "b h w ci"], config: LateralConfig) -> jax.Array:
    """``d = N_d(W_ff * x + b)``."""
    if params.w_ff is None:
        raise ValueError("params.w_ff is None; use recur(params, drive, ...) when the drive is precomputed.")
    check_input(x, params.w_ff.shape[2])
    d = conv(x, params.w_ff, algorithm=config.conv_algorithm) + params.b_ff.astype(x.dtype).reshape(1, 1, 1, -1)
    return normalise(d, params.drive_norm, config.drive_norm, config.num_groups)


def lateral_input(
    params: LateralParams, a: jax.Array, config: LateralConfig, w_lat: jax.Array | None = None
) -> jax.Array:
    """``L(a) = W_lat * a`` (+ ``W_inh * a`` in the two-population form)."""
    w_lat = params.w_lat if w_lat is None else w_lat
    out = conv(a, w_lat, depthwise=config.mixing == "depthwise", algorithm=config.conv_algorithm)
    if params.w_inh is not None:
        out = out + conv(a, params.w_inh, algorithm=config.conv_algorithm)
    return out


def response(params: LateralParams, pre: jax.Array, config: LateralConfig) -> jax.Array:
    """``f(N_l(pre))``: the response to a pre-activation (the loop norm, then the activation)."""
    return activate(normalise(pre, params.loop_norm, config.loop_norm, config.num_groups), config.activation)


def initial_state(params: LateralParams, drive: jax.Array, config: LateralConfig) -> jax.Array:
    """``a(0) = f(N_l(d))``: the feed-forward response."""
    return response(params, drive, config)


def fixed_point_map(params: LateralParams, drive: jax.Array, a: jax.Array, config: LateralConfig) -> jax.Array:
    """``F(a) = f(N_l(d + L(a)))``: one loop without the leak (the leak does not move a fixed point)."""
    return response(params, drive + lateral_input(params, a, config), config)


def lateral_step(
    state: jax.Array,
    w_lat: jax.Array | None,
    *,
    params: LateralParams,
    drive: jax.Array,
    config: LateralConfig,
) -> tuple[jax.Array, jax.Array]:
    """One lateral loop, with the :func:`jax.lax.scan` body signature ``(carry, x) -> (carry, y)``.

    ``a(t) = (1-α) a(t-1) + α f(N_l(d + L(a(t-1))))``.  ``w_lat`` is the scanned input: ``None``
    for the weight-shared layer (``params.w_lat`` is used) or this step's own kernel in the
    unshared control.  Returns the new state as both carry and output.
    """
    new = response(params, drive + lateral_input(params, state, config, w_lat), config)
    if config.leak != 1.0:
        new = (1.0 - config.leak) * state + config.leak * new
    return new, new


def relative_change(new: jax.Array, old: jax.Array) -> jax.Array:
    """``‖new - old‖ / max(‖new‖, 1e-12)`` (a scalar) in float32, or float64 for float64 states (so
    an implicit solve under ``jax.enable_x64`` can stop below float32's resolution)."""
    dtype = jnp.promote_types(new.dtype, jnp.float32)
    new32, old32 = new.astype(dtype), old.astype(dtype)
    return jnp.linalg.norm((new32 - old32).ravel()) / jnp.maximum(jnp.linalg.norm(new32.ravel()), 1e-12)
