"""The hGRU loop map and its loops: derivatives in every gradient mode against finite differences
and against each other, forward = reverse mode, jit / vmap / shard_map, the E/I split and C-RBP's
contraction penalty."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from lateral_jax.core import ei, hgru, implicit
from lateral_jax.core.config import LoopOptions
from lateral_jax.core.sharding import DATA_AXIS, make_mesh

CONFIG = hgru.HGRUConfig(kernel_size=3, num_groups=2, activation="tanh")


def make(config=CONFIG, channels=4, batch=2, hw=5, scale=1.0, seed=0):
    params = hgru.init_params(jax.random.key(seed), channels, config)
    params = params._replace(
        w_inhibit=scale * params.w_inhibit, w_excite=None if params.w_excite is None else scale * params.w_excite
    )
    drive = jax.random.normal(jax.random.key(seed + 1), (batch, hw, hw, channels))
    return params, drive


def loss_fn(mode, num_steps=3, config=CONFIG, **loop):
    options = LoopOptions(grad_mode=mode, **loop)

    def loss(params, drive):
        out = hgru.run(params, drive, num_steps=num_steps, config=config, loop=options)
        return jnp.sum(jnp.sin(out.final))

    return loss


def to64(tree):
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), tree)


@pytest.mark.parametrize("mode", ["full", "remat"])
def test_gradients_equal_finite_differences_in_reverse_and_forward_mode(mode):
    """(Truncated mode is not the derivative of the loss by design: it is checked against an explicit
    stop-gradient below.)"""
    params, drive = make(hw=4)
    with jax.enable_x64(True):
        args = (to64(params), to64(drive))
        check_grads(loss_fn(mode, 3), args, order=1, modes=("rev", "fwd"), atol=1e-5, rtol=1e-5, eps=1e-6)


def test_implicit_gradient_equals_finite_differences_and_a_long_unroll():
    params, drive = make(scale=0.3)
    # the solve stops where its relative change < tol: at this loop's contraction (~0.92 a step at
    # init) tol = 1e-13 leaves the state ~1e-12 from h*, below what the finite differences resolve
    loss = loss_fn("implicit", implicit_tol=1e-13, implicit_max_steps=800)
    with jax.enable_x64(True):
        p64, d64 = to64(params), to64(drive)
        check_grads(loss, (p64, d64), order=1, modes=("rev", "fwd"), atol=1e-4, rtol=1e-4, eps=1e-6)
        g_implicit = jax.grad(loss)(p64, d64)
        g_long = jax.grad(loss_fn("full", 400))(p64, d64)
    chex.assert_trees_all_close(g_implicit, g_long, atol=1e-5, rtol=1e-5)


def test_remat_equals_full_and_truncated_equals_a_manual_stop_gradient():
    params, drive = make()
    g_full = jax.grad(loss_fn("full", 4))(params, drive)
    chex.assert_trees_all_close(jax.grad(loss_fn("remat", 4))(params, drive), g_full, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_equal(jax.grad(loss_fn("truncated", 4, truncate_steps=4))(params, drive), g_full)

    def manual(params, drive):
        h = hgru.initial_state(drive, CONFIG)
        for t in range(4):
            if t == 2:
                h = jax.lax.stop_gradient(h)
            h = hgru.loop_map(params, drive, h, CONFIG)
        return jnp.sum(jnp.sin(h))

    got = jax.grad(loss_fn("truncated", 4, truncate_steps=2))(params, drive)
    chex.assert_trees_all_close(got, jax.grad(manual)(params, drive), atol=1e-6, rtol=1e-6)
    assert not np.allclose(got.w_inhibit, g_full.w_inhibit, atol=1e-6)


def test_states_are_the_iterates_of_the_loop_map_and_residual_their_last_change():
    params, drive = make()
    out = hgru.run(params, drive, num_steps=3, config=CONFIG, return_states=True)
    h = hgru.initial_state(drive, CONFIG)
    want = [h]
    for _ in range(3):
        h = hgru.loop_map(params, drive, h, CONFIG)
        want.append(h)
    chex.assert_trees_all_close(out.states, jnp.stack(want), atol=1e-6)
    chex.assert_trees_all_close(out.final, want[-1], atol=1e-6)
    rel = jnp.linalg.norm(want[-1] - want[-2]) / jnp.linalg.norm(want[-1])
    np.testing.assert_allclose(out.residual, rel, rtol=1e-5)


def test_zero_initial_state_starts_from_zero_and_t0_returns_it():
    config = hgru.HGRUConfig(kernel_size=3, num_groups=2, initial_state="zeros")
    params, drive = make(config)
    out = hgru.run(params, drive, num_steps=0, config=config, return_states=True)
    assert float(jnp.abs(out.final).max()) == 0.0 and out.states.shape == (1, *drive.shape)


def test_jit_and_vmap_equal_the_plain_call():
    params, drive = make()
    run = functools.partial(hgru.run, num_steps=3, config=CONFIG)
    want = run(params, drive).final
    chex.assert_trees_all_close(jax.jit(run)(params, drive).final, want, atol=1e-6)
    per_example = jax.vmap(lambda d: run(params, d[None]).final[0])(drive)
    chex.assert_trees_all_close(per_example, want, atol=1e-6)


@pytest.mark.parametrize("grad_mode", ["full", "implicit", "truncated"])
def test_under_shard_map_equals_one_device(grad_mode):
    params, drive = make(scale=0.3, batch=16)
    cot = jax.random.normal(jax.random.key(5), drive.shape)
    loop = LoopOptions(
        grad_mode=grad_mode,
        implicit_tol=1e-6,
        implicit_max_steps=200,
        truncate_steps=2 if grad_mode == "truncated" else None,
    )

    def derivatives(p, d, c, axis=None):
        def loss(q):
            total = jnp.sum(hgru.run(q, d, num_steps=4, config=CONFIG, loop=loop).final * c)
            return total if axis is None else jax.lax.psum(total, axis)

        value, grads = jax.value_and_grad(loss)(p)
        _, directional = jax.jvp(loss, (p,), (jax.tree.map(jnp.ones_like, p),))
        return value, grads, directional

    sharded = jax.jit(
        jax.shard_map(
            functools.partial(derivatives, axis=DATA_AXIS),
            mesh=make_mesh(),
            in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
            out_specs=(P(), P(), P()),
        )
    )
    got, want = sharded(params, drive, cot), derivatives(params, drive, cot)
    # within float32 rounding of each leaf's scale (the implicit solves stop at the same step on
    # every device, but their sums are reassociated): |got - want| <= 1e-5 max|want|
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max()) + 1e-6


def test_kernels_are_symmetric_across_channels_and_shared_on_request():
    params, _ = make()
    w_inhibit, w_excite = hgru.kernels(params, CONFIG)
    chex.assert_trees_all_close(w_inhibit, jnp.swapaxes(w_inhibit, 2, 3))
    assert not np.allclose(w_inhibit, w_excite)
    shared = hgru.HGRUConfig(kernel_size=3, num_groups=2, shared_kernel=True, symmetric=False)
    p_shared, _ = make(shared)
    assert p_shared.w_excite is None
    a, b = hgru.kernels(p_shared, shared)
    chex.assert_trees_all_equal(a, b)
    chex.assert_trees_all_equal(a, p_shared.w_inhibit)


def test_signed_kernels_feed_the_ei_penalties():
    params, _ = make()
    signed = hgru.signed_kernels(params, CONFIG)
    w_inhibit, w_excite = hgru.kernels(params, CONFIG)
    chex.assert_trees_all_equal(signed["inhibitory"], -w_inhibit)
    # two populations: W_E >= 0 and -W_I <= 0, i.e. relu(-W_E) + relu(-W_I)
    want = jnp.sum(jax.nn.relu(-w_excite)) + jnp.sum(jax.nn.relu(-w_inhibit))
    got = ei.two_population_penalty(signed["excitatory"], signed["inhibitory"])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    clean = params._replace(w_inhibit=jnp.abs(params.w_inhibit), w_excite=jnp.abs(params.w_excite))
    signed = hgru.signed_kernels(clean, CONFIG)
    assert float(ei.two_population_penalty(signed["excitatory"], signed["inhibitory"])) == 0.0
    assert float(ei.mixed_sign_penalty(signed)) == 0.0


def test_contractor_penalty_is_the_hinged_column_sums_of_the_jacobian():
    params, drive = make(batch=1, hw=3, channels=2, scale=2.0)
    h = hgru.run(params, drive, num_steps=5, config=CONFIG).final
    fmap = functools.partial(hgru.loop_map, params, drive, config=CONFIG)
    jac = jax.jacobian(fmap)(h).reshape(h.size, h.size)
    column_sums = jac.sum(axis=0)
    for threshold in (0.0, 0.5):
        want = jnp.mean(jax.nn.relu(column_sums - threshold) ** 2)
        np.testing.assert_allclose(implicit.contractor_penalty(fmap, h, threshold=threshold), want, rtol=1e-5)
    assert float(implicit.contractor_penalty(fmap, h, threshold=1e6)) == 0.0
    grads = jax.grad(
        lambda p: implicit.contractor_penalty(functools.partial(hgru.loop_map, p, drive, config=CONFIG), h, threshold=0)
    )(params)
    assert float(jnp.abs(grads.w_inhibit).sum()) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kernel_size": 4}, "kernel_size=4 must be a positive odd integer"),
        ({"gate_norm": "batch"}, "gate_norm='batch' is not supported"),
        ({"initial_state": "noise"}, "initial_state='noise' is not supported"),
        ({"chronos_steps": 1}, "chronos_steps=1 must be an int >= 2"),
        ({"horizontal_norm_scale": -0.1}, "horizontal_norm_scale=-0.1 must be a finite number >= 0"),
        ({"horizontal_norm_scale": float("nan")}, "horizontal_norm_scale=nan must be a finite number >= 0"),
    ],
)
def test_bad_configs_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hgru.HGRUConfig(**kwargs)


def test_params_that_do_not_match_the_drive_are_refused():
    params, drive = make()
    with pytest.raises(ValueError, match="w_inhibit has shape"):
        hgru.run(params, drive[..., :2], num_steps=2, config=CONFIG)
    with pytest.raises(ValueError, match="w_excite must be None exactly when shared_kernel=True"):
        hgru.run(params, drive, num_steps=2, config=hgru.HGRUConfig(kernel_size=3, num_groups=2, shared_kernel=True))


# --------------------------------------------------------------------------------------------
# Linen and NNX skins, the model family, C-RBP in training
# --------------------------------------------------------------------------------------------

from flax import nnx  # noqa: E402

from lateral_jax.core import dynamics, hgru_models, nnx_hgru  # noqa: E402
from lateral_jax.core.nnx_models import load_params  # noqa: E402


def _stem(params, x):
    kernel, bias = params["stem"]["kernel"], params["stem"]["bias"]
    conv = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return conv + bias.reshape(1, 1, 1, -1)


def _model(**kw):
    return hgru_models.HGRUNet(width=4, stem_size=3, num_steps=3, config=CONFIG, **kw)


def test_linen_layer_is_the_pure_run_on_its_params_and_ties_the_chronos_biases():
    model = _model()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    variables = model.init(jax.random.key(1), x)
    p = variables["params"]["hgru"]
    chex.assert_trees_all_equal(p["b_mix"], -p["b_gain"])
    params = hgru_models.layer_params(p)
    stem = _stem(variables["params"], x)
    want = hgru.run(params, stem, num_steps=3, config=CONFIG, return_states=True)
    out = model.apply(variables, x, record="all")
    chex.assert_trees_all_close(out.states["hgru"], want.states, atol=1e-5)
    np.testing.assert_allclose(out.residuals["hgru"], want.residual, rtol=1e-4)


def test_horizontal_norms_start_at_a_tenth_in_every_face_so_a_loop_nudges_the_drive():
    """N₂, N₄ start at scale 0.1 (N₁, N₃ at 1) in the pure init, the Linen and the NNX layer; at
    init eight loops keep the drive's pattern (unit-scale norms replace half of it)."""
    config = dataclasses.replace(CONFIG, activation="relu")
    drive = jax.random.normal(jax.random.key(3), (2, 12, 12, 4))
    pure = hgru.init_params(jax.random.key(0), 4, config)
    linen = hgru_models.layer_params(hgru_models.HGRULayer(2, config).init(jax.random.key(0), drive)["params"])
    twin = nnx_hgru.HGRULayer(4, num_steps=2, config=config, rngs=nnx.Rngs(0)).layer_params()
    for params in (pure, linen, twin):
        scales = [np.asarray(n.scale) for n in params.norms]
        np.testing.assert_array_equal(scales[0], 1.0)
        np.testing.assert_array_equal(scales[1], np.float32(0.1))
        np.testing.assert_array_equal(scales[2], 1.0)
        np.testing.assert_array_equal(scales[3], np.float32(0.1))

    def kept_after_eight_loops(scale):  # correlation of h(8) with h(0) = f(x) at init
        c = dataclasses.replace(config, horizontal_norm_scale=scale)
        out = hgru.run(hgru.init_params(jax.random.key(0), 4, c), drive, num_steps=8, config=c)
        return float(jnp.corrcoef(out.final.ravel(), hgru.initial_state(drive, c).ravel())[0, 1])

    small, unit = kept_after_eight_loops(0.1), kept_after_eight_loops(1.0)
    assert small > 0.9 and unit < 0.7, (small, unit)  # measured: 0.97 and 0.48


def test_nnx_model_equals_linen_in_logits_and_gradients():
    linen_model = _model()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    params = linen_model.init(jax.random.key(1), x)["params"]
    twin = nnx_hgru.HGRUNet(1, width=4, stem_size=3, num_steps=3, config=CONFIG, rngs=nnx.Rngs(5))
    load_params(twin, params)
    chex.assert_trees_all_close(twin(x).logits, linen_model.apply({"params": params}, x).logits, atol=1e-5)

    def linen_loss(p):
        return jnp.sum(linen_model.apply({"params": p}, x).logits ** 2)

    def nnx_loss(m):
        return jnp.sum(m(x).logits ** 2)

    g_nnx = nnx.grad(nnx_loss)(twin)
    g_linen = jax.grad(linen_loss)(params)
    chex.assert_trees_all_close(nnx.to_pure_dict(g_nnx), g_linen, atol=1e-4, rtol=1e-4)


def test_layer_spectral_radii_include_the_hgru_and_match_nnx():
    model = _model()
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    variables = model.init(jax.random.key(1), x)
    radii = dynamics.layer_spectral_radii(model, variables, x, num_iters=30)
    assert set(radii) == {"hgru"} and radii["hgru"].shape == (2,)
    twin = nnx_hgru.HGRUNet(1, width=4, stem_size=3, num_steps=3, config=CONFIG, rngs=nnx.Rngs(5))
    load_params(twin, variables["params"])
    drive = twin.stem(x)
    state = twin.hgru(drive).final
    chex.assert_trees_all_close(twin.hgru.spectral_radius(drive, state, num_iters=30), radii["hgru"], rtol=1e-4)


def test_contractor_penalty_is_sown_in_implicit_mode_and_enters_the_loss():
    from lateral_jax.training.train import loss_and_metrics

    loop = LoopOptions(grad_mode="implicit", implicit_max_steps=50, implicit_warn=False)
    model = _model(loop=loop, contractor_weight=2.0, contractor_threshold=0.0)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 1))
    params = model.init(jax.random.key(1), x)["params"]
    _, sown = model.apply({"params": params}, x, mutable=["penalties"])
    (penalty,) = sown["penalties"]["hgru"]["contractor"]
    p = hgru_models.layer_params(params["hgru"])  # the layer's fixed point, recomputed with the pure functions
    stem = _stem(params, x)
    h_star = hgru.run(p, stem, num_steps=0, config=CONFIG, loop=loop).final
    want = 2.0 * implicit.contractor_penalty(lambda h: hgru.loop_map(p, stem, h, CONFIG), h_star, threshold=0.0)
    np.testing.assert_allclose(penalty, want, rtol=1e-4)
    batch = {"image": x, "label": jnp.array([0, 1])}
    loss, metrics = loss_and_metrics(model, params, batch)
    np.testing.assert_allclose(metrics["contractor_penalty"], penalty, rtol=1e-5)
    np.testing.assert_allclose(loss, metrics["ce"] + penalty, rtol=1e-5)
    grads = jax.grad(lambda q: loss_and_metrics(model, q, batch)[0])(params)
    assert np.isfinite(float(jnp.abs(grads["hgru"]["w_inhibit"]).sum()))


def test_lccnn_sows_the_contractor_penalty_only_when_asked():
    from lateral_jax.core import layers
    from lateral_jax.core.config import LateralConfig

    loop = LoopOptions(grad_mode="implicit", implicit_warn=False)
    cfg = LateralConfig.stable(num_groups=2)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    plain = layers.LateralConv(4, num_steps=2, config=cfg, loop=loop)
    variables = plain.init(jax.random.key(1), x)
    _, sown = plain.apply(variables, x, mutable=["penalties"])
    assert sown == {}
    penalised = layers.LateralConv(
        4, num_steps=2, config=cfg, loop=loop, contractor_weight=1.0, contractor_threshold=0.0
    )
    out, sown = penalised.apply(variables, x, mutable=["penalties"])
    chex.assert_trees_all_equal(out.final, plain.apply(variables, x).final)
    assert float(sown["penalties"]["contractor"][0]) > 0


def test_hgru_ei_penalty_uses_the_signed_kernels():
    model = _model(ei_mode="two_population", ei_weight=0.5)
    x = jnp.zeros((1, 6, 6, 1))
    params = model.init(jax.random.key(1), x)["params"]
    signed = hgru.signed_kernels(hgru_models.layer_params(params["hgru"]), CONFIG)
    want = 0.5 * ei.two_population_penalty(signed["excitatory"], signed["inhibitory"])
    np.testing.assert_allclose(model.ei_penalty(params), want, rtol=1e-6)
    with pytest.raises(ValueError, match="not available for the hGRU"):
        _model(ei_mode="parametrise", ei_weight=1.0).ei_penalty(params)


def test_benchmark_config_and_variants_become_hgru_and_crbp_run_configs():
    from experiments.configs import base, pathfinder_published
    from lateral_jax.training import config

    c = pathfinder_published.get_config("14")
    crbp = base.to_run_config(c, "hgru_T8_crbp")
    assert crbp.model.kind == "hgru" and crbp.model.num_steps == 8
    assert crbp.model.loop == LoopOptions(grad_mode="implicit", implicit_max_steps=30)
    assert crbp.model.contractor_weight == 1.0
    assert crbp.model.hgru == hgru.HGRUConfig(kernel_size=5, num_groups=4, activation="tanh")
    assert dict(crbp.data.task) == {"contour_length": 14, "image_size": 32}
    assert base.to_run_config(c, "lccnn_T4_crbp").model.loop.grad_mode == "implicit"
    assert base.to_run_config(c, "hgru_T8").model.loop == LoopOptions()
    config.validate(crbp)
    bad = dataclasses.replace(crbp, model=dataclasses.replace(crbp.model, loop=LoopOptions()))
    with pytest.raises(ValueError, match="contractor_weight=1.0 \\(C-RBP\\) acts at a fixed point"):
        config.validate(bad)
    with pytest.raises(ValueError, match="config variant '15' is unknown"):
        pathfinder_published.get_config("15")


def test_published_pathfinder_task_is_generated_once_and_read_from_the_cache(tmp_path, monkeypatch):
    from lateral_jax.training.data import pathfinder, synthetic

    monkeypatch.setenv("LATERAL_JAX_DATA", str(tmp_path))
    first = synthetic.make_task("pathfinder_published", 6, seed=2, contour_length=9)
    spec = pathfinder.PathfinderConfig.published(9, 32)
    path = synthetic.cache_path(spec, 6, 2)
    assert path.exists() and path.parent.parent == tmp_path
    np.testing.assert_array_equal(first["image"], pathfinder.generate(spec, 6, seed=2, workers=1)["image"])
    np.savez(path, image=np.zeros_like(first["image"]), label=first["label"])  # a cached file is what is read
    assert float(np.abs(synthetic.make_task("pathfinder_published", 6, seed=2, contour_length=9)["image"]).max()) == 0


def test_the_probe_measures_cnn_layers_and_leaves_the_hgru_model_out():
    from lateral_jax.core import models
    from lateral_jax.neuro import probe

    x = jnp.zeros((1, 8, 8, 1))
    assert probe.has_lateral_layers(models.FCNN(widths=(8,)).init(jax.random.key(0), x)["params"])
    assert probe.has_lateral_layers(models.LCCNN(widths=(8,), num_steps=1).init(jax.random.key(0), x)["params"])
    assert not probe.has_lateral_layers(_model().init(jax.random.key(0), x)["params"])


def test_forward_flops_match_xlas_count_of_the_forward_pass():
    """``hgru_models.forward_flops`` (convolutions and gates) against XLA's cost analysis of the whole
    forward pass, which also counts the norms and element-wise gates: within 10 % below, 30 % above."""
    for width, kernel, steps in [(16, 5, 2), (8, 3, 4)]:
        model = hgru_models.HGRUNet(
            width=width, stem_size=5, num_steps=steps, config=hgru.HGRUConfig(kernel_size=kernel, num_groups=4)
        )
        x = jnp.zeros((1, 32, 32, 1))
        params = model.init(jax.random.key(0), x)
        cost = jax.jit(lambda p, x, m=model: m.apply(p, x).logits).lower(params, x).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        ours = hgru_models.forward_flops(width, num_steps=steps, kernel_size=kernel, stem_size=5)
        assert 0.9 <= cost["flops"] / ours <= 1.3, (width, kernel, steps, cost["flops"], ours)
