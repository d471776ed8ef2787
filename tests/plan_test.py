"""Run policy resolved once (``lateral_jax.core.plan``): each backend's plan, traced on the CPU, gives
the program its plan says (a Python-unrolled loop on CPU, a ``lax.scan`` on GPU and TPU) and the
same values."""

import chex
import jax
import jax.numpy as jnp
import pytest

from lateral_jax.core import hgru, plan, recurrence
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.params import init_params


def test_each_backends_plan_is_concrete():
    auto = LateralConfig.stable(num_groups=2)
    cpu, gpu, tpu = (plan.resolve(auto, b) for b in ("cpu", "gpu", "tpu"))
    assert (cpu.config.conv_algorithm, gpu.config.conv_algorithm, tpu.config.conv_algorithm) == ("auto", "xla", "xla")
    assert (cpu.python_loops, gpu.python_loops, tpu.python_loops) == (True, False, False)
    assert (cpu.pallas_interpret, gpu.pallas_interpret, tpu.pallas_interpret) == (True, False, True)
    explicit = LateralConfig.stable(num_groups=2, conv_algorithm="winograd")
    assert plan.resolve(explicit, "gpu").config.conv_algorithm == "winograd"  # a user's explicit choice stays
    assert plan.resolve(auto).backend == jax.default_backend() == "cpu"
    loop = LoopOptions()
    assert [cpu.scan_unroll(t, loop) for t in (4, 16, 32, 33)] == [True, True, True, 1]
    assert [gpu.scan_unroll(t, loop) for t in (4, 16, 17)] == [True, True, 1]
    assert cpu.scan_unroll(4, LoopOptions(scan_unroll=2)) == 2


def _has_scan(fn, *args) -> bool:
    return "scan[" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("grad_mode", ["full", "remat", "truncated"])
def test_gpu_and_tpu_plans_scan_where_the_cpu_plan_unrolls_and_all_agree(grad_mode):
    config = LateralConfig.stable(num_groups=2)
    params = init_params(jax.random.key(0), in_channels=3, out_channels=4, config=config)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    loop = LoopOptions(grad_mode=grad_mode, truncate_steps=2 if grad_mode == "truncated" else None)

    def loss(p, backend):
        out = recurrence.unroll(p, x, num_steps=4, config=config, loop=loop, return_states=False, backend=backend)
        return jnp.sum(out.final**2)

    # the same values; gradients up to float32 summation order (a scan's backward sums in another order)
    assert not _has_scan(lambda p: loss(p, "cpu"), params)
    for backend in ("gpu", "tpu"):
        assert _has_scan(lambda p, b=backend: loss(p, b), params)
    want = jax.value_and_grad(loss)(params, "cpu")
    for backend in ("gpu", "tpu"):
        chex.assert_trees_all_close(jax.value_and_grad(loss)(params, backend), want, rtol=2e-4, atol=1e-5)


def test_long_cpu_loops_and_the_hgru_follow_their_plans():
    config = LateralConfig.stable(num_groups=2)
    params = init_params(jax.random.key(0), in_channels=1, out_channels=2, config=config)
    x = jnp.ones((1, 4, 4, 1))
    run = lambda p, t, b: recurrence.unroll(p, x, num_steps=t, config=config, return_states=False, backend=b).final  # noqa: E731
    assert not _has_scan(lambda p: run(p, 32, "cpu"), params)
    assert _has_scan(lambda p: run(p, 33, "cpu"), params)  # long loops roll on every backend
    hgru_config = hgru.HGRUConfig(kernel_size=3, num_groups=1)
    h_params = hgru.init_params(jax.random.key(0), 2, hgru_config)
    drive = jnp.ones((1, 4, 4, 2))
    h_run = lambda b: hgru.run(h_params, drive, num_steps=4, config=hgru_config, backend=b).final  # noqa: E731
    assert not _has_scan(lambda: h_run("cpu")) and _has_scan(lambda: h_run("gpu"))
    chex.assert_trees_all_close(h_run("gpu"), h_run("cpu"), rtol=1e-5, atol=1e-6)


def test_a_loop_kernel_and_grad_mode_clash_fails_when_the_layer_is_built():
    """``loop_kernel="pallas"`` computes BPTT only: the Linen and NNX layers refuse another grad mode
    (and the unshared control) at construction, before anything is traced."""
    from flax import nnx

    from lateral_jax.core import layers, nnx_models

    pallas = LateralConfig.stable(num_groups=2, loop_kernel="pallas")
    remat = LoopOptions(grad_mode="remat")
    with pytest.raises(ValueError, match="loop_kernel='pallas' computes the full BPTT gradient"):
        layers.LateralConv(features=4, config=pallas, loop=remat)
    with pytest.raises(ValueError, match="unshared control runs its loops in XLA"):
        layers.LateralConv(features=4, config=pallas, unshared=True)
    with pytest.raises(ValueError, match="loop_kernel='pallas' computes the full BPTT gradient"):
        layers.LateralRecurrence(config=pallas, loop=remat)
    with pytest.raises(ValueError, match="loop_kernel='pallas' computes the full BPTT gradient"):
        nnx_models.LateralConv(3, 4, config=pallas, loop=remat, rngs=nnx.Rngs(0))
    layers.LateralConv(features=4, config=pallas)  # full BPTT: fine
