"""The train and eval steps under a user's ``jax.pmap`` and ``jax.shard_map`` (``axis_name=``)
against the library's ``jax.jit`` + sharding step, on 8 fake CPU devices."""

import functools

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lateral_jax.core.sharding import DATA_AXIS
from lateral_jax.training import train
from lateral_jax.training.sharding import shard_batch
from tests.train_test import setup

# The three forms all-reduce the same per-device gradients in different orders: float32 summation
# tolerance, as for the 1-device vs 8-device comparison.
TOL = {"atol": 1e-6, "rtol": 1e-5}
EXACT_METRICS = ("loss", "ce", "ei_penalty", "accuracy", "grad_norm")


def _jit_reference(steps=2):
    model, tx, mesh, state, batch = setup(8)
    step = train.jit_train_step(model, tx, mesh)
    for _ in range(steps):
        state, metrics = step(state, shard_batch(batch, mesh))
    evaluated = train.jit_eval_step(model, mesh)(state.params, shard_batch(batch, mesh))
    return jax.device_get((state, metrics, evaluated))


def _check(got, want):
    (state, metrics, evaluated), (ref_state, ref_metrics, ref_evaluated) = got, want
    chex.assert_trees_all_close(state.params, ref_state.params, **TOL)
    chex.assert_trees_all_close(state.opt_state, ref_state.opt_state, **TOL)
    assert int(state.step) == int(ref_state.step) == 2
    for k in EXACT_METRICS:
        assert float(metrics[k]) == pytest.approx(float(ref_metrics[k]), rel=1e-5, abs=1e-6), k
    # A per-shard ratio of norms, averaged: close to the whole batch's, not equal.
    assert float(metrics["final_loop_change"]) == pytest.approx(float(ref_metrics["final_loop_change"]), rel=0.2)
    assert {k: int(v) for k, v in evaluated.items() if k != "loss_sum"} == {
        k: int(v) for k, v in ref_evaluated.items() if k != "loss_sum"
    }
    assert float(evaluated["loss_sum"]) == pytest.approx(float(ref_evaluated["loss_sum"]), rel=1e-5)


def test_pmap_step_equals_the_jit_step():
    model, tx, _, state, batch = setup(8)
    state = jax.device_get(state)
    step = jax.pmap(functools.partial(train.train_step, model=model, tx=tx, axis_name="batch"), axis_name="batch")
    evaluate = jax.pmap(functools.partial(train.eval_step, model=model, axis_name="batch"), axis_name="batch")
    replicated = jax.tree.map(lambda x: np.stack([np.asarray(x)] * 8), state)  # one copy per device
    shards = jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch)
    for _ in range(2):
        replicated, metrics = step(replicated, shards)
    evaluated = evaluate(replicated.params, shards)
    # Every replica holds the same state (they would drift apart without the gradient pmean).
    for leaf in jax.tree.leaves(replicated.params):
        np.testing.assert_array_equal(np.asarray(leaf)[0], np.asarray(leaf)[-1])
    first = jax.tree.map(lambda x: np.asarray(x)[0], (replicated, metrics, evaluated))
    _check(first, _jit_reference())


def test_shard_map_step_equals_the_jit_step():
    model, tx, mesh, state, batch = setup(8)
    step = jax.jit(
        jax.shard_map(
            functools.partial(train.train_step, model=model, tx=tx, axis_name=DATA_AXIS),
            mesh=mesh,
            in_specs=(P(), P(DATA_AXIS)),
            out_specs=(P(), P()),
        )
    )
    evaluate = jax.jit(
        jax.shard_map(
            functools.partial(train.eval_step, model=model, axis_name=DATA_AXIS),
            mesh=mesh,
            in_specs=(P(), P(DATA_AXIS)),
            out_specs=P(),
        )
    )
    data = jax.device_put(batch, NamedSharding(mesh, P(DATA_AXIS)))
    for _ in range(2):
        state, metrics = step(state, data)
    _check(jax.device_get((state, metrics, evaluate(state.params, data))), _jit_reference())


def _layer_derivatives(grad_mode: str, batch_axes: tuple[str, ...] = ()):
    """A lateral layer, its inputs and ``derivatives(p, x, cot, axis)``: the summed loss, its
    gradient and a forward-mode derivative (``psum`` over ``axis`` when given)."""
    from lateral_jax.core import recurrence
    from lateral_jax.core.config import LateralConfig, LoopOptions
    from lateral_jax.core.params import init_params

    config = LateralConfig.stable(num_groups=2, lateral_init_scale=0.5)
    params = init_params(jax.random.key(0), in_channels=3, out_channels=4, config=config)
    x = jax.random.normal(jax.random.key(1), (16, 6, 6, 3))
    cot = jax.random.normal(jax.random.key(2), (16, 6, 6, 4))
    loop = LoopOptions(
        grad_mode=grad_mode,
        implicit_tol=1e-6,
        implicit_max_steps=200,
        truncate_steps=2 if grad_mode == "truncated" else None,
        batch_axes=batch_axes,
    )

    def loss(p, x, cot, axis=None):
        out = recurrence.unroll(p, x, num_steps=6, config=config, loop=loop, return_states=False)
        total = jax.numpy.sum(out.final * cot)
        return total if axis is None else jax.lax.psum(total, axis)

    def derivatives(p, x, cot, axis=None):
        value, grads = jax.value_and_grad(lambda q: loss(q, x, cot, axis))(p)
        tangent = jax.tree.map(jax.numpy.ones_like, p)
        _, directional = jax.jvp(lambda q: loss(q, x, cot, axis), (p,), (tangent,))
        return value, grads, directional

    return params, x, cot, derivatives


@pytest.mark.parametrize("grad_mode", ["implicit", "truncated", "remat"])
def test_every_grad_mode_under_shard_map_equals_one_device(grad_mode):
    """The layer inside a user's ``jax.shard_map`` (batch split over 8 devices, parameters replicated):
    the loss, its gradient and a forward-mode derivative equal one device's within float32 tolerance.
    In implicit mode the fixed-point iteration stops on the whole batch's change (a ``psum``), the
    same step on every device; before, its ``while_loop`` carry did not type-check under shard_map."""
    from lateral_jax.core.sharding import make_mesh

    params, x, cot, derivatives = _layer_derivatives(grad_mode)
    want = derivatives(params, x, cot)
    sharded = jax.jit(
        jax.shard_map(
            functools.partial(derivatives, axis=DATA_AXIS),
            mesh=make_mesh(),
            in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
            out_specs=(P(), P(), P()),
        )
    )
    got = sharded(params, x, cot)
    chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("grad_mode", ["implicit", "truncated"])
def test_implicit_and_truncated_modes_under_pmap_equal_one_device(grad_mode):
    """The same under ``jax.pmap`` (each device differentiates its shard's loss, then ``psum``): its
    arrays carry no axis types, so the implicit solve is told the batch axis
    (``LoopOptions(batch_axes=("batch",))``) and stops on the whole batch's change; every device
    returns one device's loss, gradient and directional derivative."""
    params, x, cot, derivatives = _layer_derivatives(grad_mode)
    want = derivatives(params, x, cot)
    _, _, _, local = _layer_derivatives(grad_mode, batch_axes=("batch",))
    split = lambda a: a.reshape(8, -1, *a.shape[1:])  # noqa: E731
    step = lambda p, x, cot: jax.lax.psum(local(p, x, cot), "batch")  # noqa: E731
    got = jax.pmap(step, axis_name="batch", in_axes=(None, 0, 0))(params, split(x), split(cot))
    for device in range(8):
        chex.assert_trees_all_close(jax.tree.map(lambda a, d=device: a[d], got), want, atol=1e-4, rtol=1e-5)


def test_pmap_implicit_solve_stops_at_the_same_step_on_every_device():
    """``global_relative_change`` with ``batch_axes`` under ``jax.pmap`` is the whole batch's
    relative change on every device (without it, each device's own)."""
    from lateral_jax.core.cell import relative_change
    from lateral_jax.core.implicit import global_relative_change

    new = jax.random.normal(jax.random.key(0), (16, 4))
    old = new + jax.random.normal(jax.random.key(1), (16, 4)) * jax.numpy.arange(16.0)[:, None]
    want = relative_change(new, old)
    split = lambda a: a.reshape(8, -1, *a.shape[1:])  # noqa: E731
    synced = jax.pmap(lambda n, o: global_relative_change(n, o, ("batch",)), axis_name="batch")(split(new), split(old))
    np.testing.assert_allclose(np.asarray(synced), np.full(8, float(want)), rtol=1e-6)
    alone = jax.pmap(global_relative_change)(split(new), split(old))
    assert np.ptp(np.asarray(alone)) > 0.1


def test_data_parallel_helper_fixes_the_naive_steps_device_count_error():
    """In a user's own ``shard_map`` step with replicated parameters, a naive ``value_and_grad`` of each
    device's mean loss returns 8 × the gradient of the global mean on 8 devices; the library's
    helper returns that gradient (and the global mean loss)."""
    from lateral_jax.core import recurrence
    from lateral_jax.core.config import LateralConfig
    from lateral_jax.core.params import init_params
    from lateral_jax.core.sharding import data_parallel_value_and_grad, make_mesh

    config = LateralConfig.stable(num_groups=2)
    params = init_params(jax.random.key(0), in_channels=3, out_channels=4, config=config)
    x = jax.random.normal(jax.random.key(1), (16, 6, 6, 3))

    def loss(p, x):
        return jax.numpy.mean(recurrence.unroll(p, x, num_steps=2, config=config, return_states=False).final ** 2)

    want_loss, want_grads = jax.value_and_grad(loss)(params, x)

    def naive(p, x):
        value, grads = jax.value_and_grad(loss)(p, x)
        return jax.lax.pmean(value, DATA_AXIS), grads

    def run(step):
        return jax.jit(jax.shard_map(step, mesh=make_mesh(), in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P())))(
            params, x
        )

    _, naive_grads = run(naive)
    chex.assert_trees_all_close(naive_grads, jax.tree.map(lambda g: 8 * g, want_grads), rtol=1e-5, atol=1e-6)
    got_loss, got_grads = run(data_parallel_value_and_grad(loss))
    chex.assert_trees_all_close((got_loss, got_grads), (want_loss, want_grads), rtol=1e-5, atol=1e-7)
    with_aux = data_parallel_value_and_grad(lambda p, x: (loss(p, x), x.shape[0]), has_aux=True)
    ((aux_loss, per_device), aux_grads) = jax.jit(
        jax.shard_map(with_aux, mesh=make_mesh(), in_specs=(P(), P(DATA_AXIS)), out_specs=((P(), P()), P()))
    )(params, x)
    assert int(per_device) == 2
    chex.assert_trees_all_close((aux_loss, aux_grads), (want_loss, want_grads), rtol=1e-5, atol=1e-7)
