"""Tests of the train/eval steps and the data-parallel wiring (lateral_jax/train.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lateral_jax.core import models
from lateral_jax.core.recurrence import LateralConfig
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import device_epochs, train
from lateral_jax.training.optimizer import OptimizerConfig, make_optimizer
from lateral_jax.training.sharding import check_batch_size, replicate, shard_batch

SMALL = LateralConfig.stable(num_groups=2)


def setup(num_devices, batch=16, ei_mode="mixed_sign"):
    model = models.LCEICNN(widths=(4, 8), num_steps=2, lateral=SMALL, ei_mode=ei_mode, ei_weight=1e-2)
    tx = make_optimizer(OptimizerConfig(name="momentum", learning_rate=0.1, total_steps=10), ei_mode=ei_mode)
    mesh = make_mesh(jax.devices()[:num_devices])
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.standard_normal((batch, 16, 16, 3)).astype(np.float32),
        "label": rng.integers(0, 10, batch).astype(np.int32),
    }
    state = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, 16, 16, 3))), mesh)
    return model, tx, mesh, state, batch


def test_eight_devices_exist():
    assert jax.device_count() == 8, "conftest sets --xla_force_host_platform_device_count=8"


def test_data_parallel_step_equals_single_device_step():
    """One step on 8 devices (batch split 8 ways, all-reduced gradient) equals one step on 1 device
    with the same global batch, to float32 summation-order tolerance (atol 1e-6, rtol 1e-5)."""
    results = {}
    for n in (1, 8):
        model, tx, mesh, state, batch = setup(n)
        step = train.jit_train_step(model, tx, mesh)
        for _ in range(2):
            state, metrics = step(state, shard_batch(batch, mesh))
        results[n] = (jax.device_get(state.params), {k: float(v) for k, v in metrics.items()})
        if n == 8:
            leaf = jax.tree_util.tree_leaves(state.params)[0]
            assert len(leaf.sharding.device_set) == 8
    chex.assert_trees_all_close(results[8][0], results[1][0], atol=1e-6, rtol=1e-5)
    for k in results[1][1]:
        assert results[8][1][k] == pytest.approx(results[1][1][k], rel=1e-5, abs=1e-6)


def test_train_step_lowers_the_loss_and_traces_once():
    model, tx, mesh, state, batch = setup(8)
    step = chex.assert_max_traces(lambda s, b: train.train_step(s, b, model=model, tx=tx), n=1)
    step = jax.jit(step, donate_argnums=0)
    data = shard_batch(batch, mesh)
    losses = []
    for _ in range(8):
        state, metrics = step(state, data)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert int(state.step) == 8 and int(state.nonfinite_step) == -1


def test_non_finite_step_is_skipped_and_recorded():
    model, tx, mesh, state, batch = setup(1)
    step = train.jit_train_step(model, tx, mesh)
    state, _ = step(state, shard_batch(batch, mesh))
    before, before_opt = jax.device_get(state.params), jax.device_get(state.opt_state.inner_state)
    bad = {**batch, "image": np.full_like(batch["image"], np.nan)}
    state, metrics = step(state, shard_batch(bad, mesh))
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.nonfinite_step) == 1 and int(state.step) == 2
    chex.assert_trees_all_equal(jax.device_get(state.params), before)
    # the skip is optax.apply_if_finite's: it counted the step and left the optimiser state alone
    assert int(state.opt_state.total_notfinite) == 1 and not bool(state.opt_state.last_finite)
    chex.assert_trees_all_equal(jax.device_get(state.opt_state.inner_state), before_opt)
    state, _ = step(state, shard_batch(batch, mesh))
    assert int(state.nonfinite_step) == 1  # the first bad step is kept


def test_projection_mode_keeps_lateral_kernels_sign_pure():
    from lateral_jax.core import ei

    model, tx, mesh, state, batch = setup(1, ei_mode="project")
    step = train.jit_train_step(model, tx, mesh)
    for _ in range(3):
        state, _ = step(state, shard_batch(batch, mesh))
    for w in ei.lateral_kernels(jax.device_get(state.params)).values():
        assert float(ei.mixed_sign_penalty(w)) == 0.0


def test_eval_step_ignores_padding():
    model, tx, mesh, state, batch = setup(8)
    evaluate = train.jit_eval_step(model, mesh)
    padded = {"image": batch["image"], "label": np.where(np.arange(16) < 10, batch["label"], -1).astype(np.int32)}
    out = train.evaluate(evaluate, state.params, [padded], mesh)
    assert out["count"] == 10
    logits = model.apply({"params": state.params}, jnp.asarray(batch["image"][:10])).logits
    expected = float(jnp.mean(jnp.argmax(logits, -1) == batch["label"][:10]))
    assert out["accuracy"] == pytest.approx(expected)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch["label"][:10])).mean()
    assert out["loss"] == pytest.approx(float(ce), rel=1e-5)


def test_batch_not_divisible_by_devices():
    mesh = make_mesh()
    with pytest.raises(
        ValueError, match="batch_size=12 is not divisible by the 8 devices of the mesh; use a multiple of 8"
    ):
        check_batch_size(12, mesh)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"name": "lamb"}, "optimizer name='lamb' is not supported"),
        ({"schedule": "step"}, "schedule='step' is not supported"),
        ({"learning_rate": -1.0}, "learning_rate=-1.0 must be a finite number > 0"),
        ({"learning_rate": float("nan")}, "learning_rate=nan must be a finite number > 0"),
        ({"weight_decay": float("inf")}, "weight_decay=inf must be a finite number >= 0"),
        ({"grad_clip_norm": 0.0}, "grad_clip_norm=0.0 must be > 0 or None"),
    ],
)
def test_optimizer_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_device_epoch_equals_the_host_loop_over_the_same_batches(scan):
    """One device-resident epoch (8 devices, each holding its block of the split; a jitted lax.scan,
    or the CPU loop over the jitted step) equals train_step applied batch by batch on the same
    per-device draws and augmentation (atol 1e-5: only XLA fusion order differs)."""
    model, tx, mesh, state, _ = setup(8)
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((40, 16, 16, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, 40).astype(np.int32))
    blocks = device_epochs.device_blocks(40, 8, seed=0)
    held = device_epochs.put_blocks(blocks, lambda i: (np.asarray(images)[i], np.asarray(labels)[i]), mesh)
    key = jax.random.key(3)
    epoch = device_epochs.make_device_epoch(model, tx, mesh, batch_size=16, augment=True, scan=scan)
    ref_state = jax.tree_util.tree_map(jnp.copy, state)
    new_state, metrics = epoch(state, *held, key)
    assert metrics["loss"].shape == (2,)  # 5 per device // 2 per device and step, remainder dropped
    perm_key, aug_key = jax.random.split(key)
    draws = np.asarray(device_epochs.epoch_batches(perm_key, 8, 5, 16))
    step = train.jit_train_step(model, tx, mesh)
    for row, k in zip(draws, jax.random.split(aug_key, draws.shape[0]), strict=True):
        idx = np.concatenate([blocks[d][row[2 * d : 2 * d + 2]] for d in range(8)])
        batch = {"image": np.asarray(device_epochs.augment_on_device(k, images[idx])), "label": np.asarray(labels[idx])}
        ref_state, _ = step(ref_state, shard_batch(batch, mesh))
    chex.assert_trees_all_close(
        jax.device_get(new_state.params), jax.device_get(ref_state.params), atol=1e-5, rtol=1e-5
    )
    evaluate = device_epochs.make_device_eval(model, mesh, batch_size=16)
    acc, loss = evaluate(new_state.params, images[:20], labels[:20])
    host = train.evaluate(
        train.jit_eval_step(model, mesh),
        new_state.params,
        [
            {"image": np.asarray(images[:16]), "label": np.asarray(labels[:16])},
            {
                "image": np.asarray(jnp.pad(images[16:20], ((0, 12), (0, 0), (0, 0), (0, 0)))),
                "label": np.concatenate([np.asarray(labels[16:20]), -np.ones(12, np.int32)]),
            },
        ],
        mesh,
    )
    assert float(acc) == pytest.approx(host["accuracy"]) and float(loss) == pytest.approx(host["loss"], rel=1e-5)


def test_augment_on_device_crops_and_flips():
    images = jnp.broadcast_to(jnp.arange(8.0)[None, None, :, None], (64, 8, 8, 1))
    out = device_epochs.augment_on_device(jax.random.key(0), images, crop_padding=2)
    assert out.shape == images.shape
    rows = np.asarray(out[:, 4, :, 0])
    flipped = np.sum(np.diff(rows[:, 2:6], axis=1).mean(axis=1) < 0)
    assert 10 < flipped < 54  # about half flipped
    assert len({r.tobytes() for r in rows}) > 5  # different crops
