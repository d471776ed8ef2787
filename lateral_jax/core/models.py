"""Architectures: F-CNN, LC-CNN, LCEI-CNN, the two controls, and a lateral ResNet-18.

All models return a :class:`ModelOutput` ``(logits, states, residuals)``: ``states`` maps the name
of each recorded lateral layer to its per-loop responses ``a(0..T)`` ``[T+1, B, H, W, C]`` (taken
from the same forward pass, no recomputation), ``residuals`` maps every lateral layer to its
final-loop relative change ``‖a(T) - a(T-1)‖ / ‖a(T)‖``.

* ``LateralCNN`` — conv stages ``LateralConv → 2×2 max-pool``, global average pool, dense head.
  ``FCNN`` (T = 0), ``LCCNN`` (T loops) and ``LCEICNN`` (T loops + an E/I mode and weight) are the
  same class with other defaults; ``UnsharedCNN`` is the compute-matched control (T convolutions
  with their own weights); :func:`param_matched_widths` sizes the parameter-matched F-CNN.
* ``LateralResNet`` — ResNet-18-style (BasicBlocks, GroupNorm), lateral recurrence on the output
  of every block in the chosen stages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lateral_jax.core import ei, pooling
from lateral_jax.core.cell import Unrolled
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.layers import LateralConv, LateralRecurrence


class ModelOutput(NamedTuple):
    logits: jax.Array
    states: dict[str, jax.Array]
    residuals: dict[str, jax.Array]


Record = bool | str | Sequence[str]


def _wants(record: Record, name: str) -> bool:
    if isinstance(record, bool):
        return record
    if isinstance(record, str):
        return record in ("all", name)
    return name in record


def _collect(out: Unrolled, name: str, states: dict, residuals: dict) -> jax.Array:
    """Records a lateral layer's per-loop states (if requested) and residual; returns ``a(T)``."""
    if out.states is not None:
        states[name] = out.states
    residuals[name] = out.residual
    return out.final


def _classify(h: jax.Array, num_classes: int, dtype: Any) -> jax.Array:
    """Global average pool and the dense ``head``; logits in float32 (float64 for a float64 model)."""
    logits = nn.Dense(num_classes, dtype=dtype, name="head")(h.mean(axis=(1, 2)))
    return logits.astype(jnp.promote_types(dtype, jnp.float32))


def weighted_ei_penalty(model: Any, params: Any) -> jax.Array:
    """``λ_EI · L_EI(params)`` with the model's ``ei_weight``, ``ei_mode`` and ``excitatory_fraction``."""
    if model.ei_weight < 0:
        raise ValueError(f"ei_weight={model.ei_weight!r} must be >= 0 (it is λ_EI in CE + λ_EI·L_EI).")
    if model.ei_weight == 0.0:
        return jnp.zeros((), jnp.float32)
    return model.ei_weight * ei.ei_penalty(params, mode=model.ei_mode, excitatory_fraction=model.excitatory_fraction)


def _check_widths(widths: Sequence[int]) -> None:
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
        raise ValueError(f"widths={tuple(widths)!r} must be a non-empty sequence of positive ints.")


class LateralCNN(nn.Module):
    """A small CNN for 28×28 / 32×32 inputs whose conv layers carry lateral recurrence.

    Attributes:
      widths: channels of each conv stage (each stage halves the resolution).
      num_classes: outputs of the dense head.
      num_steps: T, lateral loops in each lateral layer (0: the F-CNN).
      lateral: :class:`LateralConfig` (default: :meth:`LateralConfig.stable`).
      lateral_layers: indices of the stages with lateral connections (``None``: all).
      loop: :class:`LoopOptions`, how every lateral layer's loops run and are differentiated.
      ei_mode, ei_weight, excitatory_fraction: E/I separation; the loss term is
        :meth:`ei_penalty` (``ei_weight · L_EI``), the parametrised mode changes the parameters.
      unshared: the compute-matched control (one lateral kernel per loop).
      dtype: computation dtype (bfloat16 for mixed precision; params and logits stay float32).
      contractor_weight, contractor_threshold: C-RBP's penalty in implicit mode
        (:class:`~lateral_jax.core.layers.LateralConv`).
    """

    widths: Sequence[int] = (32, 64, 128)
    num_classes: int = 10
    num_steps: int = 4
    lateral: LateralConfig = LateralConfig.stable()
    lateral_layers: Sequence[int] | None = None
    loop: LoopOptions = LoopOptions()
    ei_mode: ei.EIMode = "none"
    ei_weight: float = 0.0
    excitatory_fraction: float = 0.8
    unshared: bool = False
    dtype: Any = jnp.float32
    contractor_weight: float = 0.0
    contractor_threshold: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, *, record: Record = False) -> ModelOutput:
        _check_widths(self.widths)
        if self.ei_weight < 0:
            raise ValueError(f"ei_weight={self.ei_weight!r} must be >= 0 (it is λ_EI in CE + λ_EI·L_EI).")
        if x.ndim != 4:
            raise ValueError(f"input must be NHWC [batch, height, width, channels]; got shape {tuple(x.shape)}.")
        states, residuals = {}, {}
        h = x
        for i, width in enumerate(self.widths):
            name = f"lateral_{i}"
            lateral_here = self.lateral_layers is None or i in self.lateral_layers
            out = LateralConv(
                width,
                num_steps=self.num_steps if lateral_here else 0,
                config=self.lateral,
                loop=self.loop,
                ei_mode=self.ei_mode,
                excitatory_fraction=self.excitatory_fraction,
                unshared=self.unshared,
                dtype=self.dtype,
                contractor_weight=self.contractor_weight,
                contractor_threshold=self.contractor_threshold,
                name=name,
            )(h, return_states=_wants(record, name))
            h = pooling.max_pool(_collect(out, name, states, residuals), 2)
        return ModelOutput(_classify(h, self.num_classes, self.dtype), states, residuals)

    def ei_penalty(self, params: Any) -> jax.Array:
        """``ei_weight · L_EI(params)`` for this model's E/I mode (a pure function of params)."""
        return weighted_ei_penalty(self, params)


class FCNN(LateralCNN):
    """The feed-forward baseline: T = 0, no lateral parameters."""

    num_steps: int = 0


class LCCNN(LateralCNN):
    """Lateral-connection CNN: T = 4 weight-shared lateral loops in every conv layer."""

    num_steps: int = 4


class LCEICNN(LateralCNN):
    """LC-CNN plus E/I separation: mixed-sign penalty with λ_EI = 1e-3 by default."""

    num_steps: int = 4
    ei_mode: ei.EIMode = "mixed_sign"
    ei_weight: float = 1e-3


class UnsharedCNN(LateralCNN):
    """Compute-matched control: T extra convolutions with their own weights (no weight sharing)."""

    num_steps: int = 4
    unshared: bool = True


def forward_flops(
    widths: Sequence[int],
    *,
    num_steps: int,
    image_size: int = 32,
    in_channels: int = 3,
    num_classes: int = 0,
    kernel_size: int = 3,
    lateral_size: int = 3,
) -> float:
    """Forward FLOPs per image of a :class:`LateralCNN`: per stage the afferent convolution and T
    lateral convolutions (SAME, 2 FLOPs per multiply-add) at a resolution halved by each stage's
    pooling, plus the dense head when ``num_classes`` is given."""
    flops, cin, size = 0.0, in_channels, image_size
    for w in widths:
        flops += 2 * kernel_size**2 * cin * w * size * size + num_steps * 2 * lateral_size**2 * w * w * size * size
        cin, size = w, size // 2
    return flops + 2 * cin * num_classes


def param_count(params: Any) -> int:
    """Number of scalars in a parameter pytree (of arrays or ``ShapeDtypeStruct`` leaves)."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params))


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of parameters of ``model`` for inputs of ``input_shape`` (NHWC, batch included)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape, jnp.float32)))
    return param_count(shapes["params"])


def param_matched_widths(
    reference: nn.Module, input_shape: Sequence[int], *, multiple: int = 8, max_scale: float = 4.0
) -> tuple[int, ...]:
    """Widths of an :class:`FCNN` whose parameter count is closest to ``reference``'s.

    Widths are ``round(scale · w / multiple) · multiple`` for the reference widths ``w``; the
    scale is found by bisection on the (monotone) parameter count.
    """
    target = count_params(reference, input_shape)

    def widths_at(scale: float) -> tuple[int, ...]:
        return tuple(max(multiple, round(scale * w / multiple) * multiple) for w in reference.widths)

    def count(widths: tuple[int, ...]) -> int:
        return count_params(
            FCNN(widths=widths, num_classes=reference.num_classes, lateral=reference.lateral), input_shape
        )

    lo, hi = 1.0, max_scale
    for _ in range(12):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if count(widths_at(mid)) < target else (lo, mid)
    return min({widths_at(lo), widths_at(hi)}, key=lambda widths: abs(count(widths) - target))


# --------------------------------------------------------------------------------------------
# Lateral ResNet
# --------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """What the ResNet blocks share: their fields, bias-free SAME convolutions and GroupNorms."""

    features: int
    strides: int
    num_groups: int
    dtype: Any

    def conv(self, features: int, size: int, strides: int, name: str) -> nn.Conv:
        return nn.Conv(features, (size, size), (strides, strides), "SAME", use_bias=False, dtype=self.dtype, name=name)

    def norm(self, name: str) -> nn.GroupNorm:
        return nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name=name)


class _BasicBlock(_Block):
    """3×3 (stride) → 3×3, GroupNorm after each; a 1×1 projection shortcut where the shape changes."""

    @nn.compact
    def __call__(self, x):
        conv, gn = self.conv, self.norm
        h = nn.relu(gn("norm1")(conv(self.features, 3, self.strides, "conv1")(x)))
        h = gn("norm2")(conv(self.features, 3, 1, "conv2")(h))
        if x.shape[-1] != self.features or self.strides != 1:
            x = gn("proj_norm")(conv(self.features, 1, self.strides, "proj")(x))
        return h + x  # the drive d of the block; the caller applies f (and lateral loops)


class _BottleneckBlock(_Block):
    """1×1 (``features``) → 3×3 (``features``, stride) → 1×1 (``4 · features``), GroupNorm after each."""

    @nn.compact
    def __call__(self, x):
        conv, gn = self.conv, self.norm
        out = 4 * self.features
        h = nn.relu(gn("norm1")(conv(self.features, 1, 1, "conv1")(x)))
        h = nn.relu(gn("norm2")(conv(self.features, 3, self.strides, "conv2")(h)))
        h = gn("norm3")(conv(out, 1, 1, "conv3")(h))
        if x.shape[-1] != out or self.strides != 1:
            x = gn("proj_norm")(conv(out, 1, self.strides, "proj")(x))
        return h + x  # the drive d of the block


BLOCKS = {"basic": _BasicBlock, "bottleneck": _BottleneckBlock}


class LateralResNet(nn.Module):
    """ResNet-18/50-style network with lateral recurrence after every block of ``lateral_stages``.

    In a lateral stage, the block's pre-activation output ``d = GN(conv(...)) + shortcut`` is the
    drive of ``recurrence.recur``: ``a(0) = f(N_l(d))``, ``a(t) = f(N_l(d + W_lat * a(t-1)))``.
    With ``num_steps = 0`` it is the plain (GroupNorm) ResNet.

    Attributes:
      stage_sizes: blocks per stage ((2, 2, 2, 2) with basic blocks is ResNet-18, (3, 4, 6, 3)
        with bottleneck blocks ResNet-50).
      widths: channels per stage (bottleneck blocks output 4× this).
      block: ``"basic"`` (two 3×3 convolutions) or ``"bottleneck"`` (1×1, 3×3, 1×1 with 4× expansion).
      lateral_stages: indices of the stages with lateral recurrence.
      small_inputs: 3×3 stride-1 stem without max-pool (CIFAR); else 7×7/2 stem + max-pool (ImageNet).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    block: str = "basic"
    num_classes: int = 10
    num_steps: int = 4
    lateral: LateralConfig = LateralConfig.stable()
    lateral_stages: Sequence[int] = (0, 1)
    loop: LoopOptions = LoopOptions()
    ei_mode: ei.EIMode = "none"
    ei_weight: float = 0.0
    excitatory_fraction: float = 0.8
    small_inputs: bool = True
    num_groups: int = 8
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, record: Record = False) -> ModelOutput:
        _check_widths(self.widths)
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(f"stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} differ in length.")
        if self.block not in BLOCKS:
            raise ValueError(f"block={self.block!r} must be one of {tuple(BLOCKS)}.")
        make_block = BLOCKS[self.block]
        h = x.astype(self.dtype)
        if self.small_inputs:
            h = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, dtype=self.dtype, name="stem")(h)
        else:
            h = nn.Conv(self.widths[0], (7, 7), (2, 2), padding="SAME", use_bias=False, dtype=self.dtype, name="stem")(
                h
            )
        h = nn.relu(nn.GroupNorm(num_groups=self.num_groups, dtype=self.dtype, name="stem_norm")(h))
        if not self.small_inputs:
            h = nn.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
        states, residuals = {}, {}
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths, strict=True)):
            for b in range(blocks):
                strides = 2 if (s > 0 and b == 0) else 1
                drive = make_block(width, strides, self.num_groups, self.dtype, name=f"stage{s}_block{b}")(h)
                if s in self.lateral_stages and self.num_steps > 0:
                    name = f"stage{s}_block{b}_lateral"
                    out = LateralRecurrence(
                        num_steps=self.num_steps,
                        config=self.lateral,
                        loop=self.loop,
                        ei_mode=self.ei_mode,
                        excitatory_fraction=self.excitatory_fraction,
                        name=name,
                    )(drive, return_states=_wants(record, name))
                    h = _collect(out, name, states, residuals)
                else:
                    h = nn.relu(drive)
        return ModelOutput(_classify(h, self.num_classes, self.dtype), states, residuals)

    def ei_penalty(self, params: Any) -> jax.Array:
        """``ei_weight · L_EI(params)`` for this model's E/I mode (a pure function of params)."""
        return weighted_ei_penalty(self, params)


MODELS = {"fcnn": FCNN, "lccnn": LCCNN, "lceicnn": LCEICNN, "unshared": UnsharedCNN, "lateral_resnet": LateralResNet}
