"""Flax NNX versions of the layers and models: thin wrappers over the same pure core.

Each NNX module holds its parameters as ``nnx.Param`` attributes with the names and nesting of
the Linen module it mirrors (:mod:`lateral_jax.core.layers`, :mod:`lateral_jax.core.models`; the
ResNet's twin is :mod:`lateral_jax.core.nnx_resnet`, the hGRU's :mod:`lateral_jax.core.nnx_hgru`), and
its ``__call__`` runs the same pure functions (:func:`lateral_jax.core.recurrence.unroll`,
:func:`~lateral_jax.core.recurrence.recur`, :func:`lateral_jax.core.pooling.max_pool`).  So the
parameters of a Linen model (``variables["params"]``), loaded with :func:`load_params`, give the same logits, states,
residuals and gradients (tested), and :func:`params_dict` gives the Linen-style dict back — the
form :mod:`lateral_jax.core.ei` (penalties, diagnostics) and the checkpoints use.

NNX modules are built eagerly, so they take the input channels (``in_features``) and an
``nnx.Rngs``; the rest of the configuration is that of the Linen module::

    model = nnx_models.LCCNN(in_features=3, widths=(32, 64), num_steps=4, rngs=nnx.Rngs(0))
    out = model(images)                     # ModelOutput(logits, states, residuals)
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lateral_jax.core import dynamics, ei, plan, pooling, recurrence
from lateral_jax.core.cell import Unrolled, check_input
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.models import ModelOutput, Record, _check_widths, _wants, weighted_ei_penalty
from lateral_jax.core.params import LateralParams, NormParams, init_afferent_kernel


def params_dict(module: nnx.Module) -> dict:
    """The module's parameters as the nested dict of its Linen twin (``variables["params"]``)."""
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def load_params(module: nnx.Module, params: dict) -> None:
    """Sets the module's parameters from a Linen-style dict (e.g. a Linen model's ``params``)."""
    state = nnx.state(module, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(module, state)


def _declare_norm(module: nnx.Module, prefix: str, kind: str, channels: int) -> None:
    """``<prefix>_scale`` (ones) and ``<prefix>_bias`` (zeros) unless ``kind == "none"`` (as Linen)."""
    if kind != "none":
        setattr(module, f"{prefix}_scale", nnx.Param(jnp.ones((channels,), jnp.float32)))
        setattr(module, f"{prefix}_bias", nnx.Param(jnp.zeros((channels,), jnp.float32)))


def _read_norm(module: nnx.Module, prefix: str) -> NormParams | None:
    scale = getattr(module, f"{prefix}_scale", None)
    return None if scale is None else NormParams(scale[...], getattr(module, f"{prefix}_bias")[...])


class _LateralParams(nnx.Module):
    """The lateral part of a layer: ``w_lat`` (or ``v_lat``), ``w_inh``, the loop norm."""

    def __init__(self, channels, config, *, num_steps, unshared, ei_mode, excitatory_fraction, rngs):
        ei.check_mode(ei_mode)
        self.lateral_config, self.ei_mode, self.excitatory_fraction = config, ei_mode, excitatory_fraction
        key = rngs.params()
        if unshared:
            keys = jax.random.split(key, num_steps)
            self.w_lat = nnx.Param(jax.vmap(lambda k: recurrence.init_lateral_kernel(k, config, channels))(keys))
        elif ei_mode == "parametrise":
            self.v_lat = nnx.Param(ei.inverse_parametrise(recurrence.init_lateral_kernel(key, config, channels)))
        else:
            self.w_lat = nnx.Param(recurrence.init_lateral_kernel(key, config, channels))
        if config.inhibitory_size is not None:
            w_inh = recurrence.init_lateral_kernel(rngs.params(), config, channels, config.inhibitory_size)
            self.w_inh = nnx.Param(-jnp.abs(w_inh))
        _declare_norm(self, "loop_norm", config.loop_norm, channels)

    def lateral(self) -> dict[str, Any]:
        """``w_lat`` (sign-parametrised in that E/I mode), ``w_inh``, ``loop_norm`` as arrays."""
        if self.ei_mode == "parametrise" and hasattr(self, "v_lat"):
            v = self.v_lat[...]
            w_lat = ei.parametrise(v, ei.dale_signs(v.shape[-1], self.excitatory_fraction))
        else:
            w_lat = self.w_lat[...]
        w_inh = self.w_inh[...] if hasattr(self, "w_inh") else None
        return {"w_lat": w_lat, "w_inh": w_inh, "loop_norm": _read_norm(self, "loop_norm")}


class LateralConv(_LateralParams):
    """NNX twin of :class:`lateral_jax.core.layers.LateralConv`: ``recurrence.unroll`` as a layer.

    Args:
      in_features: input channels.
      features: output channels C.
      num_steps: T lateral loops (0: a plain conv + norm + activation, no lateral parameters).
      config: :class:`~lateral_jax.core.config.LateralConfig` (kernels, norms, activation, leak).
      loop: :class:`~lateral_jax.core.config.LoopOptions` (gradient mode, truncation, implicit
        solver, unrolling, remat chunks).
      ei_mode: only ``"parametrise"`` changes the parameters; the penalty modes act through the
        loss (:func:`lateral_jax.core.ei.ei_penalty`).
      excitatory_fraction: fraction of E channels of the parametrised form.
      unshared: the compute-matched control, one lateral kernel per loop.
      dtype: computation dtype (parameters stay float32).
      rngs: the ``nnx.Rngs`` the parameters are drawn from.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        num_steps: int = 4,
        config: LateralConfig = LateralConfig.stable(),
        loop: LoopOptions = LoopOptions(),
        ei_mode: ei.EIMode = "none",
        excitatory_fraction: float = 0.8,
        unshared: bool = False,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.num_steps = recurrence.check_num_steps(num_steps)
        config.check_channels(features)
        plan.check(config, loop, unshared=unshared)
        self.in_features, self.loop, self.unshared, self.dtype = in_features, loop, unshared, dtype
        self.w_ff = nnx.Param(init_afferent_kernel(rngs.params(), config, in_features, features))
        self.b_ff = nnx.Param(jnp.zeros((features,), jnp.float32))
        _declare_norm(self, "drive_norm", config.drive_norm, features)
        if self.num_steps == 0:  # no lateral kernels; the loop norm still acts on a(0)
            ei.check_mode(ei_mode)
            self.lateral_config, self.ei_mode, self.excitatory_fraction = config, ei_mode, excitatory_fraction
            _declare_norm(self, "loop_norm", config.loop_norm, features)
            return
        super().__init__(
            features,
            config,
            num_steps=self.num_steps,
            unshared=unshared,
            ei_mode=ei_mode,
            excitatory_fraction=excitatory_fraction,
            rngs=rngs,
        )

    def layer_params(self) -> LateralParams:
        """The pure :class:`LateralParams` of this layer (what the core functions take)."""
        drive_norm = _read_norm(self, "drive_norm")
        if self.num_steps == 0:
            return LateralParams(self.w_ff[...], self.b_ff[...], None, None, drive_norm, _read_norm(self, "loop_norm"))
        return LateralParams(self.w_ff[...], self.b_ff[...], drive_norm=drive_norm, **self.lateral())

    def spectral_radius(self, x: jax.Array, *, num_iters: int = 40) -> jax.Array:
        """``ρ(J_S(a(T)))`` per example of this layer's loop at its final state on input ``x`` (as
        :func:`lateral_jax.core.dynamics.layer_spectral_radii` for Linen; not for the unshared control)."""
        if self.num_steps == 0 or self.unshared:
            raise ValueError("spectral_radius needs a weight-shared layer with num_steps > 0 (one loop map).")
        params, cfg = self.layer_params(), plan.resolve(self.lateral_config).config
        drive = recurrence.afferent_drive(params, x.astype(self.dtype), cfg)
        state = self(x).final
        return dynamics.spectral_radius(params, drive, state, config=cfg, num_iters=num_iters)

    def __call__(self, x: jax.Array, *, return_states: bool = False) -> Unrolled:
        check_input(x, self.in_features)
        params, cfg = self.layer_params(), plan.resolve(self.lateral_config).config
        x = x.astype(self.dtype)
        if self.num_steps == 0:
            a0 = recurrence.initial_state(params, recurrence.afferent_drive(params, x, cfg), cfg)
            return Unrolled(a0, a0[None] if return_states else None, jnp.zeros((), jnp.float32))
        if self.unshared:
            return recurrence.unroll_unshared(params, x, config=cfg, loop=self.loop, return_states=return_states)
        return recurrence.unroll(
            params, x, num_steps=self.num_steps, config=cfg, loop=self.loop, return_states=return_states
        )


class LateralRecurrence(_LateralParams):
    """NNX twin of :class:`lateral_jax.core.layers.LateralRecurrence`: loops on a given drive.

    Args:
      channels: channels C of the drive and the state.
      num_steps, config, loop, ei_mode, excitatory_fraction, rngs: as :class:`LateralConv`.
    """

    def __init__(
        self,
        channels: int,
        *,
        num_steps: int = 4,
        config: LateralConfig = LateralConfig.stable(),
        loop: LoopOptions = LoopOptions(),
        ei_mode: ei.EIMode = "none",
        excitatory_fraction: float = 0.8,
        rngs: nnx.Rngs,
    ):
        self.num_steps, self.loop = recurrence.check_num_steps(num_steps), loop
        plan.check(config, loop)
        super().__init__(
            channels,
            config,
            num_steps=self.num_steps,
            unshared=False,
            ei_mode=ei_mode,
            excitatory_fraction=excitatory_fraction,
            rngs=rngs,
        )

    def layer_params(self) -> LateralParams:
        """The pure :class:`LateralParams` of this layer (no ``w_ff``/``b_ff``: it is given its drive)."""
        return LateralParams(None, None, **self.lateral())

    def spectral_radius(self, drive: jax.Array, *, num_iters: int = 40) -> jax.Array:
        """``ρ(J_S(a(T)))`` per example of this layer's loop at its final state on ``drive`` (as
        :func:`lateral_jax.core.dynamics.layer_spectral_radii` for Linen)."""
        state = self(drive).final
        return dynamics.spectral_radius(
            self.layer_params(), drive, state, config=self.lateral_config, num_iters=num_iters
        )

    def __call__(self, drive: jax.Array, *, return_states: bool = False) -> Unrolled:
        params = self.layer_params()
        return recurrence.recur(
            params, drive, num_steps=self.num_steps, config=self.lateral_config, loop=self.loop,
            return_states=return_states,
        )  # fmt: skip


def _classify(head: nnx.Linear, h: jax.Array) -> jax.Array:
    """Global average pool and the dense ``head``; float32 logits (as in the Linen models)."""
    return head(h.mean(axis=(1, 2))).astype(jnp.float32)


def _collect(out: Unrolled, name: str, record: Record, states: dict, residuals: dict) -> jax.Array:
    if out.states is not None and _wants(record, name):
        states[name] = out.states
    residuals[name] = out.residual
    return out.final


class LateralCNN(nnx.Module):
    """NNX twin of :class:`lateral_jax.core.models.LateralCNN`; ``FCNN``, ``LCCNN``, ``LCEICNN``
    and ``UnsharedCNN`` below set the same defaults as their Linen twins.

    Args:
      in_features: input channels (1 for MNIST, 3 for CIFAR-10).
      widths: channels of each conv stage (each stage halves the resolution).
      num_classes: outputs of the dense head.
      num_steps: T lateral loops in each lateral layer (``None``: the class default; 0: the F-CNN).
      lateral: :class:`~lateral_jax.core.config.LateralConfig`.
      lateral_layers: indices of the stages with lateral connections (``None``: all).
      loop: :class:`~lateral_jax.core.config.LoopOptions` of every lateral layer.
      ei_mode, ei_weight, excitatory_fraction: E/I separation (``None``: the class default); the
        loss term is :meth:`ei_penalty` (``ei_weight · L_EI``).
      unshared: the compute-matched control (``None``: the class default).
      dtype: computation dtype (parameters and logits stay float32).
      rngs: the ``nnx.Rngs`` the parameters are drawn from.
    """

    default_num_steps, default_ei_mode, default_ei_weight, default_unshared = 4, "none", 0.0, False

    def __init__(
        self,
        in_features: int,
        *,
        widths: Sequence[int] = (32, 64, 128),
        num_classes: int = 10,
        num_steps: int | None = None,
        lateral: LateralConfig = LateralConfig.stable(),
        lateral_layers: Sequence[int] | None = None,
        loop: LoopOptions = LoopOptions(),
        ei_mode: ei.EIMode | None = None,
        ei_weight: float | None = None,
        excitatory_fraction: float = 0.8,
        unshared: bool | None = None,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_widths(widths)
        pick = lambda value, default: default if value is None else value  # noqa: E731
        self.num_steps = pick(num_steps, self.default_num_steps)
        self.ei_mode, self.ei_weight = pick(ei_mode, self.default_ei_mode), pick(ei_weight, self.default_ei_weight)
        self.excitatory_fraction, self.widths = excitatory_fraction, tuple(widths)
        if self.ei_weight < 0:
            raise ValueError(f"ei_weight={self.ei_weight!r} must be >= 0 (it is λ_EI in CE + λ_EI·L_EI).")
        channels = in_features
        for i, width in enumerate(self.widths):
            lateral_here = lateral_layers is None or i in lateral_layers
            layer = LateralConv(
                channels,
                width,
                num_steps=self.num_steps if lateral_here else 0,
                config=lateral,
                loop=loop,
                ei_mode=self.ei_mode,
                excitatory_fraction=excitatory_fraction,
                unshared=pick(unshared, self.default_unshared),
                dtype=dtype,
                rngs=rngs,
            )
            setattr(self, f"lateral_{i}", layer)
            channels = width
        self.head = nnx.Linear(channels, num_classes, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, record: Record = False) -> ModelOutput:
        if x.ndim != 4:
            raise ValueError(f"input must be NHWC [batch, height, width, channels]; got shape {tuple(x.shape)}.")
        states, residuals, h = {}, {}, x
        for i in range(len(self.widths)):
            name = f"lateral_{i}"
            out = getattr(self, name)(h, return_states=_wants(record, name))
            h = pooling.max_pool(_collect(out, name, record, states, residuals), 2)
        return ModelOutput(_classify(self.head, h), states, residuals)

    def ei_penalty(self) -> jax.Array:
        """``ei_weight · L_EI`` of the current parameters."""
        return weighted_ei_penalty(self, params_dict(self))


class FCNN(LateralCNN):
    """The feed-forward baseline (T = 0)."""

    default_num_steps = 0


class LCCNN(LateralCNN):
    """T = 4 weight-shared lateral loops in every conv layer."""


class LCEICNN(LateralCNN):
    """LC-CNN plus the mixed-sign E/I penalty, λ_EI = 1e-3."""

    default_ei_mode, default_ei_weight = "mixed_sign", 1e-3


class UnsharedCNN(LateralCNN):
    """Compute-matched control: one lateral kernel per loop."""

    default_unshared = True


__all__ = [
    "FCNN",
    "LCCNN",
    "LCEICNN",
    "LateralCNN",
    "LateralConv",
    "LateralRecurrence",
    "UnsharedCNN",
    "load_params",
    "params_dict",
]
