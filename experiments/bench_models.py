"""Throughput of the models the studies train, against the reference workload on the same machine.

  python -m experiments.bench_models --out results/bench_models_cpu.jsonl
  python -m experiments.bench_models --only cifar10/lccnn_T4,contour/fcnn --iters 10

For each study model (a ``(dataset, protocol, variant)`` of ``experiments/study.py``: its own
``RunConfig``, model builder, optimiser and batch size) one JSON line with

* ``train_gflop_per_image``: 3 × the analytic forward FLOPs (``models.forward_flops``);
* ``step_images_per_s``: the bare jitted train step on one fixed device batch (the model's rate);
* ``epoch_images_per_s``: the device-resident epoch the study runs (gather, augmentation in JAX,
  the same train step) over ``--epoch-batches`` batches; ``feed_share = 1 - epoch / step`` is the
  part of the time the input feed adds (a data-bound model shows a large share);
* ``gflop_per_s`` (of the step) and ``roof_fraction``: that rate over the reference workload's
  (``../shared/bench/WORKLOAD.md``: 64/128/256, T = 4, batch 128, measured first in the same process).

Every step is timed as a median of ``--iters`` single steps after a warm-up, so a slow second of a
shared machine moves the median little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench, study
from lateral_jax.core import models
from lateral_jax.training import device_epochs, programs, train

# (dataset, protocol, variants): what the CIFAR-10 and embedded-task studies train.
STUDY_MODELS = (
    ("cifar10", "cpu", ("fcnn", "fcnn_matched", "lccnn_T4", "lceicnn_T4_l1e-3", "unshared_T4")),
    ("contour", "embedded", ("fcnn", "fcnn_matched", "lccnn_T4", "lceicnn_T4_l1e-3", "unshared_T4")),
)
IMAGE_SHAPES = {"cifar10": (32, 32, 3), "contour": (32, 32, 1), "pathfinder": (32, 32, 1)}


def median_seconds(fn, state, iters: int) -> tuple[float, object]:
    """Median wall seconds of ``iters`` calls of ``state = fn(state)`` (one warm-up call first)."""
    state = fn(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        state = fn(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), state


def reference_row(iters: int) -> dict:
    """The reference workload's train step (``experiments.bench``), timed like the study models."""
    args = bench.parser().parse_args([])
    row, compiled, state, data = bench.build_config(128, 4, "full", "float32", args)
    dt, _ = median_seconds(lambda s: compiled(s, data)[0], state, iters)
    gflop = row["train_gflop_per_image"]
    return {
        "model": "reference_workload",
        "batch": 128,
        "train_gflop_per_image": gflop,
        "compile_s": row["compile_s"],
        "step_images_per_s": round(128 / dt, 1),
        "gflop_per_s": round(gflop * 128 / dt, 1),
    }


def study_row(dataset: str, protocol_name: str, variant: str, iters: int, epoch_batches: int) -> dict:
    """One study model's step and device-epoch rates (random data of the dataset's shape)."""
    protocol = study.PROTOCOLS[protocol_name]
    shape = IMAGE_SHAPES[dataset]
    num_classes = 10 if dataset == "cifar10" else 2
    batch = protocol.batch_size if dataset == "cifar10" else protocol.synthetic_batch
    config = study.run_config(dataset, variant, 0, protocol, num_train=batch * epoch_batches)
    model = programs.build_model(config.model, num_classes, shape)
    tx = train.make_optimizer(config.optimizer, ei_mode=config.model.ei_mode)
    mesh = train.make_mesh()
    state = train.replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, *shape))), mesh)
    rng = np.random.default_rng(0)
    n = batch * epoch_batches
    images = rng.standard_normal((n, *shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, (n,)).astype(np.int32)
    data = train.shard_batch({"image": images[:batch], "label": labels[:batch]}, mesh)
    step = train.jit_train_step(model, tx, mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    step_s, state = median_seconds(lambda s: compiled(s, data)[0], state, iters)

    epoch = device_epochs.make_device_epoch(model, tx, mesh, batch_size=batch, augment=dataset == "cifar10")
    dev_images, dev_labels = train.shard_batch({"image": images, "label": labels}, mesh).values()
    key = jax.random.key(1)
    epoch_s, _ = median_seconds(lambda s: epoch(s, dev_images, dev_labels, key)[0], state, max(2, iters // 4))

    widths = getattr(model, "widths", config.model.widths)
    num_steps = getattr(model, "num_steps", 0)
    forward = models.forward_flops(
        widths,
        num_steps=num_steps,
        in_channels=shape[-1],
        num_classes=num_classes,
        lateral_size=config.model.lateral.lateral_size,
    )
    gflop = 3 * forward / 1e9
    step_rate, epoch_rate = batch / step_s, n / epoch_s
    return {
        "model": f"{dataset}/{variant}",
        "protocol": protocol_name,
        "widths": list(widths),
        "num_steps": num_steps,
        "batch": batch,
        "train_gflop_per_image": round(gflop, 4),
        "compile_s": round(compile_s, 2),
        "step_images_per_s": round(step_rate, 1),
        "epoch_images_per_s": round(epoch_rate, 1),
        "feed_share": round(1 - epoch_rate / step_rate, 3),
        "gflop_per_s": round(gflop * step_rate, 1),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=8, help="timed steps per model (median)")
    p.add_argument("--epoch-batches", type=int, default=8, help="batches in the timed device epoch")
    p.add_argument("--only", default=None, help="comma-separated dataset/variant names (default: every study model)")
    p.add_argument("--no-reference", action="store_true", help="skip the reference workload (no roof_fraction)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = p.parse_args(argv)
    wanted = None if args.only is None else set(args.only.split(","))
    rows = [{"env": bench.env_header()}]
    print(json.dumps(rows[0]), flush=True)
    reference = None if args.no_reference else reference_row(args.iters)
    if reference:
        rows.append(reference)
        print(json.dumps(reference), flush=True)
    for dataset, protocol, names in STUDY_MODELS:
        for variant in names:
            if wanted is not None and f"{dataset}/{variant}" not in wanted:
                continue
            row = study_row(dataset, protocol, variant, args.iters, args.epoch_batches)
            if reference:
                row["roof_fraction"] = round(row["gflop_per_s"] / reference["gflop_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with Path(args.out).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
