"""The horizontal gated recurrent unit (hGRU, Linsley et al., NeurIPS 2018) as a pure loop map.

A drive ``x`` (``[B, H, W, C]``, the feed-forward input, fixed over the loops) and a state ``h``
(C channels).  One loop ``h ← Φ(h; x)``::

    g₁ = σ(N₁(U₁ h + b₁))                           gain gate (U₁ a 1×1 convolution)
    c₁ = N₂(W_I ⋆ (g₁ ⊙ h))                         horizontal inhibition
    h₁ = f(x − (α ⊙ h + μ) ⊙ c₁)                    divisive (α) and subtractive (μ) inhibition
    g₂ = σ(N₃(U₂ h₁ + b₂))                          mix gate
    c₂ = N₄(W_E ⋆ h₁)                               horizontal excitation
    h̃ = f(κ ⊙ (h₁ + γ ⊙ c₂) + ω ⊙ (h₁ ⊙ γ ⊙ c₂))    linear (κ) and multiplicative (ω) excitation
    h ← (1 − g₂) ⊙ h + g₂ ⊙ h̃

``α, μ, κ, ω, γ`` are learned per-channel scalars, ``W_I, W_E`` ``[k, k, C, C]`` horizontal kernels
(``k`` large: 5–15), ``N₁..N₄`` optional GroupNorms, ``f`` the activation.  The state's fixed
point ``h* = Φ(h*)`` satisfies ``h* = h̃(h*)`` wherever ``g₂ > 0``.

Choices that are ours (the paper and its reference code leave them open or offer several):

* separate inhibitory and excitatory kernels by default (``shared_kernel=True``: one ``W`` for
  both stages, as in the 2018 equations); each kernel symmetric across channel pairs,
  ``W[:, :, i, j] = W[:, :, j, i]``, by parametrisation ``(V + Vᵀ) / 2`` (``symmetric=False``: free);
* the update keeps ``1 − g₂`` of the old state (the paper's form; some ports swap the roles);
* gate biases by "chronos" initialisation ``b₁ = log U(1, T − 1)``, ``b₂ = −b₁`` with
  ``T = chronos_steps``; ``α = 0.1, μ = 1, κ = 0.5, ω = 0.5, γ = 1`` at init;
* the horizontal norms ``N₂, N₄`` start with scale 0.1 (``horizontal_norm_scale``; the gate norms
  with 1), so each loop first nudges the drive rather than replacing it — the reference code's
  batch-norm scale γ = 0.1.  At unit scale the normalised horizontal terms are as large as the
  drive from the first loop on, and T = 8 loops of them erased the drive's signal in our
  diagnostics (``results/pathfinder_published/hgru_contour_diagnostic.jsonl``);
* the state starts at ``f(x)`` (``initial_state="drive"``) or at zero (``"zeros"``).

Every function is pure over the :class:`HGRUParams` pytree; the loops run on the library's own
machinery (:func:`run` in every gradient mode of :class:`~lateral_jax.core.config.LoopOptions`,
``"implicit"`` by :func:`lateral_jax.core.implicit.solve`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lateral_jax.core import implicit, loops, plan
from lateral_jax.core.cell import Unrolled, activate, normalise, relative_change
from lateral_jax.core.config import (
    ACTIVATIONS,
    NORMS,
    Activation,
    LoopOptions,
    Norm,
    check_choice,
    check_num_steps,
    check_odd_size,
    check_positive_int,
)
from lateral_jax.core.params import NormParams, init_norm
from lateral_jax.kernels.convolution import conv

InitialState = Literal["drive", "zeros"]
NORM_SITES = ("gain", "inhibition", "mix", "excitation")


@dataclasses.dataclass(frozen=True)
class HGRUConfig:
    """Static structure of one hGRU layer.

    Attributes:
      kernel_size: size k of the horizontal kernels (odd).
      shared_kernel: one kernel ``W`` for inhibition and excitation (the 2018 equations) instead
        of two.
      symmetric: kernels symmetric across channel pairs (``W[..., i, j] = W[..., j, i]``).
      activation: ``f``.
      gate_norm: ``"group"``/``"layer"`` norms ``N₁..N₄`` on the gate and horizontal terms, or
        ``"none"``.
      num_groups: groups of the ``"group"`` norms.
      initial_state: ``"drive"`` (``h(0) = f(x)``) or ``"zeros"``.
      chronos_steps: T of the chronos initialisation of the gate biases (≥ 2).
      kernel_init_scale: std of the horizontal kernels at init relative to He scaling.
      horizontal_norm_scale: initial scale of the horizontal terms' norms ``N₂, N₄``: the
        normalised inhibition and excitation start at this fraction of a unit-variance drive.
    """

    kernel_size: int = 7
    shared_kernel: bool = False
    symmetric: bool = True
    activation: Activation = "relu"
    gate_norm: Norm = "group"
    num_groups: int = 4
    initial_state: InitialState = "drive"
    chronos_steps: int = 8
    kernel_init_scale: float = 0.5
    horizontal_norm_scale: float = 0.1

    def __post_init__(self) -> None:
        check_odd_size("kernel_size", self.kernel_size)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("gate_norm", self.gate_norm, NORMS)
        check_choice("initial_state", self.initial_state, ("drive", "zeros"))
        check_positive_int("num_groups", self.num_groups)
        if not isinstance(self.chronos_steps, int) or self.chronos_steps < 2:
            raise ValueError(f"chronos_steps={self.chronos_steps!r} must be an int >= 2 (gate biases log U(1, T-1)).")
        if not self.kernel_init_scale >= 0:
            raise ValueError(f"kernel_init_scale={self.kernel_init_scale!r} must be >= 0.")
        if not 0 <= self.horizontal_norm_scale < math.inf:
            raise ValueError(f"horizontal_norm_scale={self.horizontal_norm_scale!r} must be a finite number >= 0.")

    def check_channels(self, channels: int) -> None:
        """Raises a ``ValueError`` when a group norm's ``num_groups`` does not divide ``channels``."""
        if self.gate_norm == "group" and channels % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide the hGRU's {channels} channels; pick a divisor "
                "or gate_norm='layer'."
            )


class HGRUParams(NamedTuple):
    """Parameters of one hGRU layer; ``w_excite`` is ``None`` with ``shared_kernel``.

    ``w_inhibit``/``w_excite`` are the raw kernels ``V`` (HWIO ``[k, k, C, C]``); the kernels the loop
    uses are :func:`kernels` (symmetrised when the config says so).  ``norms`` holds the four
    norms ``N₁..N₄`` (:data:`NORM_SITES`) or is ``None``.
    """

    w_inhibit: Float[Array, "k k c c"]
    w_excite: Float[Array, "k k c c"] | None
    u_gain: Float[Array, "c c"]
    b_gain: Float[Array, " c"]
    u_mix: Float[Array, "c c"]
    b_mix: Float[Array, " c"]
    alpha: Float[Array, " c"]
    mu: Float[Array, " c"]
    kappa: Float[Array, " c"]
    omega: Float[Array, " c"]
    gamma: Float[Array, " c"]
    norms: tuple[NormParams, NormParams, NormParams, NormParams] | None = None


def init_params(key: jax.Array, channels: int, config: HGRUConfig = HGRUConfig()) -> HGRUParams:
    """Initial :class:`HGRUParams` for ``channels`` channels (see the module docstring)."""
    check_positive_int("channels", channels)
    config.check_channels(channels)
    k_inh, k_exc, k_u1, k_u2, k_bias = jax.random.split(key, 5)
    k = config.kernel_size
    std = config.kernel_init_scale * math.sqrt(2.0 / (k * k * channels))

    def kernel(key):
        return std * jax.random.normal(key, (k, k, channels, channels), jnp.float32)

    def gate(key):
        return math.sqrt(1.0 / channels) * jax.random.normal(key, (channels, channels), jnp.float32)

    b_gain = jnp.log(jax.random.uniform(k_bias, (channels,), jnp.float32, 1.0, config.chronos_steps - 1.0))
    const = functools.partial(jnp.full, (channels,), dtype=jnp.float32)
    return HGRUParams(
        w_inhibit=kernel(k_inh),
        w_excite=None if config.shared_kernel else kernel(k_exc),
        u_gain=gate(k_u1),
        b_gain=b_gain,
        u_mix=gate(k_u2),
        b_mix=-b_gain,
        alpha=const(0.1),
        mu=const(1.0),
        kappa=const(0.5),
        omega=const(0.5),
        gamma=const(1.0),
        norms=None if config.gate_norm == "none" else _initial_norms(channels, config),
    )


def _initial_norms(channels: int, config: HGRUConfig) -> tuple[NormParams, ...]:
    """Unit-scale gate norms ``N₁, N₃``; horizontal norms ``N₂, N₄`` at ``horizontal_norm_scale``."""
    norms = []
    for site in NORM_SITES:
        norm = init_norm(channels)
        if site in ("inhibition", "excitation"):
            norm = norm._replace(scale=jnp.full((channels,), config.horizontal_norm_scale, jnp.float32))
        norms.append(norm)
    return tuple(norms)


def _symmetrise(w: jax.Array) -> jax.Array:
    return 0.5 * (w + jnp.swapaxes(w, 2, 3))


def kernels(params: HGRUParams, config: HGRUConfig) -> tuple[jax.Array, jax.Array]:
    """The inhibitory and excitatory kernels ``(W_I, W_E)`` the loop uses (equal with ``shared_kernel``)."""
    w_inhibit = params.w_inhibit
    w_excite = w_inhibit if params.w_excite is None else params.w_excite
    if config.symmetric:
        return _symmetrise(w_inhibit), _symmetrise(w_excite)
    return w_inhibit, w_excite


def signed_kernels(params: HGRUParams, config: HGRUConfig) -> dict[str, jax.Array]:
    """The horizontal connections with the sign they act with: ``{"excitatory": W_E, "inhibitory": −W_I}``.

    Inhibition enters as ``−(α h + μ) ⊙ (W_I ⋆ ·)`` and excitation as ``κ γ (W_E ⋆ ·)``, so with
    positive gains (their initial values) a presynaptic channel of ``W_I`` acts with the opposite
    sign of its weights.  The E/I tools of :mod:`lateral_jax.core.ei` take this dict: the mixed-sign
    penalty per presynaptic channel of each, or ``two_population_penalty(excitatory, inhibitory)``
    (``W_E ≥ 0`` and ``−W_I ≤ 0``: hGRU's architectural split made exact).
    """
    w_inhibit, w_excite = kernels(params, config)
    return {"excitatory": w_excite, "inhibitory": -w_inhibit}


def _norm(params: HGRUParams, site: int, x: jax.Array, config: HGRUConfig) -> jax.Array:
    if params.norms is None:
        return x
    return normalise(x, params.norms[site], config.gate_norm, config.num_groups)


def _one_by_one(x: jax.Array, u: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bhwc,cd->bhwd", x, u.astype(x.dtype)) + b.astype(x.dtype).reshape(1, 1, 1, -1)


def _per_channel(v: jax.Array, like: jax.Array) -> jax.Array:
    return v.astype(like.dtype).reshape(1, 1, 1, -1)


def loop_map(params: HGRUParams, drive: jax.Array, h: jax.Array, config: HGRUConfig) -> jax.Array:
    """One hGRU loop ``Φ(h; x)`` (the module docstring's seven lines)."""
    w_inhibit, w_excite = kernels(params, config)
    ch = functools.partial(_per_channel, like=h)
    g1 = jax.nn.sigmoid(_norm(params, 0, _one_by_one(h, params.u_gain, params.b_gain), config))
    c1 = _norm(params, 1, conv(g1 * h, w_inhibit), config)
    h1 = activate(drive - (ch(params.alpha) * h + ch(params.mu)) * c1, config.activation)
    g2 = jax.nn.sigmoid(_norm(params, 2, _one_by_one(h1, params.u_mix, params.b_mix), config))
    c2 = _norm(params, 3, conv(h1, w_excite), config)
    gc2 = ch(params.gamma) * c2
    h_tilde = activate(ch(params.kappa) * (h1 + gc2) + ch(params.omega) * (h1 * gc2), config.activation)
    return (1.0 - g2) * h + g2 * h_tilde


def initial_state(drive: jax.Array, config: HGRUConfig) -> jax.Array:
    """``h(0)``: ``f(x)`` or zeros (``config.initial_state``)."""
    return activate(drive, config.activation) if config.initial_state == "drive" else jnp.zeros_like(drive)


def check_params(params: HGRUParams, drive: jax.Array, config: HGRUConfig) -> None:
    """Raises a ``ValueError`` when the drive, the params and the config disagree."""
    if drive.ndim != 4:
        raise ValueError(f"drive must be NHWC [batch, height, width, channels]; got shape {tuple(drive.shape)}.")
    c, k = drive.shape[-1], config.kernel_size
    if tuple(params.w_inhibit.shape) != (k, k, c, c):
        raise ValueError(
            f"w_inhibit has shape {tuple(params.w_inhibit.shape)} but kernel_size={k} on a {c}-channel drive needs "
            f"{(k, k, c, c)}; the params, config and drive disagree."
        )
    if (params.w_excite is None) != config.shared_kernel:
        raise ValueError(
            f"params.w_excite must be None exactly when shared_kernel=True; got shared_kernel={config.shared_kernel} "
            f"and w_excite={'None' if params.w_excite is None else 'an array'}."
        )
    if (params.norms is None) != (config.gate_norm == "none"):
        raise ValueError(f"params.norms and gate_norm={config.gate_norm!r} disagree; initialise with the same config.")
    config.check_channels(c)


def run(
    params: HGRUParams,
    drive: Float[Array, "b h w c"],
    *,
    num_steps: int,
    config: HGRUConfig = HGRUConfig(),
    loop: LoopOptions = LoopOptions(),
    return_states: bool = False,
    backend: str | None = None,
) -> Unrolled:
    """T hGRU loops on ``drive`` in ``loop.grad_mode``; returns :class:`Unrolled` ``(h(T), h(0..T), residual)``.

    ``"full"``, ``"remat"`` (√T segments under ``jax.checkpoint``) and ``"truncated"`` run the
    same loop as :func:`lateral_jax.core.loops.run_loops`; ``"implicit"`` returns the fixed point
    ``h* = Φ(h*)`` from ``h(0)`` (``num_steps`` ignored) with implicit-function-theorem gradients.
    ``backend``: the platform to plan the loops for (:func:`lateral_jax.core.plan.resolve`).
    """
    num_steps = check_num_steps(num_steps)
    check_params(params, drive, config)
    fmap = functools.partial(loop_map, params, drive, config=config)
    h0 = initial_state(drive, config)
    if loop.grad_mode == "implicit":
        if return_states:
            raise ValueError("grad_mode='implicit' keeps no per-loop states; pass return_states=False.")
        h_star = implicit.solve(fmap, h0, loop.implicit_tol, loop.implicit_max_steps, loop.batch_axes)
        h_sg = jax.lax.stop_gradient(h_star)
        frozen = functools.partial(loop_map, jax.lax.stop_gradient(params), jax.lax.stop_gradient(drive), config=config)
        return Unrolled(h_star, None, implicit.global_relative_change(frozen(h_sg), h_sg, loop.batch_axes))

    def step_fn(h, _):
        new = fmap(h)
        return new, new

    run_plan = plan.resolve(backend=backend)
    unroll = run_plan.scan_unroll(num_steps, loop)
    outer = run_plan.remat_outer_unroll(loop) if loop.scan_unroll == "auto" else 1  # explicit: outer rolled
    run_on = functools.partial(
        loops.run_loops,
        step_fn,
        xs=None,
        return_states=return_states,
        scan_unroll=unroll,
        remat=loop.grad_mode == "remat",
        remat_outer_unroll=outer,
        python_loops=run_plan.python_loops,
    )
    head = max(num_steps - loop.truncate_steps, 0) if loop.grad_mode == "truncated" else 0
    if head == 0:
        final, states, before = run_on(h0, num_steps=num_steps)
        return Unrolled(final, states, relative_change(final, before))
    h_head, head_states, _ = run_on(h0, num_steps=head)
    final, tail_states, before = run_on(jax.lax.stop_gradient(h_head), num_steps=num_steps - head)
    states = None
    if return_states:
        states = jnp.concatenate([jax.lax.stop_gradient(head_states), tail_states[1:]], axis=0)
    return Unrolled(final, states, relative_change(final, before))
