"""Lateral recurrence inside a feature map: the pure core of lateral_jax.

For one convolutional layer with input ``x`` (NHWC), afferent kernel ``W_ff`` (HWIO), bias ``b``
and a lateral kernel ``W_lat`` (stride 1, SAME padding, from the layer's output channels to its
own output channels) the layer computes::

    d    = N_d(W_ff * x + b)                                   afferent drive, computed once
    a(0) = f(N_l(d))                                           the feed-forward (F-CNN) response
    a(t) = (1 - α) a(t-1) + α f(N_l(d + L(a(t-1)))),  t = 1..T
    L(a) = W_lat * a   [+ W_inh * a  in the two-population E/I form]

with the *same* ``W_lat`` at every loop (weight sharing is what makes a recurrent convolution a
set of lateral connections).  ``N_d`` and ``N_l`` are optional GroupNorm/LayerNorm layers, ``f``
the activation and ``α`` the leak.  ``T = 0`` is the plain feed-forward layer, and with
``W_lat = 0`` every loop equals it.

Everything here is a pure function over ``NamedTuple`` pytrees; no Flax.  ``unroll`` scans the
step with :func:`jax.lax.scan` and offers four ways to differentiate through the loop:

* ``"full"``: backpropagation through time, autodiff through the scan.
* ``"remat"``: the same gradient with √T checkpointing: the loop is cut into segments of
  ``round(√T)`` loops under ``jax.checkpoint``; the backward pass keeps the segment inputs and
  recomputes one segment at a time, so O(√T) states are stored instead of O(T) (per-step
  checkpointing would save nothing here: a step's only residual *is* its input state).  The
  batch is also cut into about √T chunks whose loops are recomputed one chunk at a time, so the
  stored states come to about two full-batch states at any T (one more forward pass).  At T = 1
  it is plain BPTT (one checkpointed loop would only add buffers).
* ``"truncated"``: gradients flow through the last ``truncate_steps`` loops only; ``a(T-K)`` is
  treated as a constant.
* ``"implicit"``: iterate to a fixed point ``a* = f(N_l(d + L(a*)))`` and differentiate it with the
  implicit-function theorem (``jax.custom_vjp``); memory is O(1) in the number of iterations.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lateral_jax import winograd

GradMode = Literal["full", "remat", "truncated", "implicit"]
Norm = Literal["none", "group", "layer"]
Activation = Literal["relu", "gelu", "tanh", "softplus", "identity"]
Mixing = Literal["full", "depthwise"]
ConvAlgorithm = Literal["auto", "xla", "winograd"]
LoopKernel = Literal["xla", "pallas"]

GRAD_MODES = ("full", "remat", "truncated", "implicit")
NORMS = ("none", "group", "layer")
ACTIVATIONS = ("relu", "gelu", "tanh", "softplus", "identity")
MIXINGS = ("full", "depthwise")
CONV_ALGORITHMS = ("auto", "xla", "winograd")
LOOP_KERNELS = ("xla", "pallas")

_ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "tanh": jnp.tanh,
    "softplus": jax.nn.softplus,
    "identity": lambda z: z,
}


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _check_odd_size(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % 2 == 0:
        raise ValueError(
            f"{name}={value!r} must be a positive odd integer (1, 3, 5, 7, ...) so that SAME padding "
            "keeps the kernel centred on each unit."
        )


def check_num_steps(num_steps: object, name: str = "num_steps") -> int:
    """Returns ``num_steps`` as an int, or raises a ``ValueError`` saying what is wrong."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise ValueError(
            f"{name}={num_steps!r} must be a non-negative Python int (the number of lateral loops T; "
            "0 is the feed-forward network)."
        )
    if num_steps < 0:
        raise ValueError(f"{name}={num_steps} is negative; use 0 for the feed-forward network or T > 0 loops.")
    return num_steps


@dataclasses.dataclass(frozen=True)
class LateralConfig:
    """Static structure of one lateral layer (hashable, safe as a ``jit`` static argument).

    Attributes:
      kernel_size: afferent kernel size k (odd).
      lateral_size: lateral kernel size l (odd); the excitatory kernel in the two-population form.
      inhibitory_size: if set, the two-population E/I form: a second lateral kernel ``W_inh`` of
        this (odd, typically wider) size, pushed to be inhibitory by :mod:`lateral_jax.ei`.
      mixing: ``"full"`` (every channel to every channel) or ``"depthwise"`` (channel to itself).
      leak: α in ``a(t) = (1-α) a(t-1) + α f(...)``; 1 is no leak.
      drive_norm: normalisation ``N_d`` of the afferent drive.
      loop_norm: normalisation ``N_l`` applied inside the loop (also at t = 0).
      num_groups: groups for ``"group"`` norms (must divide the channel count).
      activation: the non-linearity f.
      lateral_init_scale: std of ``W_lat`` at init relative to He scaling; small so the model
        starts near the F-CNN (0 gives an all-zero lateral kernel).
      conv_algorithm: how the 3×3 convolutions are computed. ``"xla"``: ``lax.conv_general_dilated``
        (the reference). ``"winograd"``: :func:`lateral_jax.winograd.conv3x3`, F(2×2, 3×3) with
        2.25× fewer multiplications (F(4×4, 3×3), 4× fewer, on maps ≥ 32×32 or with ≥ 256
        channels; see :func:`winograd_tile`) and a hand-written VJP (no forward-mode AD). ``"auto"``
        (default): Winograd for large (batch·H·W·C_in·C_out ≥ 2^27, C_in ≥ 16) full-mixing 3×3
        convolutions in float32/64 on CPU, where it is 2× faster; XLA everywhere else.
      loop_kernel: ``"xla"`` (default, the reference): the loops are a ``lax.scan`` of XLA ops.
        ``"pallas"``: all T loops of ``grad_mode="full"`` in one fused Pallas kernel
        (:mod:`lateral_jax.fused`; Triton on GPU, Pallas's interpreter elsewhere), with a
        ``custom_vjp`` backward over the saved states.  Opt-in: its GPU speed is not measured yet.
    """

    kernel_size: int = 3
    lateral_size: int = 3
    inhibitory_size: int | None = None
    mixing: Mixing = "full"
    leak: float = 1.0
    drive_norm: Norm = "none"
    loop_norm: Norm = "none"
    num_groups: int = 8
    activation: Activation = "relu"
    lateral_init_scale: float = 0.1
    conv_algorithm: ConvAlgorithm = "auto"
    loop_kernel: LoopKernel = "xla"

    def __post_init__(self) -> None:
        _check_odd_size("kernel_size", self.kernel_size)
        _check_odd_size("lateral_size", self.lateral_size)
        if self.inhibitory_size is not None:
            _check_odd_size("inhibitory_size", self.inhibitory_size)
        _check_choice("mixing", self.mixing, MIXINGS)
        _check_choice("drive_norm", self.drive_norm, NORMS)
        _check_choice("loop_norm", self.loop_norm, NORMS)
        _check_choice("activation", self.activation, ACTIVATIONS)
        _check_choice("conv_algorithm", self.conv_algorithm, CONV_ALGORITHMS)
        _check_choice("loop_kernel", self.loop_kernel, LOOP_KERNELS)
        if not 0.0 < self.leak <= 1.0:
            raise ValueError(f"leak={self.leak!r} must lie in (0, 1]; 1 means no leak.")
        if isinstance(self.num_groups, bool) or not isinstance(self.num_groups, int) or self.num_groups < 1:
            raise ValueError(f"num_groups={self.num_groups!r} must be a positive int.")
        if self.lateral_init_scale < 0:
            raise ValueError(f"lateral_init_scale={self.lateral_init_scale!r} must be >= 0.")
        if self.inhibitory_size is not None and self.mixing != "full":
            raise ValueError("inhibitory_size (two-population E/I form) needs mixing='full'.")

    @classmethod
    def paper(cls, **overrides) -> LateralConfig:
        """The raw layer of the paper's equations: no normalisation anywhere, ReLU, no leak."""
        return cls(**{"drive_norm": "none", "loop_norm": "none", **overrides})

    @classmethod
    def stable(cls, **overrides) -> LateralConfig:
        """Our stable default for training: GroupNorm on the drive *and* inside the loop.

        A 3-layer LC-CNN at T=4 without a norm inside the loop diverged in 1 of 2 seeds on CIFAR-10
        (DESIGN §1.3); renormalising every loop bounds the recurrent gain.
        """
        return cls(**{"drive_norm": "group", "loop_norm": "group", **overrides})


class NormParams(NamedTuple):
    """Per-channel affine parameters of a GroupNorm/LayerNorm."""

    scale: Float[Array, " c"]
    bias: Float[Array, " c"]


class LateralParams(NamedTuple):
    """Parameters of one lateral layer (HWIO kernels).

    ``w_ff``/``b_ff`` may be ``None`` when the drive is supplied directly (:func:`recur`).
    ``w_lat`` is ``[l, l, C, C]`` (full mixing) or ``[l, l, 1, C]`` (depthwise); in
    :func:`unroll_unshared` it carries a leading time axis ``[T, ...]``.
    """

    w_ff: Float[Array, "k k ci co"] | None
    b_ff: Float[Array, " co"] | None
    w_lat: Float[Array, ...]
    w_inh: Float[Array, "li li co co"] | None = None
    drive_norm: NormParams | None = None
    loop_norm: NormParams | None = None


class Unrolled(NamedTuple):
    """What :func:`unroll` returns.

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


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def he_normal(key: jax.Array, shape: tuple[int, ...], fan_in: int, scale: float = 1.0) -> jax.Array:
    return scale * math.sqrt(2.0 / fan_in) * jax.random.normal(key, shape, jnp.float32)


def lateral_kernel_shape(config: LateralConfig, channels: int) -> tuple[int, int, int, int]:
    l = config.lateral_size
    return (l, l, 1, channels) if config.mixing == "depthwise" else (l, l, channels, channels)


def init_lateral_kernel(key: jax.Array, config: LateralConfig, channels: int, size: int | None = None) -> jax.Array:
    """A small He-normal lateral kernel, ``lateral_init_scale`` × the He std."""
    size = config.lateral_size if size is None else size
    shape = (size, size, 1, channels) if config.mixing == "depthwise" else (size, size, channels, channels)
    return he_normal(key, shape, fan_in=size * size * shape[2], scale=config.lateral_init_scale)


def init_norm(channels: int) -> NormParams:
    return NormParams(jnp.ones((channels,), jnp.float32), jnp.zeros((channels,), jnp.float32))


def init_params(
    key: jax.Array,
    *,
    in_channels: int,
    out_channels: int,
    config: LateralConfig = LateralConfig(),
) -> LateralParams:
    """Initialises one lateral layer: He-normal ``W_ff``, zero bias, small ``W_lat``."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int.")
    _check_norm_groups(config, out_channels)
    k_ff, k_lat, k_inh = jax.random.split(key, 3)
    k = config.kernel_size
    w_inh = None
    if config.inhibitory_size is not None:
        w_inh = init_lateral_kernel(k_inh, config, out_channels, config.inhibitory_size)
    return LateralParams(
        w_ff=he_normal(k_ff, (k, k, in_channels, out_channels), fan_in=k * k * in_channels),
        b_ff=jnp.zeros((out_channels,), jnp.float32),
        w_lat=init_lateral_kernel(k_lat, config, out_channels),
        w_inh=w_inh,
        drive_norm=None if config.drive_norm == "none" else init_norm(out_channels),
        loop_norm=None if config.loop_norm == "none" else init_norm(out_channels),
    )


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


# "auto" picks Winograd on CPU only for convolutions big enough to repay its extra compile time
# (a scan per convolution and hand-written VJP): at least this many input channels (below, its
# matmuls are too thin) and batch·H·W·C_in·C_out ≥ WINOGRAD_MIN_SIZE (the reference workload's
# convolutions are 2^29; the 16/32/32 contour model's are 2^25 and stay on XLA).
WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_SIZE = 1 << 27
# F(2×2, 3×3) (float32 error ~1e-6 of the output scale) by default; F(4×4, 3×3) (1.78× fewer
# multiplications, ~1e-5 error) on maps of at least WINOGRAD_TILE4_MIN_SIZE in both dimensions,
# where the train step was ~10% faster, and on any map (a multiple of 4) when both channel
# counts are at least WINOGRAD_TILE4_MIN_CHANNELS: there the matmuls outweigh the larger
# transforms (the workload's 8×8×256 layer, 4 loops with gradients: 312 instead of 374 ms).  On
# 16×16×128 maps the two tiles tied, so thinner layers keep F(2×2).
WINOGRAD_TILE4_MIN_SIZE = 32
WINOGRAD_TILE4_MIN_CHANNELS = 256


def winograd_tile(height: int, width: int, in_channels: int = 0, out_channels: int = 0) -> int:
    """The F(m×m, 3×3) output tile ``m`` that :func:`conv` uses for a ``height × width`` map
    from ``in_channels`` to ``out_channels`` channels (see :data:`WINOGRAD_TILE4_MIN_SIZE`)."""
    if height % 4 or width % 4:
        return 2  # no padded F(4×4) tiles
    wide = min(in_channels, out_channels) >= WINOGRAD_TILE4_MIN_CHANNELS
    return 4 if wide or min(height, width) >= WINOGRAD_TILE4_MIN_SIZE else 2


def use_winograd(x: jax.Array, w: jax.Array, algorithm: ConvAlgorithm, *, depthwise: bool = False) -> bool:
    """Whether :func:`conv` takes the Winograd path for this input, kernel and ``conv_algorithm``."""
    eligible = w.shape[:2] == (3, 3) and not depthwise
    if algorithm == "winograd":
        if not eligible:
            raise ValueError(
                f"conv_algorithm='winograd' needs full-mixing 3x3 kernels; got a {w.shape[0]}x{w.shape[1]} "
                f"{'depthwise ' if depthwise else ''}kernel. Use conv_algorithm='auto' or 'xla'."
            )
        return True
    return (
        algorithm == "auto"
        and eligible
        and jax.default_backend() == "cpu"
        and x.dtype in (jnp.float32, jnp.float64)
        and x.shape[-1] >= WINOGRAD_MIN_CHANNELS
        and math.prod(x.shape) * w.shape[-1] >= WINOGRAD_MIN_SIZE
    )


def conv(
    x: Float[Array, "b h w ci"],
    w: Float[Array, "k k cin co"],
    *,
    depthwise: bool = False,
    algorithm: ConvAlgorithm = "xla",
) -> jax.Array:
    """Stride-1 SAME convolution, NHWC × HWIO → NHWC (depthwise when ``w`` is ``[k, k, 1, C]``).

    ``algorithm`` as in :attr:`LateralConfig.conv_algorithm`; ``"xla"`` is the reference.
    """
    if use_winograd(x, w, algorithm, depthwise=depthwise):
        return winograd.conv3x3(x, w, tile=winograd_tile(*x.shape[1:], w.shape[-1]))
    return jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1] if depthwise else 1,
    )


def _check_norm_groups(config: LateralConfig, channels: int) -> None:
    if "group" in (config.drive_norm, config.loop_norm) and channels % config.num_groups:
        raise ValueError(
            f"num_groups={config.num_groups} does not divide the {channels} channels of the layer; "
            "pick a divisor of the channel count or use norm='layer'."
        )


def group_norm(x: Float[Array, "b h w c"], params: NormParams, num_groups: int, eps: float = 1e-5) -> jax.Array:
    """GroupNorm over (H, W, channels of a group); ``num_groups = 1`` is LayerNorm over (H, W, C).

    ``y = (x - mean_g) / sqrt(var_g + eps) * scale + bias``, statistics in float32.
    """
    b, h, w, c = x.shape
    xg = x.astype(jnp.float32).reshape(b, h, w, num_groups, c // num_groups)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + eps)).reshape(b, h, w, c)
    return (y * params.scale.reshape(1, 1, 1, -1) + params.bias.reshape(1, 1, 1, -1)).astype(x.dtype)


def normalise(x: jax.Array, params: NormParams | None, kind: Norm, num_groups: int) -> jax.Array:
    if kind == "none":
        return x
    if params is None:
        raise ValueError(f"norm={kind!r} needs NormParams, got None; initialise the params with the same config.")
    return group_norm(x, params, num_groups if kind == "group" else 1)


def activate(z: jax.Array, kind: Activation) -> jax.Array:
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


def initial_state(params: LateralParams, drive: jax.Array, config: LateralConfig) -> jax.Array:
    """``a(0) = f(N_l(d))``: the feed-forward response."""
    return activate(normalise(drive, params.loop_norm, config.loop_norm, config.num_groups), config.activation)


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
    pre = drive + lateral_input(params, state, config, w_lat)
    new = activate(normalise(pre, params.loop_norm, config.loop_norm, config.num_groups), config.activation)
    if config.leak != 1.0:
        new = (1.0 - config.leak) * state + config.leak * new
    return new, new


def relative_change(new: jax.Array, old: jax.Array) -> jax.Array:
    """``‖new - old‖ / max(‖new‖, 1e-12)`` in float32 (a scalar)."""
    new32, old32 = new.astype(jnp.float32), old.astype(jnp.float32)
    return jnp.linalg.norm((new32 - old32).ravel()) / jnp.maximum(jnp.linalg.norm(new32.ravel()), 1e-12)


# --------------------------------------------------------------------------------------------
# Unrolling
# --------------------------------------------------------------------------------------------


def default_scan_unroll(num_steps: int, *, xla_conv_in_loop: bool = True) -> int | bool:
    """The unroll factor ``"auto"`` picks for :func:`jax.lax.scan`.

    On CPU the gradient of an XLA convolution inside a rolled ``lax.scan`` takes a pathological
    XLA path (jax-ml/jax#12868, >60× slower), so such loops are fully unrolled there.  The
    Winograd path (``conv_algorithm``) has no convolution op, so its loops follow the GPU/TPU
    rule: fully unrolled for short loops (faster in our H200 probe), rolled for T > 16 to bound
    compile time and memory (on CPU at T = 64 an unrolled loop's buffer plan was 2.4× larger).
    """
    if (jax.default_backend() == "cpu" and xla_conv_in_loop) or num_steps <= 16:
        return True
    return 1


def _scan(body, init, xs, length: int, scan_unroll: int | bool | Literal["auto"]):
    """``lax.scan``, except that a full unroll is a Python loop (the same values, stacked).

    ``lax.scan(..., unroll=True)`` still emits a one-trip ``while`` loop when ``length`` is 1 (and
    wraps every unrolled body in one), and XLA:CPU takes jax#12868's slow path for a convolution's
    gradient inside *any* ``while`` loop: an LC-CNN at T = 1 trained ~20× slower than at T = 2.
    """
    unroll_factor = default_scan_unroll(length) if scan_unroll == "auto" else scan_unroll
    if unroll_factor is True or (not isinstance(unroll_factor, bool) and unroll_factor >= length):
        carry, ys = init, []
        for i in range(length):
            carry, y = body(carry, None if xs is None else jax.tree_util.tree_map(lambda a, i=i: a[i], xs))
            ys.append(y)
        return carry, jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *ys)
    return jax.lax.scan(body, init, xs, length=length, unroll=unroll_factor)


def _scan_steps(step_fn, a0: jax.Array, xs, length: int, *, return_states: bool, scan_unroll):
    """Scans ``length`` steps from ``a0``; returns ``((a(T), a(T-1)), a(1..T) or None)``."""

    def body(carry, x):
        prev, _ = carry
        new, _ = step_fn(prev, x)
        return (new, prev), (new if return_states else None)

    return _scan(body, (a0, a0), xs, length, scan_unroll)


def remat_segment_length(num_steps: int) -> int:
    """Loops per checkpointed segment in ``"remat"`` mode: ``round(√T)`` (at least 1)."""
    return max(1, round(math.sqrt(num_steps)))


def _scan_steps_remat(step_fn, a0: jax.Array, num_steps: int, *, return_states: bool, scan_unroll, outer_unroll):
    """√T checkpointing: an outer scan over segments of S = round(√T) loops, each segment wrapped
    in ``jax.checkpoint``.  The backward pass stores the T/S segment inputs and recomputes one
    segment (S states) at a time: O(√T) states in memory for about one extra forward pass."""
    seg = remat_segment_length(num_steps)
    n_seg, rem = divmod(num_steps, seg)

    def segment(length):
        return jax.checkpoint(
            lambda a: _scan_steps(step_fn, a, None, length, return_states=return_states, scan_unroll=scan_unroll)
        )

    run_seg = segment(seg)

    def outer(carry, _):
        return run_seg(carry[0])

    (final, before), ys = _scan(outer, (a0, a0), None, n_seg, outer_unroll)
    if return_states:
        ys = ys.reshape((n_seg * seg, *ys.shape[2:]))
    if rem:
        (final, before), ys_rem = segment(rem)(final)
        if return_states:
            ys = jnp.concatenate([ys, ys_rem], axis=0)
    return (final, before), ys


def default_remat_batch_chunks(batch: int, num_steps: int) -> int:
    """Batch chunks ``"remat"`` mode uses by default: the largest divisor of ``batch`` ≤ round(√T).

    Chunking the batch divides the per-loop state memory by the chunk count; with √T chunks the
    √T-checkpointed loop keeps about 2 full-batch states in memory at any T.
    """
    return winograd.largest_divisor(batch, remat_segment_length(num_steps))


def _map_batch_chunks(fn, x: jax.Array, num_chunks: int, *, rolled: bool):
    """``fn`` applied to ``num_chunks`` equal slices of ``x``'s batch axis; outputs reassembled.

    With more than one device the slices are strided (:func:`lateral_jax.winograd.split_batch`),
    so a batch sharded over devices stays sharded the same way inside every slice.  ``fn`` returns
    ``(final, states | None, before)``; ``states`` has its batch on axis 1.
    """
    _, (final, states, before) = _scan(
        lambda carry, d: (carry, fn(d)), None, winograd.split_batch(x, num_chunks), num_chunks, 1 if rolled else True
    )
    merged_states = None if states is None else winograd.merge_batch(states, axis=1)
    return winograd.merge_batch(final), merged_states, winograd.merge_batch(before)


def _check_remat_batch_chunks(value: object, batch: int, num_steps: int, slow_rolled_conv: bool) -> int:
    """Resolves ``remat_batch_chunks``: ``"auto"`` or a positive int that divides the batch."""
    if value == "auto":
        # With XLA convolutions on CPU the chunk loop must be unrolled (jax#12868), and unrolled
        # chunks are not recomputed one at a time; chunking would only add a forward pass there.
        return 1 if slow_rolled_conv else default_remat_batch_chunks(batch, num_steps)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or batch % value:
        raise ValueError(
            f"remat_batch_chunks={value!r} must be 'auto' or a positive int that divides the batch size {batch}."
        )
    return value


def _run_loops(
    step_fn,
    a0: jax.Array,
    xs: jax.Array | None,
    num_steps: int,
    *,
    return_states: bool,
    scan_unroll,
    remat: bool = False,
    remat_outer_unroll: int | bool = 1,
) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    """Runs ``num_steps`` loops from ``a0``; returns (final, states a(0..T) or None, a(T-1))."""
    if num_steps == 0:
        return a0, (a0[None] if return_states else None), a0
    if remat and num_steps > 1:  # one loop is one segment: checkpointing it only adds buffers
        (final, before), ys = _scan_steps_remat(
            step_fn,
            a0,
            num_steps,
            return_states=return_states,
            scan_unroll=scan_unroll,
            outer_unroll=remat_outer_unroll,
        )
    else:
        (final, before), ys = _scan_steps(
            step_fn, a0, xs, num_steps, return_states=return_states, scan_unroll=scan_unroll
        )
    states = jnp.concatenate([a0[None], ys], axis=0) if return_states else None
    return final, states, before


def recur(
    params: LateralParams,
    drive: Float[Array, "b h w c"],
    *,
    num_steps: int,
    config: LateralConfig = LateralConfig(),
    grad_mode: GradMode = "full",
    truncate_steps: int | None = None,
    implicit_tol: float = 1e-5,
    implicit_max_steps: int = 100,
    return_states: bool = True,
    scan_unroll: int | bool | Literal["auto"] = "auto",
    remat_batch_chunks: int | Literal["auto"] = "auto",
) -> Unrolled:
    """Runs the lateral loops on a precomputed afferent drive ``d`` (see :func:`unroll`)."""
    num_steps = check_num_steps(num_steps)
    _check_choice("grad_mode", grad_mode, GRAD_MODES)
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
    _check_norm_groups(config, channels)
    if config.loop_kernel == "pallas":
        return _recur_fused(params, drive, num_steps, config, grad_mode, return_states)

    if grad_mode == "implicit":
        if return_states:
            raise ValueError(
                "grad_mode='implicit' keeps no per-loop states (that is its O(1) memory); pass "
                "return_states=False, or use grad_mode='full'/'remat' to record a(0..T)."
            )
        if implicit_max_steps < 1:
            raise ValueError(f"implicit_max_steps={implicit_max_steps!r} must be >= 1.")
        final, residual = fixed_point(params, drive, config=config, tol=implicit_tol, max_steps=implicit_max_steps)
        return Unrolled(final, None, residual)

    kernels = [params.w_lat] + ([] if params.w_inh is None else [params.w_inh])
    depthwise = config.mixing == "depthwise"
    winograd_loop = all(use_winograd(drive, k, config.conv_algorithm, depthwise=depthwise) for k in kernels)
    # XLA:CPU takes a >60× slower path for a convolution's gradient inside a rolled loop (jax#12868).
    slow_rolled_conv = jax.default_backend() == "cpu" and not winograd_loop
    remat_outer_unroll = scan_unroll
    if scan_unroll == "auto":
        scan_unroll = default_scan_unroll(num_steps, xla_conv_in_loop=not winograd_loop)
        # remat's outer loop over segments stays rolled: unrolled, XLA:CPU schedules the recomputation
        # next to the forward pass and keeps every state alive (measured: remat = full = 7.3 GB at T=64).
        remat_outer_unroll = True if slow_rolled_conv else 1

    if grad_mode == "remat":
        chunks = _check_remat_batch_chunks(remat_batch_chunks, drive.shape[0], num_steps, slow_rolled_conv)
        if chunks > 1:

            def one_chunk(d):
                return _run_loops(
                    functools.partial(lateral_step, params=params, drive=d, config=config),
                    initial_state(params, d, config),
                    None,
                    num_steps,
                    return_states=return_states,
                    scan_unroll=scan_unroll,
                    remat=True,
                    remat_outer_unroll=remat_outer_unroll,
                )

            # Only each chunk's drive is kept for the backward pass, which recomputes one chunk at a
            # time; unrolled (where a rolled loop is slow), XLA may schedule the chunks side by side.
            final, states, before = _map_batch_chunks(
                jax.checkpoint(one_chunk), drive, chunks, rolled=remat_outer_unroll is not True
            )
            return Unrolled(final, states, relative_change(final, before))

    a0 = initial_state(params, drive, config)
    step_fn = functools.partial(lateral_step, params=params, drive=drive, config=config)

    if grad_mode == "truncated":
        if isinstance(truncate_steps, bool) or not isinstance(truncate_steps, int) or truncate_steps < 1:
            raise ValueError(
                f"grad_mode='truncated' needs truncate_steps=K, a positive int (gradients flow through the "
                f"last K loops); got {truncate_steps!r}."
            )
        head = max(num_steps - truncate_steps, 0)
        if head > 0:
            a_head, head_states, _ = _run_loops(
                step_fn, a0, None, head, return_states=return_states, scan_unroll=scan_unroll
            )
            a_head = jax.lax.stop_gradient(a_head)
            final, tail_states, before = _run_loops(
                step_fn, a_head, None, num_steps - head, return_states=return_states, scan_unroll=scan_unroll
            )
            states = (
                jnp.concatenate([jax.lax.stop_gradient(head_states), tail_states[1:]], axis=0)
                if return_states
                else None
            )
            return Unrolled(final, states, relative_change(final, before))
    elif truncate_steps is not None:
        raise ValueError(f"truncate_steps={truncate_steps!r} is only used with grad_mode='truncated'.")

    final, states, before = _run_loops(
        step_fn,
        a0,
        None,
        num_steps,
        return_states=return_states,
        scan_unroll=scan_unroll,
        remat=grad_mode == "remat",
        remat_outer_unroll=remat_outer_unroll,
    )
    return Unrolled(final, states, relative_change(final, before))


def _recur_fused(
    params: LateralParams,
    drive: jax.Array,
    num_steps: int,
    config: LateralConfig,
    grad_mode: GradMode,
    return_states: bool,
) -> Unrolled:
    """``recur`` with ``loop_kernel="pallas"``: the loops in one fused kernel (full BPTT gradient)."""
    from lateral_jax import fused  # the fused kernel builds on this module

    if grad_mode != "full":
        raise ValueError(
            f"loop_kernel='pallas' computes the full BPTT gradient (grad_mode='full'); got grad_mode={grad_mode!r}. "
            "Use loop_kernel='xla' for 'remat', 'truncated' and 'implicit'."
        )
    a0 = initial_state(params, drive, config)
    if num_steps == 0:
        return Unrolled(a0, a0[None] if return_states else None, relative_change(a0, a0))
    states = fused.loop_states(params, drive, a0, num_steps=num_steps, config=config)
    return Unrolled(states[-1], states if return_states else None, relative_change(states[-1], states[-2]))


def unroll(
    params: LateralParams,
    x: Float[Array, "b h w ci"],
    *,
    num_steps: int,
    config: LateralConfig = LateralConfig(),
    grad_mode: GradMode = "full",
    truncate_steps: int | None = None,
    implicit_tol: float = 1e-5,
    implicit_max_steps: int = 100,
    return_states: bool = True,
    scan_unroll: int | bool | Literal["auto"] = "auto",
    remat_batch_chunks: int | Literal["auto"] = "auto",
) -> Unrolled:
    """Applies the lateral layer to an NHWC batch: ``d = N_d(W_ff * x + b)`` then T loops.

    Args:
      params: :class:`LateralParams` (from :func:`init_params`).
      x: input batch, NHWC.
      num_steps: T, the number of lateral loops (0 is the feed-forward layer).
      config: the layer's static structure, :class:`LateralConfig`.
      grad_mode: ``"full"`` | ``"remat"`` | ``"truncated"`` | ``"implicit"`` (module docstring).
      truncate_steps: K for ``"truncated"``: gradients flow through the last K loops only.
      implicit_tol, implicit_max_steps: stopping rule of the ``"implicit"`` fixed-point solve
        (relative change below ``implicit_tol`` or ``implicit_max_steps`` iterations; ``num_steps``
        is ignored there). The same rule solves the adjoint equation in the backward pass.
      return_states: also return ``a(0..T)`` as ``[T+1, B, H, W, C]`` (needed for analysis; costs
        T+1 activations of memory).
      scan_unroll: ``lax.scan`` unroll factor, or ``"auto"`` (:func:`default_scan_unroll`).
      remat_batch_chunks: ``"remat"`` mode only: the loops run on this many equal slices of the
        batch (a positive divisor of it), each under ``jax.checkpoint``, so the backward pass holds
        one slice's states at a time.  ``"auto"``: :func:`default_remat_batch_chunks` (about √T),
        or 1 for XLA convolutions on CPU.  Exact: every norm here is per example.

    Returns:
      :class:`Unrolled` ``(final, states, residual)``.
    """
    drive = afferent_drive(params, x, config)
    return recur(
        params,
        drive,
        num_steps=num_steps,
        config=config,
        grad_mode=grad_mode,
        truncate_steps=truncate_steps,
        implicit_tol=implicit_tol,
        implicit_max_steps=implicit_max_steps,
        return_states=return_states,
        scan_unroll=scan_unroll,
        remat_batch_chunks=remat_batch_chunks,
    )


def unroll_unshared(
    params: LateralParams,
    x: Float[Array, "b h w ci"],
    *,
    config: LateralConfig = LateralConfig(),
    return_states: bool = True,
    scan_unroll: int | bool | Literal["auto"] = "auto",
) -> Unrolled:
    """The compute-matched control: T loops, each with its *own* kernel ``params.w_lat[t]``.

    ``a(t) = f(N_l(d + W_t * a(t-1)))`` with ``params.w_lat`` of shape ``[T, l, l, C, C]``; the same
    FLOPs as the weight-shared layer, T times the lateral parameters.
    """
    if config.loop_kernel != "xla":
        raise ValueError(
            f"the unshared control runs its loops in XLA (one kernel per loop); got loop_kernel="
            f"{config.loop_kernel!r}. Use loop_kernel='xla' for it."
        )
    drive = afferent_drive(params, x, config)
    num_steps = params.w_lat.shape[0]
    a0 = initial_state(params, drive, config)
    step_fn = functools.partial(lateral_step, params=params._replace(w_inh=None), drive=drive, config=config)
    final, states, before = _run_loops(
        step_fn, a0, params.w_lat, num_steps, return_states=return_states, scan_unroll=scan_unroll
    )
    return Unrolled(final, states, relative_change(final, before))


# --------------------------------------------------------------------------------------------
# Implicit differentiation
# --------------------------------------------------------------------------------------------


def _fixed_point_map(params: LateralParams, drive: jax.Array, a: jax.Array, config: LateralConfig) -> jax.Array:
    """``F(a) = f(N_l(d + L(a)))`` (the leak does not move the fixed point, so it is dropped)."""
    pre = drive + lateral_input(params, a, config)
    return activate(normalise(pre, params.loop_norm, config.loop_norm, config.num_groups), config.activation)


def _iterate(fn, x0: jax.Array, tol: float, max_steps: int) -> tuple[jax.Array, jax.Array]:
    """Fixed-point iteration ``x ← fn(x)`` until the relative change < tol; returns (x, change)."""

    def cond(carry):
        i, _, change = carry
        return jnp.logical_and(i < max_steps, change >= tol)

    def body(carry):
        i, x, _ = carry
        new = fn(x)
        return i + 1, new, relative_change(new, x)

    _, x, change = jax.lax.while_loop(cond, body, (jnp.array(0), x0, jnp.array(jnp.inf, jnp.float32)))
    return x, change


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _implicit_solve(params: LateralParams, drive: jax.Array, config: LateralConfig, tol: float, max_steps: int):
    a0 = initial_state(params, drive, config)
    a_star, _ = _iterate(lambda a: _fixed_point_map(params, drive, a, config), a0, tol, max_steps)
    return a_star


def _implicit_solve_fwd(params, drive, config, tol, max_steps):
    a_star = _implicit_solve(params, drive, config, tol, max_steps)
    return a_star, (params, drive, a_star)


def _implicit_solve_bwd(config, tol, max_steps, residuals, g):
    """Implicit-function theorem: with ``a* = F(θ, a*)``, ``dL/dθ = uᵀ ∂F/∂θ`` where
    ``u = g + (∂F/∂a)ᵀ u`` is solved by fixed-point iteration (converges when F is contractive)."""
    params, drive, a_star = residuals
    _, vjp_a = jax.vjp(lambda a: _fixed_point_map(params, drive, a, config), a_star)
    u, _ = _iterate(lambda u: g + vjp_a(u)[0], g, tol, max_steps)
    _, vjp_theta = jax.vjp(lambda p, d: _fixed_point_map(p, d, a_star, config), params, drive)
    return vjp_theta(u)


_implicit_solve.defvjp(_implicit_solve_fwd, _implicit_solve_bwd)


def fixed_point(
    params: LateralParams,
    drive: jax.Array,
    *,
    config: LateralConfig = LateralConfig(),
    tol: float = 1e-5,
    max_steps: int = 100,
) -> tuple[jax.Array, jax.Array]:
    """Solves ``a* = f(N_l(d + L(a*)))`` by iteration from ``a(0)``; differentiable by the IFT.

    Returns ``(a*, residual)`` with ``residual = ‖F(a*) - a*‖ / ‖a*‖`` (not differentiated).  A
    residual well above ``tol`` means the iteration did not converge (the lateral map is not
    contractive); its gradient is then not the gradient of a long unroll.
    """
    a_star = _implicit_solve(params, drive, config, tol, max_steps)
    a_sg = jax.lax.stop_gradient(a_star)
    residual = relative_change(
        _fixed_point_map(jax.lax.stop_gradient(params), jax.lax.stop_gradient(drive), a_sg, config), a_sg
    )
    return a_star, residual


def receptive_field_radius(*, kernel_size: int, lateral_size: int, num_steps: int) -> int:
    """Radius (in pixels) of a unit's receptive field after T loops: ``(k-1)/2 + T (l-1)/2``."""
    _check_odd_size("kernel_size", kernel_size)
    _check_odd_size("lateral_size", lateral_size)
    return (kernel_size - 1) // 2 + check_num_steps(num_steps) * (lateral_size - 1) // 2
