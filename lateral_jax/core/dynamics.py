"""The loop as a dynamical system: Jacobian products, spectral radius, contraction diagnostics.

One lateral loop is the map (:func:`lateral_jax.core.cell.lateral_step`)::

    S(a) = (1 - α) a + α F(a),     F(a) = f(N_l(d + L(a)))

and its Jacobian at a state ``a`` is ``J_S(a) = (1 - α) I + α J_F(a)``.  Two linear-algebra facts
make it the object to look at:

* near a fixed point ``a* = F(a*)`` the loops converge (geometrically, at rate ρ) iff the spectral
  radius ``ρ(J_S(a*)) < 1``; ``‖J_S‖₂ < 1`` (the largest singular value) is the stronger,
  norm-wise contraction;
* ``grad_mode="implicit"`` differentiates ``a*`` by the implicit-function theorem: it solves
  ``(I - J_F(a*))ᵀ u = g`` by the iteration ``u ← J_F(a*)ᵀ u + g`` (:mod:`lateral_jax.core.implicit`),
  which converges to the right gradient iff ``ρ(J_F(a*)) < 1``, and only at a true fixed point
  (small residual ``‖F(a) - a‖ / ‖a‖``).  :func:`contraction` reports both.

Every example of a batch is its own dynamical system (convolutions and the loop norm act per
example), so ``J`` is block-diagonal over the batch and every estimate here is per example
(shape ``[B]``).  All functions are pure, matrix-free (only JVPs/VJPs of one loop), jittable and
work with every ``conv_algorithm``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lateral_jax.core import hgru, plan
from lateral_jax.core.cell import afferent_drive, fixed_point_map, lateral_step, relative_change
from lateral_jax.core.config import LateralConfig
from lateral_jax.core.hgru_models import HGRULayer
from lateral_jax.core.hgru_models import layer_params as hgru_layer_params
from lateral_jax.core.layers import LateralConv, LateralRecurrence, module_params
from lateral_jax.core.params import LateralParams

State = Float[Array, "b h w c"]


def loop_map(
    params: LateralParams, drive: State, config: LateralConfig, *, leak: bool = True
) -> Callable[[State], State]:
    """``a ↦ S(a)`` (one loop, with the leak) or, with ``leak=False``, ``a ↦ F(a)``, as the backend's
    plan runs it (:func:`lateral_jax.core.plan.resolve`)."""
    config = plan.resolve(config).config
    if leak:
        return lambda a: lateral_step(a, None, params=params, drive=drive, config=config)[0]
    return lambda a: fixed_point_map(params, drive, a, config)


def step_jvp(
    params: LateralParams, drive: State, state: State, tangent: State, *, config: LateralConfig, leak: bool = True
) -> State:
    """``J(a) v``: how one loop moves a perturbation ``v`` of the state ``a`` (forward mode)."""
    return jax.jvp(loop_map(params, drive, config, leak=leak), (state,), (tangent,))[1]


def step_vjp(
    params: LateralParams, drive: State, state: State, cotangent: State, *, config: LateralConfig, leak: bool = True
) -> State:
    """``J(a)ᵀ u``: how one loop pulls a sensitivity ``u`` of its output back to its input."""
    return jax.vjp(loop_map(params, drive, config, leak=leak), state)[1](cotangent)[0]


def step_jacobian(
    params: LateralParams, drive: State, state: State, *, config: LateralConfig, leak: bool = True
) -> Float[Array, "b n n"]:
    """The dense per-example Jacobian ``∂S(a)_b / ∂a_b``, ``[B, n, n]`` with ``n = H·W·C``.

    ``n²`` numbers per example: for small layers (tests, teaching); use :func:`spectral_radius`
    for real ones.
    """

    def one(d, a):
        def flat(v):
            return loop_map(params, d[None], config, leak=leak)(v.reshape(a[None].shape)).ravel()

        return jax.jacfwd(flat)(a.ravel())

    return jax.vmap(one)(drive, state)


def _norms(v: jax.Array) -> jax.Array:
    """Per-example Euclidean norms ``[B]`` (float32) with the batch axis kept for broadcasting."""
    return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=tuple(range(1, v.ndim)), keepdims=True))


def _start_vector(key: jax.Array | None, like: jax.Array) -> jax.Array:
    key = jax.random.PRNGKey(0) if key is None else key
    v = jax.random.normal(key, like.shape, jnp.float32)
    return (v / _norms(v)).astype(like.dtype)


def _linearised_loop(params, drive, state, config, *, leak: bool, num_iters: int) -> Callable[[State], State]:
    """``v ↦ J(a) v``, linearised once at ``state``, after checking the power-iteration count."""
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 2:
        raise ValueError(f"num_iters={num_iters!r} must be an int >= 2 (power-iteration steps).")
    return jax.linearize(loop_map(params, drive, config, leak=leak), state)[1]


def map_spectral_radius(
    fmap: Callable[[State], State], state: State, *, num_iters: int = 40, key: jax.Array | None = None
) -> Float[Array, " b"]:
    """``ρ(∂fmap/∂a)`` at ``state`` per example, by power iteration on the JVP of any loop map
    (the hGRU's :func:`lateral_jax.core.hgru.loop_map` too); see :func:`spectral_radius`."""
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 2:
        raise ValueError(f"num_iters={num_iters!r} must be an int >= 2 (power-iteration steps).")
    jvp_fn = jax.linearize(fmap, state)[1]

    def body(v, _):
        w = jvp_fn(v)
        n = _norms(w)
        return (w / jnp.maximum(n, 1e-30)).astype(v.dtype), jnp.log(jnp.maximum(n, 1e-30))[:, 0, 0, 0]

    _, logs = jax.lax.scan(body, _start_vector(key, state), None, length=num_iters)
    return jnp.exp(jnp.mean(logs[num_iters // 2 :], axis=0))


def spectral_radius(
    params: LateralParams,
    drive: State,
    state: State,
    *,
    config: LateralConfig,
    num_iters: int = 40,
    leak: bool = True,
    key: jax.Array | None = None,
) -> Float[Array, " b"]:
    """``ρ(J(a))`` per example, by power iteration on the JVP of one loop (matrix-free).

    ``v_{k+1} = J v_k / ‖J v_k‖``; the estimate is the geometric mean of the growth factors
    ``‖J v_k‖`` over the second half of the iterations, which converges to the largest
    ``|eigenvalue|`` also when it is a complex pair (where a single growth factor oscillates).
    The Jacobian is linearised once (``jax.linearize``); each iteration costs one tangent loop.
    Accuracy: within a few per cent after 40 iterations when the two largest moduli are apart
    (tested against the eigenvalues of :func:`step_jacobian`); a lower bound on ρ otherwise.
    """
    return map_spectral_radius(loop_map(params, drive, config, leak=leak), state, num_iters=num_iters, key=key)


def spectral_norm(
    params: LateralParams,
    drive: State,
    state: State,
    *,
    config: LateralConfig,
    num_iters: int = 40,
    leak: bool = True,
    key: jax.Array | None = None,
) -> Float[Array, " b"]:
    """``‖J(a)‖₂``, the largest singular value, per example: power iteration on ``JᵀJ`` (JVP then
    VJP of one loop).  An upper bound on :func:`spectral_radius`; ``< 1`` means the loop contracts
    every perturbation in the Euclidean norm."""
    jvp_fn = _linearised_loop(params, drive, state, config, leak=leak, num_iters=num_iters)
    vjp_fn = jax.linear_transpose(jvp_fn, state)

    def body(v, _):
        w = jvp_fn(v)
        u = vjp_fn(w)[0]
        return (u / jnp.maximum(_norms(u), 1e-30)).astype(v.dtype), _norms(w)[:, 0, 0, 0]

    _, gains = jax.lax.scan(body, _start_vector(key, state), None, length=num_iters)
    return gains[-1]


class Contraction(NamedTuple):
    """Whether a state is a fixed point the implicit gradient can trust (each field ``[B]``).

    Attributes:
      residual: ``‖F(a) - a‖ / ‖a‖``, how far ``a`` is from a fixed point of ``F``.
      spectral_radius: ``ρ(J_F(a))``; the implicit gradient's linear solve converges iff ``< 1``.
      spectral_norm: ``‖J_F(a)‖₂``; ``< 1`` means ``F`` contracts in the Euclidean norm near ``a``.
      trustworthy: ``residual <= tol`` and ``spectral_radius < 1 - margin``.
    """

    residual: jax.Array
    spectral_radius: jax.Array
    spectral_norm: jax.Array
    trustworthy: jax.Array


def contraction(
    params: LateralParams,
    drive: State,
    state: State,
    *,
    config: LateralConfig,
    tol: float = 1e-4,
    margin: float = 0.02,
    num_iters: int = 40,
    key: jax.Array | None = None,
) -> Contraction:
    """Residual and spectral diagnostics of ``F`` at ``state`` (e.g. the output of implicit mode)."""
    f = loop_map(params, drive, config, leak=False)
    residual = jax.vmap(lambda new, old: relative_change(new, old))(f(state), state)
    rho = spectral_radius(params, drive, state, config=config, num_iters=num_iters, leak=False, key=key)
    sigma = spectral_norm(params, drive, state, config=config, num_iters=num_iters, leak=False, key=key)
    return Contraction(residual, rho, sigma, (residual <= tol) & (rho < 1.0 - margin))


def sensitivity(
    params: LateralParams,
    x: Float[Array, "b h w ci"],
    direction: Any,
    *,
    run: Callable[[LateralParams, jax.Array], jax.Array],
) -> tuple[jax.Array, jax.Array]:
    """``(y, ∂y/∂θ · δθ)``: the output of ``run(params, x)`` and its derivative along ``direction``.

    ``direction`` is a :class:`LateralParams` of tangents (e.g. zeros but ``w_lat``: the
    sensitivity of ``a(T)`` to the lateral kernel along one direction); ``run`` any function of
    the layer, e.g. ``lambda p, x: recurrence.unroll(p, x, num_steps=4, config=cfg).final``.
    One forward-mode pass (``jax.jvp``), no Jacobian is formed.
    """
    return jax.jvp(lambda p: run(p, x), (params,), (direction,))


def _layer_calls(model: nn.Module, variables: dict, x: jax.Array) -> dict[str, tuple[nn.Module, jax.Array, Any]]:
    """Every lateral layer call of ``model.apply(variables, x)``: ``name -> (module, input, output)``."""
    calls = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        lateral = isinstance(module, LateralConv | LateralRecurrence | HGRULayer) and module.num_steps > 0
        if lateral and context.method_name == "__call__":
            calls["/".join(module.scope.path)] = (module, args[0], out)
        return out

    with nn.intercept_methods(record):
        model.apply(variables, x)
    return calls


def _subtree(params: dict, path: tuple[str, ...]) -> dict:
    for name in path:
        params = params[name]
    return params


def layer_spectral_radii(
    model: nn.Module, variables: dict, x: jax.Array, *, num_iters: int = 12, key: jax.Array | None = None
) -> dict[str, jax.Array]:
    """``ρ(J_S(a(T)))`` of every weight-shared lateral layer of a Linen model, per example of ``x``.

    Runs the model once, recording each ``LateralConv``'s input and final state, then power-iterates
    that layer's loop Jacobian at its ``a(T)`` (the fixed point in implicit mode).  Keys are the
    layers' module paths (``"lateral_0"``, ``"layer2_block0_lateral"``, ...).  Cheap enough to log
    at every evaluation on a few images (``num_iters`` tangent loops per layer).
    """
    radii = {}
    for name, (module, inputs, out) in _layer_calls(model, variables, x).items():
        if isinstance(module, HGRULayer):  # the hGRU layer is given its drive
            p = hgru_layer_params(_subtree(variables["params"], module.scope.path))
            fmap = functools.partial(hgru.loop_map, p, inputs, config=module.config)
            radii[name] = map_spectral_radius(fmap, out.final, num_iters=num_iters, key=key)
            continue
        if getattr(module, "unshared", False):
            continue  # T different maps: no single loop Jacobian
        p = module_params(
            _subtree(variables["params"], module.scope.path), excitatory_fraction=module.excitatory_fraction
        )
        if isinstance(module, LateralRecurrence):
            drive = inputs  # the layer is given its drive
        else:
            drive = afferent_drive(p, inputs.astype(module.dtype), plan.resolve(module.config).config)
        radii[name] = spectral_radius(p, drive, out.final, config=module.config, num_iters=num_iters, key=key)
    return radii


__all__ = [
    "Contraction",
    "contraction",
    "layer_spectral_radii",
    "loop_map",
    "map_spectral_radius",
    "sensitivity",
    "spectral_norm",
    "spectral_radius",
    "step_jacobian",
    "step_jvp",
    "step_vjp",
]
