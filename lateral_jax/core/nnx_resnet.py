"""The NNX twin of :class:`lateral_jax.core.models.LateralResNet` (its parameters, names and
nesting; tested against the Linen model in ``tests/nnx_test.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from lateral_jax.core import ei
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.models import ModelOutput, Record, _check_widths, _wants, weighted_ei_penalty
from lateral_jax.core.nnx_models import LateralRecurrence, _classify, _collect, params_dict


class _BasicBlock(nnx.Module):
    def __init__(self, in_features: int, features: int, strides: int, num_groups: int, dtype: Any, rngs: nnx.Rngs):
        def conv(cin, size, stride):
            return nnx.Conv(
                cin, features, (size, size), (stride, stride), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
            )

        def gn():
            return nnx.GroupNorm(features, num_groups=num_groups, dtype=dtype, rngs=rngs)

        self.conv1, self.norm1 = conv(in_features, 3, strides), gn()
        self.conv2, self.norm2 = conv(features, 3, 1), gn()
        if in_features != features or strides != 1:
            self.proj, self.proj_norm = conv(in_features, 1, strides), gn()

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.norm2(self.conv2(jax.nn.relu(self.norm1(self.conv1(x)))))
        if hasattr(self, "proj"):
            x = self.proj_norm(self.proj(x))
        return h + x


class LateralResNet(nnx.Module):
    """NNX twin of :class:`lateral_jax.core.models.LateralResNet`.

    Args:
      in_features: input channels.
      stage_sizes: basic blocks per stage (``(2, 2, 2, 2)``: ResNet-18).
      widths: channels of each stage.
      num_classes: outputs of the dense head.
      num_steps: T lateral loops of each lateral stage's recurrence.
      lateral: :class:`~lateral_jax.core.config.LateralConfig` of the recurrences.
      lateral_stages: indices of the stages with a lateral recurrence after each block.
      loop: :class:`~lateral_jax.core.config.LoopOptions` of every recurrence.
      ei_mode, ei_weight, excitatory_fraction: E/I separation, as the CNNs'.
      small_inputs: a 3 × 3 stem without max pool (CIFAR-sized images) instead of ImageNet's 7 × 7
        stride-2 stem and pool.
      num_groups: groups of the blocks' GroupNorms.
      dtype: computation dtype.
      rngs: the ``nnx.Rngs`` the parameters are drawn from.
    """

    def __init__(
        self,
        in_features: int,
        *,
        stage_sizes: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        num_classes: int = 10,
        num_steps: int = 4,
        lateral: LateralConfig = LateralConfig.stable(),
        lateral_stages: Sequence[int] = (0, 1),
        loop: LoopOptions = LoopOptions(),
        ei_mode: ei.EIMode = "none",
        ei_weight: float = 0.0,
        excitatory_fraction: float = 0.8,
        small_inputs: bool = True,
        num_groups: int = 8,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_widths(widths)
        if len(stage_sizes) != len(widths):
            raise ValueError(f"stage_sizes {tuple(stage_sizes)} and widths {tuple(widths)} differ in length.")
        self.ei_mode, self.ei_weight, self.excitatory_fraction = ei_mode, ei_weight, excitatory_fraction
        self.small_inputs, self.dtype, self.blocks = small_inputs, dtype, []
        size = (3, 3) if small_inputs else (7, 7)
        stride = (1, 1) if small_inputs else (2, 2)
        self.stem = nnx.Conv(
            in_features, widths[0], size, stride, padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
        )
        self.stem_norm = nnx.GroupNorm(widths[0], num_groups=num_groups, dtype=dtype, rngs=rngs)
        channels = widths[0]
        for s, (blocks, width) in enumerate(zip(stage_sizes, widths, strict=True)):
            for b in range(blocks):
                name, strides = f"stage{s}_block{b}", 2 if (s > 0 and b == 0) else 1
                setattr(self, name, _BasicBlock(channels, width, strides, num_groups, dtype, rngs))
                lateral_name = None
                if s in lateral_stages and num_steps > 0:
                    lateral_name = f"{name}_lateral"
                    layer = LateralRecurrence(
                        width,
                        num_steps=num_steps,
                        config=lateral,
                        loop=loop,
                        ei_mode=ei_mode,
                        excitatory_fraction=excitatory_fraction,
                        rngs=rngs,
                    )
                    setattr(self, lateral_name, layer)
                self.blocks.append((name, lateral_name))
                channels = width
        self.head = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, record: Record = False) -> ModelOutput:
        h = jax.nn.relu(self.stem_norm(self.stem(x.astype(self.dtype))))
        if not self.small_inputs:
            h = linen.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")
        states, residuals = {}, {}
        for name, lateral_name in self.blocks:
            drive = getattr(self, name)(h)
            if lateral_name is None:
                h = jax.nn.relu(drive)
                continue
            out = getattr(self, lateral_name)(drive, return_states=_wants(record, lateral_name))
            h = _collect(out, lateral_name, record, states, residuals)
        return ModelOutput(_classify(self.head, h), states, residuals)

    def ei_penalty(self) -> jax.Array:
        """``ei_weight · L_EI`` of the current parameters."""
        return weighted_ei_penalty(self, params_dict(self))
