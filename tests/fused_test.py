"""The fused Pallas loop kernel (lateral_jax/fused.py) against the XLA reference loop.

Run in Pallas's interpreter on CPU: the same kernel programs (forward and hand-written backward), so
these check their numerics; the GPU lowering is checked by lowering both for CUDA (Triton calls) on
this machine.  Tolerances (stated in
the README): float32 states and gradients within 1e-5 · max |reference| (the kernel sums taps and
GroupNorm moments in a different order); bfloat16 kernel vs the float32 reference: 5e-2.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import fused_check
from lateral_jax.core import recurrence
from lateral_jax.core.recurrence import LateralConfig, NormParams
from lateral_jax.core.sharding import make_mesh
from lateral_jax.kernels import fused
from lateral_jax.training.optimizer import OptimizerConfig, make_optimizer
from lateral_jax.training.sharding import replicate, shard_batch

rel_err = fused_check.rel_err  # max |Δ| / max |reference|, in float32


def layer(key, config, channels):
    params = recurrence.init_params(key, in_channels=3, out_channels=channels, config=config)
    if params.loop_norm is not None:  # a non-trivial affine, so its gradient is tested too
        params = params._replace(loop_norm=NormParams(params.loop_norm.scale * 1.3, params.loop_norm.bias + 0.1))
    return params


CASES = [  # (config, (batch, height, width, channels, T))
    (LateralConfig(loop_norm="group", num_groups=4, lateral_init_scale=1.0), (2, 8, 8, 16, 3)),
    (
        LateralConfig(loop_norm="layer", leak=0.5, activation="gelu", lateral_size=5, lateral_init_scale=1.0),
        (1, 6, 6, 32, 2),  # 36 pixels: one 64-pixel tile with 28 zero tail rows
    ),
]


@pytest.mark.parametrize("config,shape", CASES, ids=["groupnorm-relu-3x3", "layernorm-leak-gelu-5x5"])
def test_fused_loops_match_the_xla_loop_values_and_gradients(key, config, shape):
    b, h, w, c, num_steps = shape
    params = layer(key, config, c)
    x = jax.random.normal(jax.random.key(1), (b, h, w, 3))
    fused_config = dataclasses.replace(config, loop_kernel="pallas")

    @functools.partial(jax.jit, static_argnums=1)
    def run_and_grad(p, cfg):  # one compilation per path: the states and the gradient of a loss of them
        def loss(p):  # touches the final state and an intermediate one, non-linearly
            u = recurrence.unroll(p, x, num_steps=num_steps, config=cfg)
            return jnp.sum(jnp.sin(u.final)) + jnp.sum(jnp.square(u.states[1])), u

        (_, out), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return out, grads

    (ref, want), (got, have) = run_and_grad(params, config), run_and_grad(params, fused_config)
    assert got.states.shape == (num_steps + 1, b, h, w, c)
    assert rel_err(got.states, ref.states) < 1e-5
    assert abs(float(got.residual) - float(ref.residual)) < 1e-5
    flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
    for (path, r), g in zip(flat_want, jax.tree_util.tree_leaves(have), strict=True):
        assert rel_err(g, r) < 1e-5, jax.tree_util.keystr(path)


def test_fused_bfloat16_tracks_the_float32_reference(key):
    config = LateralConfig(drive_norm="group", loop_norm="group", num_groups=4, lateral_init_scale=1.0)
    params = layer(key, config, 16)
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
    drive32 = recurrence.afferent_drive(params, x, config)
    ref = recurrence.recur(params, drive32, num_steps=2, config=config)
    got = recurrence.recur(
        params, drive32.astype(jnp.bfloat16), num_steps=2, config=dataclasses.replace(config, loop_kernel="pallas")
    )
    assert got.states.dtype == jnp.bfloat16
    assert rel_err(got.states, ref.states) < 5e-2


def test_fused_kernels_lower_to_triton_calls_for_cuda(key):
    """Both kernels use only what Pallas's Triton lowering supports (block sides powers of two, ...)."""
    config = LateralConfig(loop_norm="group", num_groups=8)
    params = recurrence.init_params(key, in_channels=64, out_channels=64, config=config)
    drive = jnp.zeros((2, 32, 32, 64), jnp.bfloat16)

    def loss(p, d):
        return jnp.sum(fused.loop_states(p, d, d, num_steps=2, config=config, interpret=False).astype(jnp.float32))

    hlo = jax.jit(jax.grad(loss)).trace(params, drive).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("xla.gpu.triton") == 2  # the forward and the backward kernel


@pytest.mark.parametrize(
    "config,channels,grad_mode,message",
    [
        (LateralConfig(), 24, "full", "24 channels (needs a power of two >= 16)"),
        (LateralConfig(mixing="depthwise"), 16, "full", "mixing='depthwise'"),
        (LateralConfig(), 16, "remat", "got grad_mode='remat'"),
    ],
    ids=["channels", "depthwise", "grad-mode"],
)
def test_fused_kernel_says_what_it_cannot_run(key, config, channels, grad_mode, message):
    pallas = dataclasses.replace(config, loop_kernel="pallas")
    params = recurrence.init_params(key, in_channels=3, out_channels=channels, config=pallas)
    with pytest.raises(ValueError, match="loop_kernel") as err:
        recurrence.unroll(params, jnp.zeros((1, 8, 8, 3)), num_steps=2, config=pallas, grad_mode=grad_mode)
    assert message in str(err.value)
    assert "loop_kernel='xla'" in str(err.value)


def test_unshared_control_refuses_the_fused_kernel(key):
    config = LateralConfig(loop_kernel="pallas")
    params = recurrence.init_params(key, in_channels=3, out_channels=16, config=config)
    params = params._replace(w_lat=jnp.stack([params.w_lat, params.w_lat]))  # T = 2 kernels of their own
    with pytest.raises(ValueError, match="the unshared control runs its loops in XLA"):
        recurrence.unroll_unshared(params, jnp.zeros((1, 8, 8, 3)), config=config)


def test_loop_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="loop_kernel"):
        LateralConfig(loop_kernel="triton")


def test_fused_check_passes_on_a_model_without_norms():
    """experiments/fused_check.py (run on a GPU before benchmarking): a whole LateralCNN with the
    raw layer (no norm), logits and every parameter gradient, fused vs XLA."""
    row = fused_check.check("paper", "float32", (16,), batch=1, num_steps=2, iters=1)
    assert row["ok"], row
    assert row["xla_max_rel_err"] == 0.0  # the float32 XLA path is the reference itself
    assert 0.0 < row["max_rel_err"] < 1e-4


def test_fused_kernel_trains_data_parallel_on_8_devices_like_xla_on_1():
    """Under train.jit_train_step's mesh the kernel runs in shard_map, one call per device."""
    from lateral_jax.core import models
    from lateral_jax.training import train

    assert len(jax.devices()) >= 8, "conftest sets --xla_force_host_platform_device_count=8"
    lateral = LateralConfig.stable(num_groups=4, lateral_init_scale=0.5)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((8, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, (8,)).astype(np.int32),
    }

    def one_step(num_devices, loop_kernel):
        mesh = make_mesh(jax.devices()[:num_devices])
        config = dataclasses.replace(lateral, loop_kernel=loop_kernel)
        model = models.LateralCNN(widths=(16,), num_classes=10, num_steps=2, lateral=config)
        tx = make_optimizer(OptimizerConfig(name="momentum", learning_rate=0.1, schedule="constant"))
        state = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 16, 16, 3))), mesh)
        state, metrics = train.jit_train_step(model, tx, mesh)(state, shard_batch(batch, mesh))
        return jax.device_get(state.params), float(metrics["loss"])

    (want, loss_want), (got, loss_got) = one_step(1, "xla"), one_step(8, "pallas")
    assert abs(loss_got - loss_want) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fused_kernel_needs_a_batch_that_splits_over_the_mesh(key):

    config = LateralConfig(loop_kernel="pallas")
    params = recurrence.init_params(key, in_channels=3, out_channels=16, config=config)
    mesh = make_mesh(jax.devices()[:8])
    too_small = jnp.zeros((4, 8, 8, 3))  # 4 examples, 8 devices
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        with pytest.raises(ValueError, match="does not split over the 8"):
            recurrence.unroll(params, too_small, num_steps=1, config=config)


def test_fused_kernel_in_forward_mode_and_linearize_equals_the_xla_loop_and_grad_keeps_its_kernel(key):
    """jax.jvp / jax.linearize / jax.jacfwd through the fused loops equal the XLA loop's; jax.grad
    still runs the hand-written backward kernel (its Pallas call is in the gradient's program)."""
    config, (b, h, w, c, num_steps) = CASES[0]
    params = layer(key, config, c)
    x = jax.random.normal(jax.random.key(1), (b, h, w, 3))
    direction = jax.random.normal(jax.random.key(2), params.w_lat.shape)

    def final(w_lat, cfg):
        return recurrence.unroll(params._replace(w_lat=w_lat), x, num_steps=num_steps, config=cfg).final

    fused_config = dataclasses.replace(config, loop_kernel="pallas")
    (y_ref, dy_ref), (y, dy) = (
        jax.jvp(lambda v, c=cfg: final(v, c), (params.w_lat,), (direction,)) for cfg in (config, fused_config)
    )
    assert rel_err(y, y_ref) < 1e-5 and rel_err(dy, dy_ref) < 1e-5
    y_lin, f_jvp = jax.linearize(lambda v: final(v, fused_config), params.w_lat)
    assert rel_err(f_jvp(direction), dy_ref) < 1e-5
    small = params.w_lat[:, :, :2]  # jacfwd over a slice of the kernel keeps the test small

    def final_of_slice(s, cfg):
        return final(params.w_lat.at[:, :, :2].set(s), cfg)[0, :2, :2, :2]

    jf = jax.jacfwd(lambda s: final_of_slice(s, fused_config))(small)
    assert rel_err(jf, jax.jacrev(lambda s: final_of_slice(s, config))(small)) < 1e-5
    grad_program = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(final(v, fused_config) ** 2)))(params.w_lat))
    assert "lateral_loops_grad" in grad_program
