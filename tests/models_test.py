"""Tests of the Linen wrappers (lateral_jax/layers.py) and architectures (lateral_jax/models.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lateral_jax.core import ei, models, recurrence
from lateral_jax.core.layers import LateralConv, module_params
from lateral_jax.core.recurrence import LateralConfig, LoopOptions

SMALL = LateralConfig.stable(num_groups=2)


@pytest.mark.parametrize(
    "config,kwargs",
    [
        (SMALL, {}),
        (LateralConfig.paper(), {"loop": LoopOptions(grad_mode="remat")}),
        (LateralConfig.paper(inhibitory_size=5), {}),
        (LateralConfig.paper(mixing="depthwise", leak=0.5), {}),
        (SMALL, {"ei_mode": "parametrise", "excitatory_fraction": 0.5}),
    ],
    ids=["stable", "paper-remat", "two-population", "depthwise-leak", "parametrised"],
)
def test_linen_wrapper_equals_the_pure_function(key, config, kwargs):
    x = jax.random.normal(key, (2, 6, 6, 3))
    layer = LateralConv(4, num_steps=3, config=config, **kwargs)
    variables = layer.init(jax.random.key(1), x)
    out = layer.apply(variables, x, return_states=True)
    params = module_params(variables, excitatory_fraction=kwargs.get("excitatory_fraction", 0.8))
    ref = recurrence.unroll(params, x, num_steps=3, config=config)
    chex.assert_trees_all_equal(out.final, ref.final)
    chex.assert_trees_all_equal(out.states, ref.states)


def test_feedforward_model_has_no_lateral_parameters(key):
    x = jnp.zeros((1, 32, 32, 3))
    variables = models.FCNN(widths=(8, 16)).init(key, x)
    names = {k for layer in variables["params"].values() for k in layer}
    assert not names & {"w_lat", "v_lat", "w_inh"}
    assert models.count_params(models.LCCNN(widths=(8, 16)), x.shape) - models.count_params(
        models.FCNN(widths=(8, 16)), x.shape
    ) == 3 * 3 * (8 * 8 + 16 * 16)


def test_model_returns_per_loop_states_of_the_chosen_layers(key):
    x = jax.random.normal(key, (2, 32, 32, 3))
    model = models.LCCNN(widths=(8, 16), num_steps=3, lateral=SMALL)
    variables = model.init(key, x)
    out = model.apply(variables, x, record=("lateral_1",))
    assert list(out.states) == ["lateral_1"]
    assert out.states["lateral_1"].shape == (4, 2, 16, 16, 16)
    assert set(out.residuals) == {"lateral_0", "lateral_1"}
    # recording does not change the result
    chex.assert_trees_all_equal(model.apply(variables, x).logits, out.logits)
    # the recorded final state is the layer's output: recompute layer 1 from its input
    h0 = model.apply(variables, x, record="all").states["lateral_0"][-1]
    layer1 = LateralConv(16, num_steps=3, config=SMALL)
    ref = layer1.apply(
        {"params": variables["params"]["lateral_1"]},
        jax.lax.reduce_window(h0, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"),
        return_states=True,
    )
    chex.assert_trees_all_close(out.states["lateral_1"], ref.states, atol=1e-6)


def test_feedforward_model_equals_lateral_model_with_zero_lateral_kernels(key):
    """With W_lat = 0, the LC-CNN's logits equal the F-CNN's with the same afferent weights."""
    x = jax.random.normal(key, (2, 32, 32, 3))
    lc, ff = models.LCCNN(widths=(8, 16), lateral=SMALL), models.FCNN(widths=(8, 16), lateral=SMALL)
    params = lc.init(key, x)["params"]
    zeroed = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if "w_lat" in jax.tree_util.keystr(p) else v, params
    )
    ff_params = {k: {n: a for n, a in layer.items() if n != "w_lat"} for k, layer in params.items()}
    chex.assert_trees_all_close(
        lc.apply({"params": zeroed}, x).logits, ff.apply({"params": ff_params}, x).logits, atol=1e-5
    )


@pytest.mark.parametrize("model_cls", [models.FCNN, models.LCCNN, models.LCEICNN, models.UnsharedCNN])
def test_models_jit_and_grad(key, model_cls):
    x = jax.random.normal(key, (2, 28, 28, 1))
    model = (
        model_cls(widths=(8, 8), num_steps=2, lateral=SMALL)
        if model_cls is not models.FCNN
        else model_cls(widths=(8, 8), lateral=SMALL)
    )
    params = model.init(key, x)["params"]

    @jax.jit
    def loss(params):
        logits = model.apply({"params": params}, x).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 1])).mean() + model.ei_penalty(
            params
        )

    grads = jax.grad(loss)(params)
    chex.assert_tree_all_finite(grads)
    assert float(loss(params)) > 0


def test_lceicnn_penalty_is_the_weighted_mixed_sign_loss(key):
    x = jnp.zeros((1, 32, 32, 3))
    model = models.LCEICNN(widths=(8, 16), lateral=SMALL, ei_weight=0.5)
    params = model.init(key, x)["params"]
    expected = 0.5 * (
        ei.mixed_sign_penalty(params["lateral_0"]["w_lat"]) + ei.mixed_sign_penalty(params["lateral_1"]["w_lat"])
    )
    assert float(model.ei_penalty(params)) == pytest.approx(float(expected), rel=1e-6)
    assert float(models.LCCNN(widths=(8, 16), lateral=SMALL).ei_penalty(params)) == 0.0


def test_unshared_control_has_one_kernel_per_loop_and_equal_compute(key):
    x = jnp.zeros((1, 32, 32, 3))
    params = models.UnsharedCNN(widths=(8,), num_steps=3, lateral=SMALL).init(key, x)["params"]
    assert params["lateral_0"]["w_lat"].shape == (3, 3, 3, 8, 8)
    flops = {}
    for name, model in {
        "shared": models.LCCNN(widths=(8,), num_steps=3, lateral=SMALL),
        "unshared": models.UnsharedCNN(widths=(8,), num_steps=3, lateral=SMALL),
    }.items():
        p = model.init(key, x)
        flops[name] = jax.jit(lambda p, x, m=model: m.apply(p, x).logits).lower(p, x).compile().cost_analysis()["flops"]
    assert flops["unshared"] == pytest.approx(flops["shared"], rel=0.02)


def test_parameter_matched_widths_match_the_parameter_count():
    shape = (1, 32, 32, 3)
    reference = models.LCCNN(widths=(16, 32, 64), lateral=LateralConfig.stable())
    widths = models.param_matched_widths(reference, shape)
    assert all(w % 8 == 0 for w in widths) and widths[0] > 16
    target = models.count_params(reference, shape)
    assert abs(models.count_params(models.FCNN(widths=widths), shape) - target) / target < 0.1


def test_lateral_resnet_records_lateral_stages(key):
    x = jax.random.normal(key, (2, 32, 32, 3))
    model = models.LateralResNet(
        stage_sizes=(1, 1), widths=(8, 16), num_steps=2, lateral=SMALL, lateral_stages=(1,), num_groups=2
    )
    variables = model.init(key, x)
    out = model.apply(variables, x, record="all")
    assert out.logits.shape == (2, 10)
    assert list(out.states) == ["stage1_block0_lateral"]
    assert out.states["stage1_block0_lateral"].shape == (3, 2, 16, 16, 16)
    assert "w_lat" in variables["params"]["stage1_block0_lateral"]


def test_bf16_compute_keeps_float32_params_and_logits(key):
    x = jax.random.normal(key, (2, 32, 32, 3))
    model = models.LCCNN(widths=(8,), lateral=SMALL, dtype=jnp.bfloat16)
    variables = model.init(key, x)
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
    out = model.apply(variables, x, record="all")
    assert out.logits.dtype == jnp.float32 and out.states["lateral_0"].dtype == jnp.bfloat16
    ref = models.LCCNN(widths=(8,), lateral=SMALL).apply(variables, x).logits
    np.testing.assert_allclose(out.logits, ref, atol=0.05, rtol=0.05)


def test_model_errors(key):
    with pytest.raises(ValueError, match=r"widths=\(\) must be a non-empty sequence"):
        models.LCCNN(widths=()).init(key, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="ei_weight=-1.0 must be >= 0"):
        models.LCEICNN(widths=(8,), ei_weight=-1.0).init(key, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="ei_mode='dale' is not supported"):
        models.LCCNN(widths=(8,), ei_mode="dale").init(key, jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(ValueError, match="num_steps=-2 is negative"):
        models.LCCNN(widths=(8,), num_steps=-2).init(key, jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize(
    "shape, groups, dtype",
    [((4, 8, 8, 16), 8, jnp.float32), ((2, 5, 7, 12), 3, jnp.float32), ((3, 4, 4, 8), 1, jnp.bfloat16)],
)
def test_group_norm_equals_the_one_step_reference_up_to_summation_order(shape, groups, dtype):
    """The (H, W)-first GroupNorm (fast on XLA:CPU) against the one-step [B, H, W, G, C/G] form: values,
    and the gradients of every input, within float rounding; statistics per example and group."""
    from lateral_jax.core import cell
    from lateral_jax.core.params import NormParams

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, shape), dtype)
    params = NormParams(jnp.asarray(rng.normal(size=shape[-1]), jnp.float32), jnp.asarray(rng.normal(size=shape[-1])))
    cot = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def loss(fn):
        return lambda x, p: jnp.sum(fn(x, p, groups).astype(jnp.float32) * cot)

    fast, direct = cell.group_norm(x, params, groups), cell.group_norm_direct(x, params, groups)
    assert fast.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(direct, np.float32), atol=tol, rtol=tol)
    g_fast = jax.grad(loss(cell.group_norm), argnums=(0, 1))(x, params)
    g_direct = jax.grad(loss(cell.group_norm_direct), argnums=(0, 1))(x, params)
    for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_direct), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=10 * tol, rtol=10 * tol)
    # each group of each example is normalised: mean 0, variance 1 before the affine map
    unit = cell.group_norm(x.astype(jnp.float32), NormParams(jnp.ones(shape[-1]), jnp.zeros(shape[-1])), groups)
    grouped = np.asarray(unit).reshape(*shape[:3], groups, -1)
    np.testing.assert_allclose(grouped.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(grouped.var(axis=(1, 2, 4)), 1.0, atol=1e-3)
