"""Forward-mode differentiation through the recurrence: ``jvp``, ``linearize``, ``jacfwd`` and
Hessian-vector products (forward-over-reverse and reverse-over-reverse) agree with reverse mode,
with finite differences and, for ``implicit`` mode, with a long unroll."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lateral_jax.core import models, pooling, recurrence
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.params import init_params

XLA = LateralConfig.stable(num_groups=2, conv_algorithm="xla")
GRAD_MODES = {
    "full": LoopOptions(),
    "remat": LoopOptions(grad_mode="remat"),
    "truncated": LoopOptions(grad_mode="truncated", truncate_steps=2),
    "implicit": LoopOptions(grad_mode="implicit", implicit_tol=1e-7, implicit_max_steps=300),
}


def test_max_pool_forward_mode_equals_flax_and_reverse_mode():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    x = x.at[:, 0, 0].set(x[:, 0, 1])  # ties: the first maximum in row-major order wins
    t = jax.random.normal(jax.random.key(1), x.shape)
    _, ours = jax.jvp(pooling.max_pool, (x,), (t,))
    _, flax = jax.jvp(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)), (x,), (t,))
    np.testing.assert_array_equal(ours, flax)
    np.testing.assert_array_equal(jax.jacfwd(pooling.max_pool)(x), jax.jacrev(pooling.max_pool)(x))


def _model_loss(kind: str, loop: LoopOptions, lateral: LateralConfig = XLA):
    model = {"fcnn": models.FCNN, "lccnn": models.LCCNN, "lceicnn": models.LCEICNN}[kind](
        widths=(4, 4), num_classes=3, num_steps=3, lateral=lateral, loop=loop
    )
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    params = model.init(jax.random.key(0), x)["params"]

    def loss(p):
        logits = model.apply({"params": p}, x).logits
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0]) + model.ei_penalty(p)

    return loss, params


WINOGRAD = LateralConfig.stable(num_groups=2, conv_algorithm="winograd")
# F-CNN has no loops: one grad mode covers it.  Winograd: the implicit mode (custom_root around
# the custom JVP); 'full' is the every-order Winograd test below, and the scanned modes use the
# same convolution as 'full' (their values and gradients: winograd_test.py).
MODEL_CASES = (
    [("fcnn", "full", "xla"), ("lceicnn", "full", "xla")]  # the E/I penalty is a function of params only
    + [("lccnn", mode, "xla") for mode in GRAD_MODES]
    + [("lccnn", "implicit", "winograd")]
)


@pytest.mark.parametrize("kind,mode,algorithm", MODEL_CASES)
def test_models_jvp_equals_vjp_and_finite_differences(kind, mode, algorithm):
    loss, params = _model_loss(kind, GRAD_MODES[mode], XLA if algorithm == "xla" else WINOGRAD)
    v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(7), a.shape, a.dtype), params)
    value, jvp = jax.jvp(loss, (params,), (v,))
    grad = jax.grad(loss)(params)
    vjp = sum(
        jnp.vdot(g, t) for g, t in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(v), strict=True)
    )
    np.testing.assert_allclose(jvp, vjp, rtol=1e-4)
    eps = 1e-2
    shifted = [loss(jax.tree_util.tree_map(lambda p, t, s=s: p + s * eps * t, params, v)) for s in (1, -1)]
    np.testing.assert_allclose(jvp, (shifted[0] - shifted[1]) / (2 * eps), rtol=2e-2)
    lin_value, f_jvp = jax.linearize(loss, params)
    np.testing.assert_allclose(lin_value, value, rtol=1e-6)
    np.testing.assert_allclose(f_jvp(v), jvp, rtol=1e-5)


@pytest.mark.parametrize("mode", list(GRAD_MODES))
def test_hessian_vector_products_agree_in_both_orders(mode):
    loss, params = _model_loss("lccnn", GRAD_MODES[mode])
    v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)
    forward_over_reverse = jax.jvp(jax.grad(loss), (params,), (v,))[1]

    def grad_dot_v(p):
        leaves = zip(jax.tree_util.tree_leaves(jax.grad(loss)(p)), jax.tree_util.tree_leaves(v), strict=True)
        return sum(jnp.vdot(g, t) for g, t in leaves)

    reverse_over_reverse = jax.grad(grad_dot_v)(params)
    pairs = zip(
        jax.tree_util.tree_leaves(forward_over_reverse), jax.tree_util.tree_leaves(reverse_over_reverse), strict=True
    )
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_jacfwd_equals_jacrev_through_a_lateral_layer():
    params = init_params(jax.random.key(0), in_channels=1, out_channels=2, config=XLA)
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 1))

    def out(w_lat):
        return recurrence.unroll(params._replace(w_lat=w_lat), x, num_steps=3, config=XLA, return_states=False).final

    np.testing.assert_allclose(jax.jacfwd(out)(params.w_lat), jax.jacrev(out)(params.w_lat), rtol=1e-5, atol=1e-6)


def test_implicit_mode_derivatives_equal_a_long_unroll_in_every_order():
    """float64, a contracting layer: jvp, grad and both HVP orders of the implicit fixed point equal
    those of a 40-loop unroll (which has converged to it: the layer contracts fast) to 1e-4."""
    with jax.enable_x64(True):
        params = init_params(jax.random.key(0), in_channels=2, out_channels=4, config=XLA)
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2), jnp.float64)
        v = jax.random.normal(jax.random.key(2), params.w_lat.shape, jnp.float64)

        def implicit(w):
            out = recurrence.unroll(
                params._replace(w_lat=w),
                x,
                num_steps=4,
                config=XLA,
                grad_mode="implicit",
                return_states=False,
                implicit_tol=1e-12,
                implicit_max_steps=500,
            )
            return jnp.sum(out.final**2)

        def unrolled(w):
            out = recurrence.unroll(
                params._replace(w_lat=w), x, num_steps=40, config=XLA, scan_unroll=1, return_states=False
            )
            return jnp.sum(out.final**2)

        for f in (
            lambda g: jax.jvp(g, (params.w_lat,), (v,))[1],
            lambda g: jax.grad(g)(params.w_lat),
            lambda g: jax.jvp(jax.grad(g), (params.w_lat,), (v,))[1],
            lambda g: jax.grad(lambda w: jnp.vdot(jax.grad(g)(w), v))(params.w_lat),
        ):
            np.testing.assert_allclose(f(implicit), f(unrolled), rtol=1e-4, atol=1e-5)


def test_winograd_derivatives_equal_the_xla_reference_in_every_order():
    """conv_algorithm='winograd' (a custom JVP) gives the XLA path's value, JVP, gradient and both
    HVP orders (float32 Winograd rounding: rtol 1e-3)."""
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    results = {}
    for algorithm in ("xla", "winograd"):
        lateral = LateralConfig.stable(num_groups=2, conv_algorithm=algorithm)
        model = models.LCCNN(widths=(4,), num_classes=3, num_steps=2, lateral=lateral)
        params = model.init(jax.random.key(0), x)["params"]
        v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(3), a.shape, a.dtype), params)

        def loss(p, model=model):
            return jnp.sum(jax.nn.log_softmax(model.apply({"params": p}, x).logits)[:, 0])

        def grad_dot_v(p, loss=loss, v=v):
            leaves = zip(jax.tree_util.tree_leaves(jax.grad(loss)(p)), jax.tree_util.tree_leaves(v), strict=True)
            return sum(jnp.vdot(g, t) for g, t in leaves)

        value, jvp = jax.jvp(loss, (params,), (v,))
        hvp_forward_over_reverse = jax.jvp(jax.grad(loss), (params,), (v,))[1]
        results[algorithm] = (
            value,
            jvp,
            jax.grad(loss)(params),
            hvp_forward_over_reverse,
            jax.grad(grad_dot_v)(params),
        )
    for got, want in zip(results["winograd"], results["xla"], strict=True):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
