"""Tests of the pure lateral recurrence (lateral_jax/recurrence.py)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from lateral_jax.core import recurrence
from lateral_jax.core.recurrence import LateralConfig, LateralParams, NormParams

PAPER = LateralConfig.paper()
STABLE = LateralConfig.stable(num_groups=2)


def make(key, config=PAPER, cin=3, cout=4, hw=6, batch=2, scale=None):
    k1, k2 = jax.random.split(key)
    params = recurrence.init_params(k1, in_channels=cin, out_channels=cout, config=config)
    if scale is not None:
        params = params._replace(w_lat=params.w_lat * scale / jnp.abs(params.w_lat).max())
    x = jax.random.normal(k2, (batch, hw, hw, cin))
    return params, x


def feedforward(params, x, config):
    """The plain conv layer, written independently of the core: f(N_l(N_d(W_ff * x + b)))."""
    d = jax.lax.conv_general_dilated(x, params.w_ff, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    d = d + params.b_ff.reshape(1, 1, 1, -1)
    d = recurrence.normalise(d, params.drive_norm, config.drive_norm, config.num_groups)
    return recurrence.activate(
        recurrence.normalise(d, params.loop_norm, config.loop_norm, config.num_groups), config.activation
    )


@pytest.mark.parametrize("config", [PAPER, STABLE], ids=["paper", "stable"])
def test_zero_steps_and_zero_lateral_kernel_are_the_feedforward_layer(key, config):
    """T = 0 is the F-CNN; with W_lat = 0 every loop equals it, so a(T) = a(0) for any T."""
    params, x = make(key, config)
    expected = feedforward(params, x, config)
    chex.assert_trees_all_equal(recurrence.unroll(params, x, num_steps=0, config=config).final, expected)
    zero = params._replace(w_lat=jnp.zeros_like(params.w_lat))
    out = recurrence.unroll(zero, x, num_steps=5, config=config)
    for t in range(6):
        chex.assert_trees_all_close(out.states[t], expected, atol=1e-6, rtol=1e-6)
    assert float(out.residual) == 0.0


@pytest.mark.parametrize(
    "config",
    [PAPER, STABLE, LateralConfig.paper(leak=0.5, mixing="depthwise")],
    ids=["paper", "stable", "leaky-depthwise"],
)
def test_scan_equals_python_loop_over_the_step(key, config):
    params, x = make(key, config)
    out = recurrence.unroll(params, x, num_steps=4, config=config, scan_unroll=1)
    drive = recurrence.afferent_drive(params, x, config)
    a = recurrence.initial_state(params, drive, config)
    states = [a]
    for _ in range(4):
        a, _ = recurrence.lateral_step(a, None, params=params, drive=drive, config=config)
        states.append(a)
    chex.assert_trees_all_close(out.states, jnp.stack(states), atol=1e-6)
    chex.assert_trees_all_close(out.final, a, atol=1e-6)
    # the rolled and the unrolled scan agree
    chex.assert_trees_all_close(
        recurrence.unroll(params, x, num_steps=4, config=config, scan_unroll=True).final, a, atol=1e-6
    )


def test_weight_sharing_the_same_kernel_at_every_loop(key):
    """The unshared control with T copies of W_lat is the shared layer."""
    params, x = make(key)
    shared = recurrence.unroll(params, x, num_steps=3, config=PAPER)
    copies = params._replace(w_lat=jnp.stack([params.w_lat] * 3))
    chex.assert_trees_all_close(recurrence.unroll_unshared(copies, x, config=PAPER).states, shared.states, atol=1e-6)


def test_jit_vmap_grad_compose(key):
    params, x = make(key, STABLE)
    f = functools.partial(recurrence.unroll, num_steps=3, config=STABLE, return_states=False)
    eager = f(params, x).final
    chex.assert_trees_all_close(jax.jit(f)(params, x).final, eager, atol=1e-5)
    per_example = jax.vmap(lambda xi: f(params, xi[None]).final[0])(x)
    chex.assert_trees_all_close(per_example, eager, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(f(p, x).final ** 2)))(params)
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(grads.w_lat).sum()) > 0


def _loss(mode, num_steps, config=PAPER, **kw):
    def loss(params, x):
        out = recurrence.unroll(
            params, x, num_steps=num_steps, config=config, grad_mode=mode, return_states=False, **kw
        )
        return jnp.sum(jnp.sin(out.final))

    return loss


def test_full_gradient_matches_finite_differences(key):
    params, x = make(key, LateralConfig.paper(activation="tanh"), hw=4)
    loss = _loss("full", 3, LateralConfig.paper(activation="tanh"))
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        check_grads(lambda p: loss(p, x.astype(jnp.float64)), (p64,), order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_remat_gradient_equals_full(key):
    params, x = make(key, STABLE)
    g_full = jax.grad(_loss("full", 4, STABLE))(params, x)
    g_remat = jax.grad(_loss("remat", 4, STABLE))(params, x)
    chex.assert_trees_all_close(g_remat, g_full, atol=1e-6, rtol=1e-6)


def test_truncated_with_k_at_least_t_equals_full(key):
    params, x = make(key)
    g_full = jax.grad(_loss("full", 3))(params, x)
    for k in (3, 5):
        chex.assert_trees_all_equal(jax.grad(_loss("truncated", 3, truncate_steps=k))(params, x), g_full)


def test_truncated_with_k_below_t_drops_the_earlier_contributions(key):
    """With K < T the gradient is that of the loop with a(T-K) held constant, and differs from BPTT."""
    params, x = make(key, scale=0.3)
    num_steps, k = 4, 2

    def reference(params, x):
        drive = recurrence.afferent_drive(params, x, PAPER)
        a = recurrence.initial_state(params, drive, PAPER)
        for t in range(num_steps):
            if t == num_steps - k:
                a = jax.lax.stop_gradient(a)
            a, _ = recurrence.lateral_step(a, None, params=params, drive=drive, config=PAPER)
        return jnp.sum(jnp.sin(a))

    g_trunc = jax.grad(_loss("truncated", num_steps, truncate_steps=k))(params, x)
    chex.assert_trees_all_close(g_trunc, jax.grad(reference)(params, x), atol=1e-6)
    g_full = jax.grad(_loss("full", num_steps))(params, x)
    assert float(jnp.abs(g_trunc.w_lat - g_full.w_lat).max()) > 1e-4
    # the afferent kernel only reaches a(T) through the drive of the last K loops
    assert float(jnp.abs(g_trunc.w_ff - g_full.w_ff).max()) > 1e-4


def test_implicit_gradient_matches_long_unroll_at_a_fixed_point(key):
    """At a converged fixed point, the IFT gradient equals BPTT through a long unroll."""
    config = LateralConfig.paper(activation="tanh")
    params, x = make(key, config, scale=0.05)
    out = recurrence.unroll(
        params,
        x,
        num_steps=0,
        config=config,
        grad_mode="implicit",
        return_states=False,
        implicit_tol=1e-7,
        implicit_max_steps=200,
    )
    assert float(out.residual) < 1e-5
    long = recurrence.unroll(params, x, num_steps=60, config=config)
    chex.assert_trees_all_close(out.final, long.final, atol=1e-5)
    g_implicit = jax.grad(_loss("implicit", 0, config, implicit_tol=1e-7, implicit_max_steps=200))(params, x)
    g_long = jax.grad(_loss("full", 60, config))(params, x)
    chex.assert_trees_all_close(g_implicit, g_long, atol=1e-4, rtol=1e-3)


def test_implicit_reports_a_large_residual_when_not_converged(key):
    params, x = make(key, scale=3.0)
    out = recurrence.unroll(
        params, x, num_steps=0, config=PAPER, grad_mode="implicit", return_states=False, implicit_max_steps=2
    )
    assert float(out.residual) > 1e-3


@pytest.mark.parametrize("kernel_size,lateral_size,num_steps", [(3, 3, 0), (3, 3, 2), (5, 3, 3), (3, 5, 2), (1, 7, 1)])
def test_single_pixel_receptive_field_grows_by_the_kernel_arithmetic(kernel_size, lateral_size, num_steps):
    """A one-hot input spreads to radius (k-1)/2 + T (l-1)/2 (positive kernels, identity f)."""
    config = LateralConfig.paper(kernel_size=kernel_size, lateral_size=lateral_size, activation="identity")
    hw, c = 21, 2
    params = LateralParams(
        w_ff=jnp.ones((kernel_size, kernel_size, 1, c)),
        b_ff=jnp.zeros((c,)),
        w_lat=jnp.full((lateral_size, lateral_size, c, c), 0.1),
    )
    x = jnp.zeros((1, hw, hw, 1)).at[0, hw // 2, hw // 2, 0].set(1.0)
    out = recurrence.unroll(params, x, num_steps=num_steps, config=config).final[0, :, :, 0]
    rows, cols = np.nonzero(np.asarray(out) > 0)
    radius = recurrence.receptive_field_radius(kernel_size=kernel_size, lateral_size=lateral_size, num_steps=num_steps)
    assert rows.min() == hw // 2 - radius and rows.max() == hw // 2 + radius
    assert cols.min() == hw // 2 - radius and cols.max() == hw // 2 + radius


def test_group_norm_normalises_each_group():
    x = jax.random.normal(jax.random.key(3), (2, 5, 5, 4)) * 3.0 + 1.0
    y = recurrence.group_norm(x, NormParams(jnp.ones(4), jnp.zeros(4)), num_groups=2)
    g = np.asarray(y).reshape(2, 5, 5, 2, 2)
    np.testing.assert_allclose(g.mean(axis=(1, 2, 4)), 0.0, atol=1e-5)
    np.testing.assert_allclose(g.var(axis=(1, 2, 4)), 1.0, atol=1e-3)


def test_two_population_form_adds_both_kernels(key):
    config = LateralConfig.paper(inhibitory_size=5)
    params, x = make(key, config)
    assert params.w_inh.shape == (5, 5, 4, 4)
    out = recurrence.unroll(params, x, num_steps=1, config=config)
    drive = recurrence.afferent_drive(params, x, config)
    a0 = jax.nn.relu(drive)
    expected = jax.nn.relu(drive + recurrence.conv(a0, params.w_lat) + recurrence.conv(a0, params.w_inh))
    chex.assert_trees_all_close(out.final, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the parameter, the value and the fix.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_steps,match",
    [
        (-1, "num_steps=-1 is negative"),
        (2.5, "num_steps=2.5 must be a non-negative Python int"),
        (True, "num_steps=True"),
    ],
)
def test_bad_num_steps(key, num_steps, match):
    params, x = make(key)
    with pytest.raises(ValueError, match=match):
        recurrence.unroll(params, x, num_steps=num_steps, config=PAPER)


@pytest.mark.parametrize(
    "field,value",
    [("kernel_size", 4), ("lateral_size", 0), ("lateral_size", -3), ("inhibitory_size", 2), ("kernel_size", 3.0)],
)
def test_bad_kernel_sizes(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} must be a positive odd integer"):
        LateralConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("drive_norm", "batch", "drive_norm='batch' is not supported; choose one of 'none', 'group', 'layer'"),
        ("loop_norm", "instance", "loop_norm='instance' is not supported"),
        ("activation", "swish", "activation='swish' is not supported"),
        ("mixing", "grouped", "mixing='grouped' is not supported"),
        ("leak", 0.0, r"leak=0.0 must lie in \(0, 1\]"),
    ],
)
def test_bad_config_choices(field, value, match):
    with pytest.raises(ValueError, match=match):
        LateralConfig(**{field: value})


def test_unknown_grad_mode(key):
    params, x = make(key)
    with pytest.raises(
        ValueError, match="grad_mode='bptt' is not supported; choose one of 'full', 'remat', 'truncated', 'implicit'"
    ):
        recurrence.unroll(params, x, num_steps=2, config=PAPER, grad_mode="bptt")


def test_truncated_needs_positive_k(key):
    params, x = make(key)
    with pytest.raises(ValueError, match="truncate_steps=K, a positive int"):
        recurrence.unroll(params, x, num_steps=2, config=PAPER, grad_mode="truncated")


def test_channel_mismatch_and_nchw_input(key):
    params, x = make(key, cin=3, hw=6)
    with pytest.raises(ValueError, match="input has 5 channels on its last \\(NHWC\\) axis but W_ff expects 3"):
        recurrence.unroll(params, jnp.zeros((2, 6, 6, 5)), num_steps=1, config=PAPER)
    with pytest.raises(ValueError, match="looks like NCHW: transpose with x.transpose\\(0, 2, 3, 1\\)"):
        recurrence.unroll(params, jnp.zeros((2, 3, 6, 6)), num_steps=1, config=PAPER)


def test_wrong_rank_input(key):
    params, _ = make(key)
    with pytest.raises(ValueError, match=r"rank-4 NHWC batch .* got shape \(6, 6, 3\) \(rank 3\)\. Add a batch axis"):
        recurrence.unroll(params, jnp.zeros((6, 6, 3)), num_steps=1, config=PAPER)


def test_params_and_config_disagree(key):
    params, x = make(key)
    with pytest.raises(ValueError, match=r"W_lat has shape \(3, 3, 4, 4\) but a 'depthwise' lateral kernel"):
        recurrence.unroll(params, x, num_steps=1, config=LateralConfig.paper(mixing="depthwise"))
    with pytest.raises(ValueError, match="num_groups=8 does not divide the 4 channels"):
        recurrence.init_params(key, in_channels=3, out_channels=4, config=LateralConfig.stable())


def test_implicit_mode_refuses_to_record_states(key):
    params, x = make(key)
    with pytest.raises(ValueError, match="return_states=False"):
        recurrence.unroll(params, x, num_steps=1, config=PAPER, grad_mode="implicit")


@pytest.mark.parametrize("num_steps", [1, 3])
def test_full_unroll_emits_no_loop(key, num_steps):
    """A fully unrolled loop has no ``scan``/``while`` left: XLA:CPU's gradient of a convolution
    inside any while loop is pathological (jax#12868; T = 1 trained 12× slower than after the fix)."""
    params, x = make(key)
    jaxpr = str(
        jax.make_jaxpr(
            jax.grad(
                lambda p: jnp.sum(recurrence.unroll(p, x, num_steps=num_steps, config=PAPER, scan_unroll=True).final)
            )
        )(params)
    )
    assert "scan" not in jaxpr and "while" not in jaxpr
    rolled = str(
        jax.make_jaxpr(lambda p: recurrence.unroll(p, x, num_steps=num_steps, config=PAPER, scan_unroll=1))(params)
    )
    assert ("scan" in rolled) == (num_steps > 1)  # a one-trip loop is never emitted


@pytest.mark.parametrize("chunks,scan_unroll", [(2, 1), (3, True)], ids=["2-rolled", "3-unrolled"])
def test_remat_batch_chunks_give_the_full_gradient_and_states(key, chunks, scan_unroll):
    """Chunking the batch under remat is exact: same a(T), a(0..T), residual and gradient as BPTT."""
    params, x = make(key, STABLE, batch=6, scale=0.5)

    def loss(p, grad_mode, remat_batch_chunks="auto"):
        out = recurrence.unroll(
            p, x, num_steps=5, config=STABLE, grad_mode=grad_mode, scan_unroll=scan_unroll,
            remat_batch_chunks=remat_batch_chunks,
        )  # fmt: skip
        weights = jnp.arange(x.shape[0], dtype=jnp.float32).reshape(1, -1, 1, 1, 1)  # tells examples apart
        return jnp.sum(out.final**2) + jnp.sum(weights * out.states) + out.residual, out

    (ref, ref_out), g_ref = jax.value_and_grad(loss, has_aux=True)(params, "full")
    (got, got_out), g_got = jax.value_and_grad(loss, has_aux=True)(params, "remat", chunks)
    chex.assert_trees_all_close(got_out, ref_out, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(got, ref, rtol=1e-6)
    # ∂W_lat sums over loops, examples and pixels in another order: 2.1e-5 seen on an Intel Xeon CPU.
    chex.assert_trees_all_close(g_got, g_ref, atol=1e-4, rtol=1e-4)


def test_default_remat_batch_chunks_is_the_largest_divisor_up_to_root_t():
    assert recurrence.default_remat_batch_chunks(128, 64) == 8
    assert recurrence.default_remat_batch_chunks(128, 16) == 4
    assert recurrence.default_remat_batch_chunks(128, 1) == 1
    assert recurrence.default_remat_batch_chunks(6, 16) == 3
    assert recurrence.default_remat_batch_chunks(7, 36) == 1  # 7 is prime, √36 = 6
    assert recurrence.default_remat_batch_chunks(2, 64) == 2


def test_remat_batch_chunks_must_divide_the_batch(key):
    params, x = make(key, batch=6)
    with pytest.raises(
        ValueError, match="remat_batch_chunks=4 must be 'auto' or a positive int that divides the batch"
    ):
        recurrence.unroll(params, x, num_steps=2, grad_mode="remat", remat_batch_chunks=4)


def _grad_step_memory(config, num_steps, grad_mode, batch=16):
    params, x = make(jax.random.key(0), config, cin=16, cout=16, hw=8, batch=batch)
    loss = _loss(grad_mode, num_steps, config)
    mem = jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis()
    return mem.temp_size_in_bytes


def test_remat_memory_does_not_grow_with_t():
    """XLA's buffer plan for the gradient: remat at T = 16 within 1.5× of T = 1; BPTT is not, already at T = 4."""
    config = LateralConfig.paper(conv_algorithm="winograd")  # no XLA conv in the loop: rolled chunks
    base = _grad_step_memory(config, 1, "full")
    assert _grad_step_memory(config, 16, "remat") <= 1.5 * base  # measured 0.80×
    assert _grad_step_memory(config, 4, "full") > 1.5 * base  # measured 1.71×


def test_remat_batch_chunks_on_a_batch_sharded_over_8_devices_equal_bptt(key, monkeypatch):
    """Chunked remat with Winograd convolutions cut into 2-4 batch chunks, on a batch split over 8
    devices: the same loss and gradient as unsharded BPTT (strided chunks keep the sharding)."""
    from lateral_jax.kernels import winograd

    monkeypatch.setattr(winograd, "CHUNK_ELEMENTS", 1 << 13)  # 16 images of 8×8×8 → 4 Winograd chunks
    config = LateralConfig.stable(num_groups=2, conv_algorithm="winograd")
    params, x = make(key, config, cin=3, cout=8, hw=8, batch=16, scale=0.5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    x8 = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))

    def loss(p, x, grad_mode):
        out = recurrence.unroll(p, x, num_steps=4, config=config, grad_mode=grad_mode, return_states=False)
        return jnp.sum(jnp.sin(out.final) * jnp.arange(x.shape[0]).reshape(-1, 1, 1, 1))

    ref = jax.value_and_grad(loss)(params, x, "full")
    got = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, x8, "remat")  # 2 remat slices
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref), strict=True):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))  # summation order only
