"""Excitatory/inhibitory (E/I) separation of lateral kernels: Dale's principle per channel.

A presynaptic unit has one sign for all its outgoing connections.  In a lateral kernel ``W`` with
layout HWIO, presynaptic channel ``j`` owns the slice ``W[:, :, j, :]`` (for a depthwise kernel
``[l, l, 1, C]``, channel ``j`` owns ``W[:, :, 0, j]``).  With

    P_j = Σ relu(W[:, :, j, :])        N_j = Σ relu(-W[:, :, j, :])

the penalties are

* mixed-sign (the paper's loss):   ``L = Σ_j min(P_j, N_j)``; smooth: ``Σ_j P_j N_j / (P_j + N_j + ε)``.
  Zero iff every channel is purely E or purely I; the E:I ratio emerges.
* fixed assignment:                ``L = Σ_{j∈E} N_j + Σ_{j∈I} P_j`` with the first
  ``round(f_E · C)`` channels excitatory (:func:`dale_signs`).
* two-population:                  ``L = Σ relu(-W_E) + Σ relu(W_I)`` for separate E and I kernels.

Two hard-constraint alternatives: the *parametrisation* ``W = s_j · softplus(V)`` with fixed signs
``s_j`` (:func:`parametrise`), and the *projection* :func:`project_dale`, an optax transform that
sets every wrong-sign weight to 0 after each update.  Every function works on a single kernel or
on any pytree of kernels; :func:`lateral_kernels` picks the lateral kernels out of a model's
params by name (``w_lat``, ``w_inh``, ``v_lat``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

EIMode = Literal[
    "none", "mixed_sign", "mixed_sign_smooth", "fixed_assignment", "two_population", "parametrise", "project"
]
EI_MODES = ("none", "mixed_sign", "mixed_sign_smooth", "fixed_assignment", "two_population", "parametrise", "project")

#: Param names that hold lateral kernels: the (excitatory) lateral kernel, the inhibitory kernel of
#: the two-population form, and the raw magnitude of the parametrised form.
LATERAL_NAMES = ("w_lat", "w_inh", "v_lat")


def check_mode(mode: object) -> None:
    if mode not in EI_MODES:
        raise ValueError(f"ei_mode={mode!r} is not supported; choose one of {', '.join(map(repr, EI_MODES))}.")


def check_fraction(excitatory_fraction: object) -> float:
    if isinstance(excitatory_fraction, bool) or not isinstance(excitatory_fraction, (int, float)):
        raise ValueError(f"excitatory_fraction={excitatory_fraction!r} must be a number in [0, 1].")
    if not 0.0 <= float(excitatory_fraction) <= 1.0:
        raise ValueError(
            f"excitatory_fraction={excitatory_fraction!r} is outside [0, 1]; it is the fraction of "
            "presynaptic channels that are excitatory (cortex: about 0.8)."
        )
    return float(excitatory_fraction)


def _presynaptic_axis(w: jax.Array) -> int:
    if w.ndim != 4:
        raise ValueError(f"a lateral kernel must be HWIO (rank 4); got shape {tuple(w.shape)}.")
    return -1 if w.shape[2] == 1 else 2


def _sum_all_but(x: jax.Array, axis: int) -> jax.Array:
    axis = axis % x.ndim
    return x.sum(axis=tuple(i for i in range(x.ndim) if i != axis))


def channel_mass(w: Float[Array, "l l ci co"]) -> tuple[jax.Array, jax.Array]:
    """``(P, N)``: the positive and negative weight mass of each presynaptic channel, ``[C]`` each."""
    axis = _presynaptic_axis(w)
    return _sum_all_but(jax.nn.relu(w), axis), _sum_all_but(jax.nn.relu(-w), axis)


def dale_signs(num_channels: int, excitatory_fraction: float) -> jax.Array:
    """``+1`` for the first ``round(f_E · C)`` channels (excitatory), ``-1`` for the rest."""
    num_excitatory = round(check_fraction(excitatory_fraction) * num_channels)
    return jnp.where(jnp.arange(num_channels) < num_excitatory, 1.0, -1.0).astype(jnp.float32)


def _leaves(kernels: Any) -> list[jax.Array]:
    return jax.tree_util.tree_leaves(kernels)


def mixed_sign_penalty(kernels: Any, *, smooth: bool = False, eps: float = 1e-8) -> jax.Array:
    """``Σ_kernels Σ_j min(P_j, N_j)`` (or the smooth ``P_j N_j / (P_j + N_j + ε)``)."""
    total = jnp.zeros((), jnp.float32)
    for w in _leaves(kernels):
        p, n = channel_mass(w.astype(jnp.float32))
        total = total + (jnp.sum(p * n / (p + n + eps)) if smooth else jnp.sum(jnp.minimum(p, n)))
    return total


def fixed_assignment_penalty(kernels: Any, *, excitatory_fraction: float) -> jax.Array:
    """``Σ_{j∈E} N_j + Σ_{j∈I} P_j`` with E = the first ``round(f_E · C)`` channels."""
    total = jnp.zeros((), jnp.float32)
    for w in _leaves(kernels):
        p, n = channel_mass(w.astype(jnp.float32))
        signs = dale_signs(p.shape[0], excitatory_fraction)
        total = total + jnp.sum(jnp.where(signs > 0, n, p))
    return total


def two_population_penalty(excitatory: Any, inhibitory: Any) -> jax.Array:
    """``Σ relu(-W_E) + Σ relu(W_I)`` over two pytrees of kernels."""
    neg = sum((jnp.sum(jax.nn.relu(-w.astype(jnp.float32))) for w in _leaves(excitatory)), jnp.zeros(()))
    pos = sum((jnp.sum(jax.nn.relu(w.astype(jnp.float32))) for w in _leaves(inhibitory)), jnp.zeros(()))
    return neg + pos


def _broadcast_signs(signs: jax.Array, w: jax.Array) -> jax.Array:
    shape = [1] * w.ndim
    shape[_presynaptic_axis(w)] = signs.shape[0]
    return signs.reshape(shape)


def parametrise(raw: Float[Array, "l l ci co"], signs: Float[Array, " c"]) -> jax.Array:
    """``W = s_j · softplus(V)``: every weight of presynaptic channel j has the sign ``s_j``."""
    return _broadcast_signs(signs, raw) * jax.nn.softplus(raw)


def inverse_parametrise(w: Float[Array, "l l ci co"], *, floor: float = 1e-6) -> jax.Array:
    """Raw ``V`` with ``softplus(V) = max(|W|, floor)`` (to start the parametrised form from a kernel)."""
    mag = jnp.maximum(jnp.abs(w), floor)
    return mag + jnp.log(-jnp.expm1(-mag))


def _key_name(entry: Any) -> str | None:
    for attr in ("key", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return None


def lateral_kernels(params: Any, *, excitatory_fraction: float = 0.8) -> dict[str, jax.Array]:
    """The effective lateral kernels of a params pytree, keyed by their path.

    Leaves named ``w_lat``/``w_inh`` are returned as they are; a raw ``v_lat`` (parametrised form)
    becomes ``s_j · softplus(v_lat)`` with :func:`dale_signs`.  ``None`` leaves are skipped.
    """
    found: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _key_name(path[-1]) if path else None
        if name not in LATERAL_NAMES or leaf is None:
            continue
        if leaf.ndim == 5:  # the unshared control stores [T, l, l, C, C]; treat each step's kernel
            for t in range(leaf.shape[0]):
                found[f"{jax.tree_util.keystr(path)}[{t}]"] = leaf[t]
            continue
        if name == "v_lat":
            channels = leaf.shape[_presynaptic_axis(leaf)]
            leaf = parametrise(leaf, dale_signs(channels, excitatory_fraction))
        found[jax.tree_util.keystr(path)] = leaf
    return found


def ei_penalty(params: Any, *, mode: EIMode, excitatory_fraction: float = 0.8) -> jax.Array:
    """The E/I loss term of ``mode`` over the lateral kernels of ``params`` (0 for hard-constraint modes).

    ``"two_population"`` pushes ``w_lat`` (excitatory) ≥ 0 and ``w_inh`` ≤ 0.  ``"parametrise"`` and
    ``"project"`` enforce the signs exactly and add no loss; ``"none"`` adds none.
    """
    check_mode(mode)
    check_fraction(excitatory_fraction)
    kernels = lateral_kernels(params, excitatory_fraction=excitatory_fraction)
    if mode in ("none", "parametrise", "project"):
        return jnp.zeros((), jnp.float32)
    if mode == "mixed_sign":
        return mixed_sign_penalty(kernels)
    if mode == "mixed_sign_smooth":
        return mixed_sign_penalty(kernels, smooth=True)
    if mode == "fixed_assignment":
        return fixed_assignment_penalty(kernels, excitatory_fraction=excitatory_fraction)
    exc = [w for path, w in kernels.items() if "w_inh" not in path]
    inh = [w for path, w in kernels.items() if "w_inh" in path]
    if not inh:
        raise ValueError(
            "ei_mode='two_population' needs inhibitory kernels w_inh: set LateralConfig(inhibitory_size=...)."
        )
    return two_population_penalty(exc, inh)


# --------------------------------------------------------------------------------------------
# Projection (an optax transform)
# --------------------------------------------------------------------------------------------


def _target_signs(w: jax.Array, name: str, excitatory_fraction: float | None) -> jax.Array:
    """Per-weight target sign (+1/-1) of kernel ``w`` named ``name``."""
    if name == "w_inh":
        return -jnp.ones_like(w)
    if excitatory_fraction is None:
        p, n = channel_mass(w)
        signs = jnp.where(p >= n, 1.0, -1.0)
    else:
        signs = dale_signs(w.shape[_presynaptic_axis(w)], excitatory_fraction)
    return jnp.broadcast_to(_broadcast_signs(signs.astype(w.dtype), w), w.shape)


def project_to_signs(w: jax.Array, signs: jax.Array) -> jax.Array:
    """Sets every weight whose sign disagrees with ``signs`` (broadcastable) to 0."""
    return jnp.where(w * signs >= 0, w, jnp.zeros_like(w))


def project_dale(
    *, excitatory_fraction: float | None = None, is_lateral: Callable[[str], bool] | None = None
) -> optax.GradientTransformation:
    """An optax transform that zeroes every wrong-sign lateral weight after the update.

    Chain it last: ``optax.chain(optimizer, project_dale())``.  It rewrites the updates so that
    ``params + updates`` has no weight of the wrong sign.  The sign of presynaptic channel ``j`` is
    fixed (:func:`dale_signs`) when ``excitatory_fraction`` is given, otherwise it is the channel's
    dominant sign after the update (``P_j ≥ N_j`` → excitatory).  ``w_inh`` kernels are always
    inhibitory.  ``is_lateral(name)`` selects leaves by their last path name (default:
    ``w_lat``/``w_inh``).
    """
    if excitatory_fraction is not None:
        check_fraction(excitatory_fraction)
    select = is_lateral or (lambda name: name in ("w_lat", "w_inh"))

    def project_updates(updates, params):
        if params is None:
            raise ValueError("project_dale needs params: call optimizer.update(grads, state, params).")

        def project(path, update, param):
            name = _key_name(path[-1]) if path else None
            if update is None or not select(name) or update.ndim != 4:
                return update
            new = param + update
            return project_to_signs(new, _target_signs(new, name, excitatory_fraction)) - param

        return jax.tree_util.tree_map_with_path(project, updates, params)

    return optax.stateless(project_updates)


# --------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------


class EIDiagnostics(NamedTuple):
    """E/I summary of one lateral kernel.

    Attributes:
      purity: per-channel sign purity ``|P_j - N_j| / (P_j + N_j)`` (1 = pure E or I), ``[C]``.
      excitatory: per-channel bool, ``P_j > N_j``.
      fraction_excitatory: fraction of channels that are excitatory.
      balance: E/I weight balance ``Σ P / Σ N``.
    """

    purity: jax.Array
    excitatory: jax.Array
    fraction_excitatory: jax.Array
    balance: jax.Array


def diagnose(w: Float[Array, "l l ci co"], *, eps: float = 1e-12) -> EIDiagnostics:
    """Per-channel sign purity, E flags, fraction of E channels and E/I balance of one kernel."""
    p, n = channel_mass(w.astype(jnp.float32))
    purity = jnp.abs(p - n) / jnp.maximum(p + n, eps)
    excitatory = p > n
    return EIDiagnostics(purity, excitatory, excitatory.mean(), p.sum() / jnp.maximum(n.sum(), eps))


def diagnostics(params: Any, *, excitatory_fraction: float = 0.8) -> dict[str, dict[str, jax.Array]]:
    """Scalar E/I diagnostics of every lateral kernel of ``params``: mean and min purity,
    fraction of E channels, balance; keyed by the kernel's path."""
    out = {}
    for path, w in lateral_kernels(params, excitatory_fraction=excitatory_fraction).items():
        d = diagnose(w)
        out[path] = {
            "purity_mean": d.purity.mean(),
            "purity_min": d.purity.min(),
            "fraction_excitatory": d.fraction_excitatory,
            "balance": d.balance,
        }
    return out
