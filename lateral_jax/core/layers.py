"""Flax Linen wrappers of the pure core: they declare parameters and call :mod:`recurrence`.

``LateralConv`` computes exactly ``recurrence.unroll(module_params(variables), x, ...)`` (tested);
``LateralRecurrence`` computes ``recurrence.recur`` on a drive computed elsewhere (used inside
residual blocks).  Parameter names: ``w_ff``, ``b_ff``, ``w_lat`` (or ``v_lat`` in the
parametrised E/I form), ``w_inh`` (two-population form), ``drive_norm_{scale,bias}``,
``loop_norm_{scale,bias}``.  Both take the loop options as one :class:`LoopOptions` value.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lateral_jax.core import ei, implicit, plan, recurrence
from lateral_jax.core.cell import Unrolled, fixed_point_map
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.params import LateralParams, NormParams, init_afferent_kernel


def add_contractor_penalty(module: nn.Module, fmap, fixed_point: jax.Array, weight: float, threshold: float) -> None:
    """Sows ``weight · contractor_penalty(fmap, fixed_point)`` (C-RBP, :func:`implicit.contractor_penalty`)
    into ``module``'s ``"penalties"`` collection, which the training loss adds up; nothing at weight 0."""
    if weight < 0:
        raise ValueError(f"contractor_weight={weight!r} must be >= 0.")
    if weight > 0:
        penalty = implicit.contractor_penalty(fmap, fixed_point, threshold=threshold)
        module.sow("penalties", "contractor", weight * penalty)


def _norm_params(module: nn.Module, prefix: str, kind: str, channels: int) -> NormParams | None:
    if kind == "none":
        return None
    return NormParams(
        module.param(f"{prefix}_scale", nn.initializers.ones, (channels,), jnp.float32),
        module.param(f"{prefix}_bias", nn.initializers.zeros, (channels,), jnp.float32),
    )


def _declare_lateral(
    module: nn.Module,
    channels: int,
    config: LateralConfig,
    *,
    num_steps: int,
    unshared: bool,
    ei_mode: str,
    excitatory_fraction: float,
) -> dict[str, Any]:
    """Declares the lateral parameters on ``module``; returns the effective ``w_lat``/``w_inh``/``loop_norm``."""

    def lateral_init(key, size=None):
        return recurrence.init_lateral_kernel(key, config, channels, size)

    if unshared:
        w_lat = module.param("w_lat", lambda key: jax.vmap(lateral_init)(jax.random.split(key, num_steps)))
    elif ei_mode == "parametrise":
        signs = ei.dale_signs(channels, excitatory_fraction)
        v_lat = module.param("v_lat", lambda key: ei.inverse_parametrise(lateral_init(key)))
        w_lat = ei.parametrise(v_lat, signs)
    else:
        w_lat = module.param("w_lat", lateral_init)
    w_inh = None
    if config.inhibitory_size is not None:
        w_inh = module.param("w_inh", lambda key: -jnp.abs(lateral_init(key, config.inhibitory_size)))
    return {"w_lat": w_lat, "w_inh": w_inh, "loop_norm": _norm_params(module, "loop_norm", config.loop_norm, channels)}


class LateralConv(nn.Module):
    """A convolution with lateral recurrence: ``recurrence.unroll`` as a Linen layer.

    Attributes:
      features: output channels C.
      num_steps: T lateral loops (0: a plain conv + norm + activation, no lateral parameters).
      config: :class:`~lateral_jax.core.config.LateralConfig`.
      loop: :class:`~lateral_jax.core.config.LoopOptions` (gradient mode, truncation, implicit
        solver, scan unrolling, remat chunks).
      ei_mode: only ``"parametrise"`` changes the parameters (``v_lat`` with fixed signs); the
        penalty modes act through the loss (:func:`lateral_jax.core.ei.ei_penalty`).
      excitatory_fraction: fraction of E channels for the parametrised form.
      unshared: the compute-matched control: one lateral kernel per loop, ``w_lat: [T, l, l, C, C]``.
      dtype: computation dtype (parameters stay float32).
      contractor_weight, contractor_threshold: in ``grad_mode="implicit"``, C-RBP's contraction
        penalty at the fixed point (:func:`lateral_jax.core.implicit.contractor_penalty` of
        ``F(a) = f(N_l(d + L(a)))``), times the weight, is sown into the ``"penalties"`` collection.
    """

    features: int
    num_steps: int = 4
    config: LateralConfig = LateralConfig.stable()
    loop: LoopOptions = LoopOptions()
    ei_mode: ei.EIMode = "none"
    excitatory_fraction: float = 0.8
    unshared: bool = False
    dtype: Any = jnp.float32
    contractor_weight: float = 0.0
    contractor_threshold: float = 0.9

    def __post_init__(self) -> None:
        plan.check(self.config, self.loop, unshared=self.unshared)  # a clash fails here, not when traced
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, return_states: bool = False) -> Unrolled:
        num_steps = recurrence.check_num_steps(self.num_steps)
        ei.check_mode(self.ei_mode)
        cfg = plan.resolve(self.config).config  # the backend's choices, made once
        cfg.check_channels(self.features)
        recurrence.check_input(x, x.shape[-1])
        w_ff = self.param("w_ff", lambda key: init_afferent_kernel(key, cfg, x.shape[-1], self.features))
        b_ff = self.param("b_ff", nn.initializers.zeros, (self.features,), jnp.float32)
        drive_norm = _norm_params(self, "drive_norm", cfg.drive_norm, self.features)
        x = x.astype(self.dtype)
        if num_steps == 0:
            loop_norm = _norm_params(self, "loop_norm", cfg.loop_norm, self.features)
            params = LateralParams(w_ff, b_ff, None, None, drive_norm, loop_norm)
            a0 = recurrence.initial_state(params, recurrence.afferent_drive(params, x, cfg), cfg)
            return Unrolled(a0, a0[None] if return_states else None, jnp.zeros((), jnp.float32))
        lateral = _declare_lateral(
            self,
            self.features,
            cfg,
            num_steps=num_steps,
            unshared=self.unshared,
            ei_mode=self.ei_mode,
            excitatory_fraction=self.excitatory_fraction,
        )
        params = LateralParams(w_ff, b_ff, drive_norm=drive_norm, **lateral)
        if self.unshared:
            return recurrence.unroll_unshared(params, x, config=cfg, loop=self.loop, return_states=return_states)
        if self.contractor_weight and self.loop.grad_mode == "implicit":
            drive = recurrence.afferent_drive(params, x, cfg)
            out = recurrence.recur(
                params, drive, num_steps=num_steps, config=cfg, loop=self.loop, return_states=return_states
            )
            fmap = functools.partial(fixed_point_map, params, drive, config=cfg)
            add_contractor_penalty(self, fmap, out.final, self.contractor_weight, self.contractor_threshold)
            return out
        return recurrence.unroll(
            params, x, num_steps=num_steps, config=cfg, loop=self.loop, return_states=return_states
        )


class LateralRecurrence(nn.Module):
    """``recurrence.recur`` as a Linen layer: lateral loops on a drive computed elsewhere."""

    num_steps: int = 4
    config: LateralConfig = LateralConfig.stable()
    loop: LoopOptions = LoopOptions()
    ei_mode: ei.EIMode = "none"
    excitatory_fraction: float = 0.8

    def __post_init__(self) -> None:
        plan.check(self.config, self.loop)
        super().__post_init__()

    @nn.compact
    def __call__(self, drive: jax.Array, *, return_states: bool = False) -> Unrolled:
        num_steps = recurrence.check_num_steps(self.num_steps)
        lateral = _declare_lateral(
            self,
            drive.shape[-1],
            self.config,
            num_steps=num_steps,
            unshared=False,
            ei_mode=self.ei_mode,
            excitatory_fraction=self.excitatory_fraction,
        )
        params = LateralParams(None, None, **lateral)
        return recurrence.recur(
            params, drive, num_steps=num_steps, config=self.config, loop=self.loop, return_states=return_states
        )


def module_params(variables: dict, *, excitatory_fraction: float = 0.8) -> LateralParams:
    """Converts one ``LateralConv``'s (or ``LateralRecurrence``'s: no ``w_ff``/``b_ff``) Linen params
    dict to the pure :class:`LateralParams`."""
    p = variables.get("params", variables)

    def norm(prefix):
        return NormParams(p[f"{prefix}_scale"], p[f"{prefix}_bias"]) if f"{prefix}_scale" in p else None

    if "v_lat" in p:
        channels = p["v_lat"].shape[-1]
        w_lat = ei.parametrise(p["v_lat"], ei.dale_signs(channels, excitatory_fraction))
    else:
        w_lat = p.get("w_lat")
    return LateralParams(p.get("w_ff"), p.get("b_ff"), w_lat, p.get("w_inh"), norm("drive_norm"), norm("loop_norm"))
