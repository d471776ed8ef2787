"""Pure, jitted training and evaluation steps, data-parallel over every device.

``train_step(state, batch) -> (state, metrics)`` minimises

    L(θ) = CE(model(x; θ), y) + λ_EI · L_EI(θ)

with an optax optimiser.  The step is *non-finite safe*: the optimiser from
:func:`lateral_jax.training.optimizer.make_optimizer`
is wrapped in ``optax.apply_if_finite``, so an update that is not finite is skipped (params and
optimiser state stay as they were), and ``state.nonfinite_step`` records the first step whose loss
or gradient was not finite, so the host can stop with an error naming it without a per-step sync.

Data parallelism is the single-program form JAX recommends (``jax.pmap`` is in maintenance mode):
one ``jax.jit`` over the mesh of :mod:`lateral_jax.core.sharding` (all devices of all processes,
the batch sharded along its data axis), params and optimiser state replicated; XLA inserts the
gradient all-reduce.  The same code runs on 1 device, N devices and N hosts.  The steps also run
per shard under a user's ``jax.pmap`` or ``jax.shard_map`` (``axis_name=``; docs/parallelism.md).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lateral_jax.core import ei
from lateral_jax.core.sharding import in_mesh
from lateral_jax.training.sharding import Batch, batch_sharding, replicated, shard_batch


class TrainState(NamedTuple):
    """Everything a training run carries between steps (a pytree; checkpointed as a whole)."""

    step: jax.Array
    params: Any
    opt_state: Any
    nonfinite_step: jax.Array  # -1 while every loss so far was finite


class NonFiniteLossError(FloatingPointError):
    """Raised by the host loop when the loss or a gradient became NaN/Inf at optimiser step ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def init_state(model: Any, tx: optax.GradientTransformation, key: jax.Array, example: jax.Array) -> TrainState:
    params = model.init(key, example)["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jnp.full((), -1, jnp.int32))


def abstract_state(model: Any, tx: optax.GradientTransformation, example: jax.Array) -> TrainState:
    """:func:`init_state`'s shapes and dtypes (``jax.ShapeDtypeStruct`` leaves; nothing is computed)."""
    return jax.eval_shape(lambda: init_state(model, tx, jax.random.key(0), example))


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example cross-entropy against ``(1 - ε) one_hot(labels) + ε / K`` (``ε = label_smoothing``)."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def loss_and_metrics(
    model: Any, params: Any, batch: Batch, *, label_smoothing: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``CE + λ_EI · L_EI`` (``+ the C-RBP penalties`` the layers sow when the model has a
    ``contractor_weight``) and the per-batch metrics (loss parts, accuracy, final-loop change)."""
    contractor = None
    if getattr(model, "contractor_weight", 0.0) > 0:  # C-RBP: the layers sow their penalties
        out, sown = model.apply({"params": params}, batch["image"], mutable=["penalties"])
        contractor = sum(jnp.sum(v) for v in jax.tree_util.tree_leaves(sown.get("penalties", {})))
        contractor = jnp.asarray(contractor, jnp.float32)
    else:
        out = model.apply({"params": params}, batch["image"])
    ce = cross_entropy(out.logits, batch["label"], label_smoothing).mean()
    penalty = model.ei_penalty(params)
    metrics = {
        "ce": ce,
        "ei_penalty": penalty,
        "accuracy": jnp.mean(jnp.argmax(out.logits, -1) == batch["label"]),
    }
    if contractor is not None:
        metrics["contractor_penalty"] = contractor
        penalty = penalty + contractor
    if out.residuals:
        residuals = jnp.stack(list(out.residuals.values()))
        metrics["final_loop_change"] = jnp.mean(residuals)
        metrics["loop_residual_max"] = jnp.max(residuals)
    return ce + penalty, metrics


def _reduce_metrics(metrics: dict[str, jax.Array], axis_name: str) -> dict[str, jax.Array]:
    """Per-shard metrics → the batch's: means by ``pmean``, ``loop_residual_max`` by ``pmax``."""
    return {k: (jax.lax.pmax if k == "loop_residual_max" else jax.lax.pmean)(v, axis_name) for k, v in metrics.items()}


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: Any,
    tx: optax.GradientTransformation,
    axis_name: str | None = None,
    label_smoothing: float = 0.0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step; records the first step whose loss or gradient is not finite.

    Skipping a non-finite update is the optimiser's job (``optax.apply_if_finite`` in
    :func:`~lateral_jax.training.optimizer.make_optimizer`).

    ``axis_name``: when the step runs per shard of the batch under ``jax.pmap(...,
    axis_name=...)`` or ``jax.shard_map`` (``batch`` is this shard's part, ``state`` replicated),
    the loss gradient and the metrics are averaged over that axis (``lax.pmean``), so every
    replica applies the same update: the gradient of the mean loss over the whole batch, as the
    default ``jax.jit`` + sharding step computes it.  The parameters are marked as varying
    over the axis (``lax.pcast``) before differentiating, so the same code is right under
    ``shard_map``'s varying-axes checks (which would otherwise sum the gradient over the axis
    by themselves) and under ``pmap``.  ``final_loop_change`` is then the mean of the shards'
    values (a ratio of norms over each shard), not the ratio over the whole batch.
    """
    params = state.params if axis_name is None else jax.lax.pcast(state.params, axis_name, to="varying")
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: loss_and_metrics(model, p, batch, label_smoothing=label_smoothing), has_aux=True
    )(params)
    if axis_name is not None:
        loss, grads = jax.lax.pmean((loss, grads), axis_name)
        metrics = _reduce_metrics(metrics, axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
    return TrainState(state.step + 1, params, opt_state, nonfinite_step), {
        **metrics,
        "loss": loss,
        "grad_norm": grad_norm,
    }


def eval_step(params: Any, batch: Batch, *, model: Any, axis_name: str | None = None) -> dict[str, jax.Array]:
    """Sums (not means) of correct predictions, loss and count, so shards and batches add up.

    Examples whose ``label`` is negative are padding and are not counted.  ``axis_name``: sum over
    that ``pmap`` / ``shard_map`` axis too (``lax.psum``), so each replica returns the batch's sums.
    """
    logits = model.apply({"params": params}, batch["image"]).logits
    valid = batch["label"] >= 0
    labels = jnp.where(valid, batch["label"], 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {
        "correct": jnp.sum(jnp.where(valid, jnp.argmax(logits, -1) == labels, False)),
        "loss_sum": jnp.sum(jnp.where(valid, ce, 0.0)),
        "count": jnp.sum(valid),
    }
    return sums if axis_name is None else jax.lax.psum(sums, axis_name)


# --------------------------------------------------------------------------------------------
# Jitted over the mesh
# --------------------------------------------------------------------------------------------


def jit_train_step(
    model: Any, tx: optax.GradientTransformation, mesh: Mesh, *, label_smoothing: float = 0.0
) -> Callable:
    """``train_step`` jitted over ``mesh``: state replicated and donated, batch sharded."""
    rep, data = replicated(mesh), batch_sharding(mesh)

    @functools.partial(in_mesh, mesh=mesh)
    def step(state, batch):
        return train_step(state, batch, model=model, tx=tx, label_smoothing=label_smoothing)

    return jax.jit(step, in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0)


def jit_eval_step(model: Any, mesh: Mesh) -> Callable:
    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(
        in_mesh(lambda params, batch: eval_step(params, batch, model=model), mesh),
        in_shardings=(rep, data),
        out_shardings=rep,
    )


def evaluate(eval_fn: Callable, params: Any, batches, mesh: Mesh) -> dict[str, float]:
    """Accuracy and mean loss over an iterable of host batches (padded batches allowed)."""
    totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
    for batch in batches:
        out = jax.device_get(eval_fn(params, shard_batch(batch, mesh)))
        for k in totals:
            totals[k] += float(out[k])
    count = max(totals["count"], 1.0)
    return {"accuracy": totals["correct"] / count, "loss": totals["loss_sum"] / count, "count": int(totals["count"])}


def ei_metrics(params: Any, *, excitatory_fraction: float = 0.8) -> dict[str, float]:
    """Layer-averaged E/I diagnostics as host floats (empty for a model without lateral kernels)."""
    per_kernel = ei.diagnostics(jax.device_get(params), excitatory_fraction=excitatory_fraction)
    if not per_kernel:
        return {}
    keys = next(iter(per_kernel.values())).keys()
    return {f"ei/{k}": float(np.mean([float(d[k]) for d in per_kernel.values()])) for k in keys}


__all__ = [
    "Batch",
    "NonFiniteLossError",
    "TrainState",
    "cross_entropy",
    "ei_metrics",
    "eval_step",
    "evaluate",
    "init_state",
    "jit_eval_step",
    "jit_train_step",
    "loss_and_metrics",
    "train_step",
]
