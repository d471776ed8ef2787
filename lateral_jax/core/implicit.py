"""The ``"implicit"`` gradient mode: iterate the loop to a fixed point, differentiate it implicitly.

The fixed point ``a* = F(θ, a*)`` with ``F(a) = f(N_l(d + L(a)))`` is found by iteration from
``a(0)``.  By the implicit-function theorem its derivatives need no stored iterates::

    ȧ* = (I - ∂F/∂a)⁻¹ ∂F/∂θ θ̇                       (forward mode)
    dL/dθ = uᵀ ∂F/∂θ(a*),   u = g + (∂F/∂a(a*))ᵀ u      (reverse mode)

and both linear systems are solved by the same fixed-point iteration (it converges when ``F`` is
contractive), through ``jax.lax.custom_root`` and ``jax.lax.custom_linear_solve``, so ``jvp``,
``jacfwd``, ``grad`` and Hessian-vector products all work.  Memory is O(1) in the number of
iterations.  At a converged fixed point the gradient equals that
of a long unroll; when the iteration does not converge (``residual`` well above ``tol``) it does not.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lateral_jax.core.cell import fixed_point_map, initial_state, relative_change
from lateral_jax.core.config import LateralConfig
from lateral_jax.core.params import LateralParams


def varying_axes(x: jax.Array) -> tuple[str, ...]:
    """The mesh axes along which ``x`` varies inside ``jax.shard_map`` (``()`` outside it)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; older releases call it ``vma``
    axes = getattr(manual, "varying", None) if manual is not None else getattr(aval, "vma", None)
    return tuple(sorted(axes or ()))


def global_relative_change(new: jax.Array, old: jax.Array, batch_axes: tuple[str, ...] = ()) -> jax.Array:
    """:func:`~lateral_jax.core.cell.relative_change` of the whole batch: the squared norms are
    summed (``psum``) over the axes the batch is split along — those ``new`` varies over inside
    ``jax.shard_map``, and ``batch_axes`` (``jax.pmap``'s ``axis_name``, which array types do not
    carry) — so every device gets the number one device gets for the whole batch, and the
    iteration stops at the same step on every device."""
    axes = tuple(sorted(set(varying_axes(new)) | set(batch_axes)))
    if not axes:
        return relative_change(new, old)
    dtype = jnp.promote_types(new.dtype, jnp.float32)
    new32, old32 = new.astype(dtype), old.astype(dtype)
    diff = jax.lax.psum(jnp.sum(jnp.square(new32 - old32)), axes)
    norm = jax.lax.psum(jnp.sum(jnp.square(new32)), axes)
    return jnp.sqrt(diff) / jnp.maximum(jnp.sqrt(norm), 1e-12)


def iterate(
    fn, x0: jax.Array, tol: float, max_steps: int, batch_axes: tuple[str, ...] = ()
) -> tuple[jax.Array, jax.Array]:
    """Fixed-point iteration ``x ← fn(x)`` until the relative change < tol; returns (x, change).

    The change is the whole batch's (:func:`global_relative_change`), also under ``jax.shard_map``
    and, given ``batch_axes``, ``jax.pmap``.
    """

    def cond(carry):
        i, _, change = carry
        return jnp.logical_and(i < max_steps, change >= tol)

    def body(carry):
        i, x, _ = carry
        new = fn(x)
        return i + 1, new, global_relative_change(new, x, batch_axes)

    start = jnp.array(jnp.inf, jnp.promote_types(x0.dtype, jnp.float32))
    _, x, change = jax.lax.while_loop(cond, body, (jnp.array(0), x0, start))
    return x, change


def solve(
    fmap: Callable[[jax.Array], jax.Array],
    x0: jax.Array,
    tol: float,
    max_steps: int,
    batch_axes: tuple[str, ...] = (),
) -> jax.Array:
    """``x*`` with ``x* = fmap(x*)`` from ``x0``, differentiable in both modes by the implicit-function
    theorem (``fmap`` closes over the parameters it depends on; any contractive loop map works).

    ``jax.lax.custom_root`` on ``fmap(x) - x``: its tangent rule solves ``(∂F/∂x - I) ẋ = -∂F/∂θ θ̇``
    with ``jax.lax.custom_linear_solve``, whose solve and transposed solve are the same
    fixed-point iteration (on the JVP or the VJP of ``fmap``), so ``jvp``, ``vjp`` and their
    compositions all work and store no iterates.
    """

    def residual_map(x):
        return fmap(x) - x

    def forward_solve(f, start):
        del f
        return iterate(fmap, start, tol, max_steps, batch_axes)[0]

    def linear_fixed_point(matvec, b):
        # (J - I) x = b, with matvec(x) = J x - x:  x ← J x - b = matvec(x) + x - b.
        return iterate(lambda x: matvec(x) + x - b, -b, tol, max_steps, batch_axes)[0]

    def tangent_solve(g, y):
        return jax.lax.custom_linear_solve(g, y, linear_fixed_point, transpose_solve=linear_fixed_point)

    return jax.lax.custom_root(residual_map, x0, forward_solve, tangent_solve)


def _solve(
    params: LateralParams,
    drive: jax.Array,
    config: LateralConfig,
    tol: float,
    max_steps: int,
    batch_axes: tuple[str, ...] = (),
) -> jax.Array:
    """``a*`` with ``a* = F(a*)``, ``F(a) = f(N_l(d + L(a)))``, by :func:`solve` from ``a(0)``."""
    fmap = functools.partial(fixed_point_map, params, drive, config=config)
    return solve(lambda a: fmap(a), initial_state(params, drive, config), tol, max_steps, batch_axes)


_nonconverged_calls = 0


def _advice(config: LateralConfig | None) -> str:
    """What to change when the solve does not converge, read from the layer's config."""
    if config is not None and config.loop_norm == "none":
        return "use a loop norm (LateralConfig.stable()), a smaller lateral_init_scale"
    scale = "" if config is None else f" (now {config.lateral_init_scale:g})"
    return f"use a smaller lateral_init_scale{scale}, C-RBP's contractor_penalty while training"


def _warn_if_not_converged(residual, tol: float, max_steps: int, config: LateralConfig | None = None) -> None:
    """Host side of the convergence check: warns at the 1st, 10th, 100th, ... non-converged solve."""
    global _nonconverged_calls
    residual = float(residual)
    if residual <= tol:  # NaN (a diverged iteration) is not converged either
        return
    _nonconverged_calls += 1
    if str(_nonconverged_calls).rstrip("0") != "1":  # warn at 1, 10, 100, ...
        return
    warnings.warn(
        f"grad_mode='implicit': the fixed-point iteration stopped after implicit_max_steps={max_steps} with "
        f"residual {residual:.3g} > implicit_tol={tol:g} (non-converged solve #{_nonconverged_calls}); the "
        f"outputs and gradients are not those of a long unroll. The lateral map is not contractive: "
        f"{_advice(config)}, more implicit_max_steps, or grad_mode='full'/'remat'.",
        RuntimeWarning,
        stacklevel=2,
    )


def fixed_point(
    params: LateralParams,
    drive: jax.Array,
    *,
    config: LateralConfig = LateralConfig(),
    tol: float = 1e-5,
    max_steps: int = 100,
    warn: bool = True,
    batch_axes: tuple[str, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """Solves ``a* = f(N_l(d + L(a*)))`` by iteration from ``a(0)``; differentiable by the IFT.

    Returns ``(a*, residual)`` with ``residual = ‖F(a*) - a*‖ / ‖a*‖`` (not differentiated).  A
    residual above ``tol`` means the iteration did not converge (the lateral map is not
    contractive); its gradient is then not the gradient of a long unroll, and with ``warn`` the
    running program warns (``jax.debug.callback``; at the 1st, 10th, 100th, ... occurrence).
    ``batch_axes``: the ``jax.pmap`` axes the batch is split along (:func:`global_relative_change`).
    """
    a_star = _solve(params, drive, config, tol, max_steps, batch_axes)
    a_sg = jax.lax.stop_gradient(a_star)
    residual = global_relative_change(
        fixed_point_map(jax.lax.stop_gradient(params), jax.lax.stop_gradient(drive), a_sg, config), a_sg, batch_axes
    )
    if warn:
        warn_fn = functools.partial(_warn_if_not_converged, tol=tol, max_steps=max_steps, config=config)
        jax.debug.callback(warn_fn, residual)
    return a_star, residual


def contractor_penalty(
    fmap: Callable[[jax.Array], jax.Array],
    x_star: jax.Array,
    *,
    threshold: float = 0.9,
    vector: jax.Array | None = None,
) -> jax.Array:
    """C-RBP's contraction penalty (Linsley et al., NeurIPS 2020) at a fixed point ``x* = F(x*)``::

        L = mean( relu( vᵀ ∂F/∂x |ₓ* − λ )² )

    ``vᵀ ∂F/∂x`` is one vector-Jacobian product (``v`` = ones by default, as in the paper's code;
    pass the back-propagated vector to penalise along it); entries above ``λ = threshold`` are
    penalised, which keeps the loop map contractive so the implicit gradient stays valid.  ``x*``
    is held constant; the penalty's gradient reaches the parameters through ``fmap``.
    """
    x = jax.lax.stop_gradient(x_star)
    v = jnp.ones_like(x) if vector is None else vector
    _, vjp = jax.vjp(fmap, x)
    (jv,) = vjp(v.astype(x.dtype))
    return jnp.mean(jnp.square(jax.nn.relu(jv.astype(jnp.float32) - threshold)))
