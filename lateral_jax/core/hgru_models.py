"""The hGRU as Flax Linen modules: the layer (a thin skin over :func:`lateral_jax.core.hgru.run`)
and the reference model of the Pathfinder benchmark.

``HGRULayer`` computes exactly ``hgru.run(layer_params(variables), drive, ...)`` (tested).
``HGRUNet``: a ``stem_size``² convolution to ``width`` channels (the drive ``x``), T hGRU loops,
a GroupNorm, a global *max* pool (Pathfinder asks whether a connection exists anywhere) and a
dense head.  Parameter names: ``w_inhibit``, ``w_excite``, ``u_gain``, ``b_gain``, ``u_mix``, ``b_mix``,
``alpha``, ``mu``, ``kappa``, ``omega``, ``gamma``, ``norm_<site>_{scale,bias}``.

In ``grad_mode="implicit"`` a layer with ``contractor_weight > 0`` adds C-RBP's penalty
(:func:`lateral_jax.core.implicit.contractor_penalty`, times the weight) at its fixed point to the
``"penalties"`` collection; :func:`lateral_jax.training.train.loss_and_metrics` adds it to the loss.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lateral_jax.core import ei, hgru
from lateral_jax.core.cell import Unrolled
from lateral_jax.core.config import LoopOptions
from lateral_jax.core.layers import add_contractor_penalty
from lateral_jax.core.models import ModelOutput, Record, _wants
from lateral_jax.core.params import NormParams

PARAM_NAMES = ("w_inhibit", "w_excite", "u_gain", "b_gain", "u_mix", "b_mix", "alpha", "mu", "kappa", "omega", "gamma")


def layer_params(variables: dict) -> hgru.HGRUParams:
    """One ``HGRULayer``'s Linen params dict as the pure :class:`~lateral_jax.core.hgru.HGRUParams`."""
    p = variables.get("params", variables)
    norms = None
    if "norm_gain_scale" in p:
        norms = tuple(NormParams(p[f"norm_{s}_scale"], p[f"norm_{s}_bias"]) for s in hgru.NORM_SITES)
    return hgru.HGRUParams(**{name: p.get(name) for name in PARAM_NAMES}, norms=norms)


class HGRULayer(nn.Module):
    """T hGRU loops on a drive computed elsewhere (``hgru.run`` as a Linen layer).

    Attributes:
      num_steps: T (ignored in ``"implicit"`` mode, which iterates to the fixed point).
      config: :class:`~lateral_jax.core.hgru.HGRUConfig`.
      loop: :class:`~lateral_jax.core.config.LoopOptions`.
      contractor_weight, contractor_threshold: C-RBP's penalty weight and λ (implicit mode only).
    """

    num_steps: int = 8
    config: hgru.HGRUConfig = hgru.HGRUConfig()
    loop: LoopOptions = LoopOptions()
    contractor_weight: float = 0.0
    contractor_threshold: float = 0.9

    @nn.compact
    def __call__(self, drive: jax.Array, *, return_states: bool = False) -> Unrolled:
        channels = drive.shape[-1]
        # one draw of every initial value (the chronos biases are tied: b_mix = -b_gain), made with
        # the key of the first parameter initialised (init functions run only when initialising)
        drawn: dict[str, hgru.HGRUParams] = {}

        def initial(pick):
            def init(key):
                if "all" not in drawn:
                    drawn["all"] = hgru.init_params(key, channels, self.config)
                return pick(drawn["all"])

            return init

        values = {}
        for name in PARAM_NAMES:
            if name == "w_excite" and self.config.shared_kernel:
                continue
            values[name] = self.param(name, initial(lambda p, name=name: getattr(p, name)))
        norms = None
        if self.config.gate_norm != "none":
            norms = tuple(
                NormParams(
                    self.param(f"norm_{site}_scale", initial(lambda p, i=i: p.norms[i].scale)),
                    self.param(f"norm_{site}_bias", initial(lambda p, i=i: p.norms[i].bias)),
                )
                for i, site in enumerate(hgru.NORM_SITES)
            )
        params = hgru.HGRUParams(**{n: values.get(n) for n in PARAM_NAMES}, norms=norms)
        out = hgru.run(
            params, drive, num_steps=self.num_steps, config=self.config, loop=self.loop, return_states=return_states
        )
        if self.loop.grad_mode == "implicit":
            fmap = lambda h: hgru.loop_map(params, drive, h, self.config)  # noqa: E731
            add_contractor_penalty(self, fmap, out.final, self.contractor_weight, self.contractor_threshold)
        return out


def ei_penalty(params: Any, config: hgru.HGRUConfig, *, mode: ei.EIMode) -> jax.Array:
    """The E/I loss of ``mode`` on every hGRU layer's :func:`~lateral_jax.core.hgru.signed_kernels`:
    ``"mixed_sign"``/``"mixed_sign_smooth"`` per presynaptic channel of ``W_E`` and ``−W_I``,
    ``"two_population"`` ``Σ relu(−W_E) + Σ relu(W_I·(−1))``; ``"none"`` is 0."""
    ei.check_mode(mode)
    layers = [sub for path, sub in _hgru_subtrees(params)]
    if mode == "none" or not layers:
        return jnp.zeros((), jnp.float32)
    signed = [hgru.signed_kernels(layer_params(sub), config) for sub in layers]
    if mode in ("mixed_sign", "mixed_sign_smooth"):
        return ei.mixed_sign_penalty(signed, smooth=mode == "mixed_sign_smooth")
    if mode == "two_population":
        return ei.two_population_penalty([s["excitatory"] for s in signed], [s["inhibitory"] for s in signed])
    raise ValueError(f"ei_mode={mode!r} is not available for the hGRU; use 'mixed_sign' or 'two_population'.")


def _hgru_subtrees(params: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """``(path, params)`` of every sub-dict holding an hGRU layer's ``w_inhibit`` and ``u_gain``."""
    if not isinstance(params, dict):
        return []
    if "w_inhibit" in params and "u_gain" in params:
        return [(path, params)]
    return [found for key, sub in params.items() for found in _hgru_subtrees(sub, (*path, key))]


def forward_flops(
    width: int,
    *,
    num_steps: int,
    kernel_size: int,
    stem_size: int = 5,
    image_size: int = 32,
    in_channels: int = 1,
    num_classes: int = 2,
) -> float:
    """Forward FLOPs per image of :class:`HGRUNet` (2 per multiply-add, convolutions and gates only):
    the stem ``2 s² C_in C H W``, then per loop the inhibition and excitation convolutions
    ``2 · 2 k² C² H W`` and the gain and mix gates (1 × 1) ``2 · 2 C² H W``; plus the dense head."""
    pixels = image_size * image_size
    stem = 2 * stem_size**2 * in_channels * width * pixels
    loop = (2 * 2 * kernel_size**2 * width * width + 2 * 2 * width * width) * pixels
    return float(stem + num_steps * loop + 2 * width * num_classes)


class HGRUNet(nn.Module):
    """The benchmark's hGRU model: stem convolution → T hGRU loops → GroupNorm → global max pool → dense.

    Attributes:
      width: channels of the stem and the hGRU.
      stem_size: the stem convolution's kernel size.
      num_classes, num_steps, config, loop: as :class:`HGRULayer`.
      ei_mode, ei_weight: the E/I loss (:func:`ei_penalty`) and its weight.
      contractor_weight, contractor_threshold: C-RBP (implicit mode).
      dtype: computation dtype.
    """

    width: int = 16
    stem_size: int = 5
    num_classes: int = 2
    num_steps: int = 8
    config: hgru.HGRUConfig = hgru.HGRUConfig()
    loop: LoopOptions = LoopOptions()
    ei_mode: ei.EIMode = "none"
    ei_weight: float = 0.0
    contractor_weight: float = 0.0
    contractor_threshold: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, record: Record = False) -> ModelOutput:
        if x.ndim != 4:
            raise ValueError(f"input must be NHWC [batch, height, width, channels]; got shape {tuple(x.shape)}.")
        size = (self.stem_size, self.stem_size)
        drive = nn.Conv(self.width, size, padding="SAME", dtype=self.dtype, name="stem")(x.astype(self.dtype))
        out = HGRULayer(
            self.num_steps, self.config, self.loop, self.contractor_weight, self.contractor_threshold, name="hgru"
        )(drive, return_states=_wants(record, "hgru"))
        states = {"hgru": out.states} if out.states is not None else {}
        groups = self.config.num_groups if self.width % self.config.num_groups == 0 else 1
        h = nn.GroupNorm(num_groups=groups, dtype=self.dtype, name="readout_norm")(out.final)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(h.max(axis=(1, 2)))
        return ModelOutput(logits.astype(jnp.promote_types(self.dtype, jnp.float32)), states, {"hgru": out.residual})

    def ei_penalty(self, params: Any) -> jax.Array:
        """``ei_weight · L_EI`` on the hGRU's signed kernels (a pure function of params)."""
        if self.ei_weight < 0:
            raise ValueError(f"ei_weight={self.ei_weight!r} must be >= 0.")
        if self.ei_weight == 0:
            return jnp.zeros((), jnp.float32)
        return self.ei_weight * ei_penalty(params, self.config, mode=self.ei_mode)
