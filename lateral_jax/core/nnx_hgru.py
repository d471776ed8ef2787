"""Flax NNX twins of the hGRU layer and model (:mod:`lateral_jax.core.hgru_models`).

Same parameter names and nesting as the Linen modules, so a Linen model's ``params`` loaded with
:func:`lateral_jax.core.nnx_models.load_params` give the same logits and gradients (tested)::

    model = nnx_hgru.HGRUNet(in_features=1, width=16, num_steps=8, rngs=nnx.Rngs(0))
    out = model(images)                        # ModelOutput(logits, states, residuals)

C-RBP's penalty has no collection to be sown into here: :meth:`HGRULayer.contractor_penalty`
returns it for a user's loss (at the fixed point of the last call in implicit mode).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lateral_jax.core import ei, hgru, hgru_models, implicit
from lateral_jax.core.cell import Unrolled
from lateral_jax.core.config import LoopOptions
from lateral_jax.core.dynamics import map_spectral_radius
from lateral_jax.core.models import ModelOutput, Record, _wants
from lateral_jax.core.nnx_models import _read_norm


class HGRULayer(nnx.Module):
    """NNX twin of :class:`lateral_jax.core.hgru_models.HGRULayer`: T hGRU loops on a drive.

    Args:
      channels: channels C of the drive and the state.
      num_steps: T (ignored in ``"implicit"`` mode, which iterates to the fixed point).
      config: :class:`~lateral_jax.core.hgru.HGRUConfig`.
      loop: :class:`~lateral_jax.core.config.LoopOptions`.
      rngs: the ``nnx.Rngs`` the parameters are drawn from (:func:`lateral_jax.core.hgru.init_params`).
    """

    def __init__(
        self,
        channels: int,
        *,
        num_steps: int = 8,
        config: hgru.HGRUConfig = hgru.HGRUConfig(),
        loop: LoopOptions = LoopOptions(),
        rngs: nnx.Rngs,
    ):
        self.num_steps, self.config, self.loop = num_steps, config, loop
        init = hgru.init_params(rngs.params(), channels, config)
        for name in hgru_models.PARAM_NAMES:
            if getattr(init, name) is not None:
                setattr(self, name, nnx.Param(getattr(init, name)))
        for site, norm in zip(hgru.NORM_SITES, init.norms or (), strict=False):
            setattr(self, f"norm_{site}_scale", nnx.Param(norm.scale))
            setattr(self, f"norm_{site}_bias", nnx.Param(norm.bias))

    def layer_params(self) -> hgru.HGRUParams:
        """The pure :class:`~lateral_jax.core.hgru.HGRUParams` of this layer."""
        values = {n: getattr(self, n)[...] if hasattr(self, n) else None for n in hgru_models.PARAM_NAMES}
        norms = None
        if hasattr(self, "norm_gain_scale"):
            norms = tuple(_read_norm(self, f"norm_{s}") for s in hgru.NORM_SITES)
        return hgru.HGRUParams(**values, norms=norms)

    def __call__(self, drive: jax.Array, *, return_states: bool = False) -> Unrolled:
        return hgru.run(
            self.layer_params(),
            drive,
            num_steps=self.num_steps,
            config=self.config,
            loop=self.loop,
            return_states=return_states,
        )

    def contractor_penalty(self, drive: jax.Array, fixed_point: jax.Array, *, threshold: float = 0.9) -> jax.Array:
        """C-RBP's penalty of this layer's loop map at ``fixed_point`` (:func:`implicit.contractor_penalty`)."""
        params = self.layer_params()
        return implicit.contractor_penalty(
            lambda h: hgru.loop_map(params, drive, h, self.config), fixed_point, threshold=threshold
        )

    def spectral_radius(self, drive: jax.Array, state: jax.Array, *, num_iters: int = 40) -> jax.Array:
        """``ρ(∂Φ/∂h)`` at ``state`` per example (power iteration, as the Linen layers' analysis)."""
        params = self.layer_params()
        return map_spectral_radius(lambda h: hgru.loop_map(params, drive, h, self.config), state, num_iters=num_iters)


class HGRUNet(nnx.Module):
    """NNX twin of :class:`lateral_jax.core.hgru_models.HGRUNet`: stem convolution → T hGRU loops →
    GroupNorm → global max pool → dense.

    Args:
      in_features: input channels.
      width: channels of the stem and the hGRU.
      stem_size: the stem convolution's kernel size.
      num_classes, num_steps, config, loop: as :class:`HGRULayer`.
      ei_mode, ei_weight: the E/I loss on the signed kernels (:func:`~lateral_jax.core.hgru_models.ei_penalty`).
      dtype: computation dtype.
      rngs: the ``nnx.Rngs`` the parameters are drawn from.
    """

    def __init__(
        self,
        in_features: int,
        *,
        width: int = 16,
        stem_size: int = 5,
        num_classes: int = 2,
        num_steps: int = 8,
        config: hgru.HGRUConfig = hgru.HGRUConfig(),
        loop: LoopOptions = LoopOptions(),
        ei_mode: ei.EIMode = "none",
        ei_weight: float = 0.0,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config, self.ei_mode, self.ei_weight, self.dtype = config, ei_mode, ei_weight, dtype
        self.stem = nnx.Conv(in_features, width, (stem_size, stem_size), padding="SAME", dtype=dtype, rngs=rngs)
        self.hgru = HGRULayer(width, num_steps=num_steps, config=config, loop=loop, rngs=rngs)
        groups = config.num_groups if width % config.num_groups == 0 else 1
        self.readout_norm = nnx.GroupNorm(width, num_groups=groups, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(width, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, record: Record = False) -> ModelOutput:
        if x.ndim != 4:
            raise ValueError(f"input must be NHWC [batch, height, width, channels]; got shape {tuple(x.shape)}.")
        out = self.hgru(self.stem(x.astype(self.dtype)), return_states=_wants(record, "hgru"))
        states = {"hgru": out.states} if out.states is not None else {}
        logits = self.head(self.readout_norm(out.final).max(axis=(1, 2)))
        return ModelOutput(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), states, {"hgru": out.residual})

    def ei_penalty(self) -> jax.Array:
        """``ei_weight · L_EI`` on the hGRU's signed kernels (as the Linen model's)."""
        if self.ei_weight == 0:
            return jnp.zeros((), jnp.float32)
        params = {"hgru": {n: getattr(self.hgru, n)[...] for n in hgru_models.PARAM_NAMES if hasattr(self.hgru, n)}}
        return self.ei_weight * hgru_models.ei_penalty(params, self.config, mode=self.ei_mode)
