"""Throughput of the models the studies train, against the reference workload on the same machine.

  python -m experiments.bench_models --out results/bench_models_cpu.jsonl
  python -m experiments.bench_models --only cpu/cifar10/lccnn_T4,embedded/contour/fcnn --iters 10

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
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench, curves, study
from lateral_jax.core import cell, hgru_models, models
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import device_epochs, programs, train
from lateral_jax.training.optimizer import make_optimizer
from lateral_jax.training.sharding import replicate, shard_batch

# (dataset, protocol, variants): what the CIFAR-10 and embedded-task studies train.
STUDY_MODELS = (
    ("cifar10", "cifar_converged", ("fcnn", "fcnn_matched", "lccnn_T4", "lceicnn_T4_l1e-3", "unshared_T4")),
    ("cifar10", "cpu", ("fcnn", "fcnn_matched", "lccnn_T4", "lceicnn_T4_l1e-3", "unshared_T4")),
    ("contour", "embedded", ("fcnn", "fcnn_matched", "lccnn_T4", "lceicnn_T4_l1e-3", "unshared_T4")),
    # the field's benchmark (experiments/curves.py --protocol pathfinder_bench), length 6
    (
        "pathfinder_published",
        "pathfinder_bench",
        curves.BENCHMARK_MODELS,
    ),
)
# (config file, variant, models): the field's benchmark (experiments/configs/pathfinder_published.py).
CONFIG_MODELS = (("pathfinder_published", "6", ("fcnn", "lccnn_T4", "hgru_T8")),)
IMAGE_SHAPES = {
    "cifar10": (32, 32, 3),
    "contour": (32, 32, 1),
    "pathfinder": (32, 32, 1),
    "pathfinder_published": (32, 32, 1),
}


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


@dataclasses.dataclass
class Setup:
    """One study model ready to time: its compiled train step on one fixed batch, and the data."""

    model: object
    tx: object
    mesh: object
    state: object
    batch: dict
    images: np.ndarray
    labels: np.ndarray
    config: object


def run_config_of(dataset: str, protocol_name: str, variant: str, epoch_batches: int):
    """``(RunConfig, batch)`` of a study model (``study.run_config``) or, for ``protocol_name`` a
    config file's name (:data:`CONFIG_MODELS`), of that config's ``dataset`` variant."""
    if protocol_name in study.PROTOCOLS:
        protocol = study.PROTOCOLS[protocol_name]
        batch = protocol.batch_size if dataset == "cifar10" else protocol.synthetic_batch
        return study.run_config(dataset, variant, 0, protocol, num_train=batch * epoch_batches), batch
    import importlib

    from experiments.configs import base

    config = base.to_run_config(
        importlib.import_module(f"experiments.configs.{protocol_name}").get_config(dataset), variant
    )
    return config, config.batch_size


def setup(dataset: str, protocol_name: str, variant: str, epoch_batches: int) -> Setup:
    """A study model as the study builds it (``study.run_config``), on random data of the dataset's shape."""
    config, batch = run_config_of(dataset, protocol_name, variant, epoch_batches)
    shape = IMAGE_SHAPES[config.data.dataset if protocol_name not in study.PROTOCOLS else dataset]
    num_classes = 10 if dataset == "cifar10" else 2
    model = programs.build_model(config.model, num_classes, shape)
    tx = make_optimizer(config.optimizer, ei_mode=config.model.ei_mode)
    mesh = make_mesh()
    state = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, *shape))), mesh)
    rng = np.random.default_rng(0)
    n = batch * epoch_batches
    images = rng.standard_normal((n, *shape)).astype(np.float32)
    labels = rng.integers(0, num_classes, (n,)).astype(np.int32)
    first = shard_batch({"image": images[:batch], "label": labels[:batch]}, mesh)
    return Setup(model, tx, mesh, state, first, images, labels, config)


def compile_step(s: Setup):
    """``(compiled train step, compile seconds)``."""
    t0 = time.perf_counter()
    compiled = train.jit_train_step(s.model, s.tx, s.mesh).lower(s.state, s.batch).compile()
    return compiled, time.perf_counter() - t0


def study_row(dataset: str, protocol_name: str, variant: str, iters: int, epoch_batches: int) -> dict:
    """One study model's step and device-epoch rates (random data of the dataset's shape)."""
    s = setup(dataset, protocol_name, variant, epoch_batches)
    batch = len(s.batch["label"])
    compiled, compile_s = compile_step(s)
    step_s, state = median_seconds(lambda st: compiled(st, s.batch)[0], s.state, iters)
    epoch = device_epochs.make_device_epoch(s.model, s.tx, s.mesh, batch_size=batch, augment=dataset == "cifar10")
    dev_images, dev_labels = shard_batch({"image": s.images, "label": s.labels}, s.mesh).values()
    key = jax.random.key(1)
    epoch_s, _ = median_seconds(lambda st: epoch(st, dev_images, dev_labels, key)[0], state, max(2, iters // 4))
    gflop = train_gflop(s, dataset)
    step_rate, epoch_rate = batch / step_s, len(s.labels) / epoch_s
    return {
        "model": f"{dataset}/{variant}" if protocol_name in study.PROTOCOLS else f"{protocol_name}:{dataset}/{variant}",
        "protocol": protocol_name,
        "widths": list(getattr(s.model, "widths", s.config.model.widths)),
        "num_steps": getattr(s.model, "num_steps", 0),
        "batch": batch,
        "train_gflop_per_image": round(gflop, 4),
        "compile_s": round(compile_s, 2),
        "step_images_per_s": round(step_rate, 1),
        "epoch_images_per_s": round(epoch_rate, 1),
        "feed_share": round(1 - epoch_rate / step_rate, 3),
        "gflop_per_s": round(gflop * step_rate, 1),
    }


def train_gflop(s: Setup, dataset: str) -> float:
    """3 × the analytic forward FLOPs of the set-up model, in GFLOP per image."""
    shape = IMAGE_SHAPES.get(dataset, (32, 32, 1))
    if s.config.model.kind == "hgru":
        forward = hgru_models.forward_flops(
            s.model.width,
            num_steps=s.model.num_steps,
            kernel_size=s.config.model.hgru.kernel_size,
            stem_size=s.model.stem_size,
            image_size=shape[0],
            in_channels=shape[-1],
            num_classes=2,
        )
        return 3 * forward / 1e9
    forward = models.forward_flops(
        getattr(s.model, "widths", s.config.model.widths),
        num_steps=getattr(s.model, "num_steps", 0),
        in_channels=shape[-1],
        num_classes=10 if dataset == "cifar10" else 2,
        lateral_size=s.config.model.lateral.lateral_size,
    )
    return 3 * forward / 1e9


def stream_bandwidth_gb_s(mib: int = 512, iters: int = 5) -> float:
    """Memory bandwidth the compiled programs get: a jitted ``y = x * a + b`` over a ``mib``-MiB
    float32 array (read once, written once; XLA:CPU runs it on every core), median of ``iters``."""
    x = jnp.ones((mib * (1 << 20) // 4,), jnp.float32)
    fn = jax.jit(lambda x: x * 1.0001 + 1e-7, donate_argnums=0)  # in place: no page faults timed
    dt, _ = median_seconds(fn, x, iters)
    return 2 * x.nbytes / dt / 1e9


def roofline_row(dataset: str, protocol_name: str, variant: str, iters: int, peak_gflop_s: float, bandwidth: float):
    """``--roofline``: the train step's FLOPs and bytes accessed as XLA counts them (its cost analysis
    of the compiled step, after fusion), the arithmetic intensity, and the roofline bound
    ``min(peak, intensity × bandwidth)`` with the reference workload's GFLOP/s as the peak and the
    measured stream bandwidth; the measured rate (XLA FLOPs / step time) and its fraction of the bound."""
    s = setup(dataset, protocol_name, variant, 1)
    compiled, _ = compile_step(s)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    step_s, _ = median_seconds(lambda st: compiled(st, s.batch)[0], s.state, iters)
    flops, moved = float(cost["flops"]), float(cost["bytes accessed"])
    intensity = flops / moved
    bound = min(peak_gflop_s, intensity * bandwidth)
    rate = flops / step_s / 1e9
    name = f"{dataset}/{variant}" if protocol_name in study.PROTOCOLS else f"{protocol_name}:{dataset}/{variant}"
    return {
        "roofline": name,
        "protocol": protocol_name,
        "batch": len(s.batch["label"]),
        "xla_gflop_per_step": round(flops / 1e9, 3),
        "xla_gb_accessed_per_step": round(moved / 1e9, 3),
        "flop_per_byte": round(intensity, 2),
        "bound_gflop_per_s": round(bound, 1),
        "bound": "bandwidth" if bound < peak_gflop_s else "compute",
        "measured_gflop_per_s": round(rate, 1),
        "fraction_of_bound": round(rate / bound, 2),
    }


def ab_norm_row(dataset: str, protocol_name: str, variant: str, pairs: int, min_block_s: float) -> dict:
    """``--ab-norm``: the model's step with :func:`cell.group_norm` against the same step with the
    one-step reference :func:`cell.group_norm_direct`, in ``pairs`` alternating blocks of steps
    (who goes first alternates), so a slow spell of the machine slows both."""
    s = setup(dataset, protocol_name, variant, 1)
    fast, _ = compile_step(s)
    original = cell.group_norm
    cell.group_norm = cell.group_norm_direct
    try:
        direct, _ = compile_step(s)
    finally:
        cell.group_norm = original
    if fast.as_text() == direct.as_text():
        raise RuntimeError("the two programs are identical: the reference norm was not traced")
    steps = {}
    state = {"fast": s.state, "direct": jax.tree_util.tree_map(jnp.copy, s.state)}  # the step donates its state
    for name, fn in (("fast", fast), ("direct", direct)):  # warm-up, and the block length
        t0 = time.perf_counter()
        state[name] = fn(state[name], s.batch)[0]
        jax.block_until_ready(state[name])
        steps[name] = time.perf_counter() - t0
    block = max(1, int(min_block_s / min(steps.values())))
    ratios, rates = [], {"fast": [], "direct": []}
    for pair in range(pairs):
        order = ("fast", "direct") if pair % 2 == 0 else ("direct", "fast")
        took = {}
        for name in order:
            fn = fast if name == "fast" else direct
            t0 = time.perf_counter()
            for _ in range(block):
                state[name] = fn(state[name], s.batch)[0]
            jax.block_until_ready(state[name])
            took[name] = (time.perf_counter() - t0) / block
            rates[name].append(len(s.batch["label"]) / took[name])
        ratios.append(took["direct"] / took["fast"])
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        "ab_norm": f"{dataset}/{variant}",
        "protocol": protocol_name,
        "batch": len(s.batch["label"]),
        "pairs": pairs,
        "block": block,
        "images_per_s_direct": round(float(np.median(rates["direct"])), 1),
        "images_per_s_fast": round(float(np.median(rates["fast"])), 1),
        "speedup_median": round(float(median), 3),
        "speedup_quartiles": [round(float(q1), 3), round(float(q3), 3)],
        "faster_in": f"{sum(r > 1 for r in ratios)}/{pairs}",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=8, help="timed steps per model (median)")
    p.add_argument("--epoch-batches", type=int, default=8, help="batches in the timed device epoch")
    p.add_argument(
        "--only", default=None, help="comma-separated protocol/dataset/variant names (default: every study model)"
    )
    p.add_argument("--no-reference", action="store_true", help="skip the reference workload (no roof_fraction)")
    p.add_argument(
        "--ab-norm",
        type=int,
        default=0,
        metavar="PAIRS",
        help="instead: each model with cell.group_norm against cell.group_norm_direct, PAIRS alternating blocks",
    )
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="use JAX's persistent compilation cache in DIR (run twice: the second run's compile_s is a cache load)",
    )
    p.add_argument(
        "--roofline",
        action="store_true",
        help="instead: each model's XLA FLOPs and bytes per step, intensity, and the roofline bound from the "
        "reference workload's GFLOP/s and the measured stream bandwidth",
    )
    p.add_argument("--out", default=None, help="append the JSON lines to this file too")
    args = p.parse_args(argv)
    wanted = None if args.only is None else set(args.only.split(","))
    if args.compile_cache:
        programs.enable_compilation_cache(args.compile_cache)
    rows = [{"env": {**bench.env_header(), "compile_cache": args.compile_cache}}]
    print(json.dumps(rows[0]), flush=True)
    if args.ab_norm:
        for dataset, protocol, names in STUDY_MODELS:
            for variant in names:
                if variant.startswith("fcnn") and wanted is None:
                    continue  # no lateral norms in the loop: the same program but for the drive norm
                if wanted is None or f"{protocol}/{dataset}/{variant}" in wanted:
                    rows.append(ab_norm_row(dataset, protocol, variant, args.ab_norm, 1.0))
                    print(json.dumps(rows[-1]), flush=True)
        _write(args.out, rows)
        return
    reference = None if args.no_reference else reference_row(args.iters)
    if reference:
        rows.append(reference)
        print(json.dumps(reference), flush=True)
    if args.roofline:
        if reference is None:
            raise SystemExit("--roofline needs the reference workload's rate as the peak; drop --no-reference")
        bandwidth = stream_bandwidth_gb_s()
        rows.append({"stream_bandwidth_gb_s": round(bandwidth, 1)})
        print(json.dumps(rows[-1]), flush=True)
        for dataset, protocol, names in (*STUDY_MODELS, *((v, c, n) for c, v, n in CONFIG_MODELS)):
            for variant in names:
                if wanted is None or f"{protocol}/{dataset}/{variant}" in wanted:
                    rows.append(
                        roofline_row(dataset, protocol, variant, args.iters, reference["gflop_per_s"], bandwidth)
                    )
                    print(json.dumps(rows[-1]), flush=True)
        _write(args.out, rows)
        return
    for dataset, protocol, names in (*STUDY_MODELS, *((v, c, n) for c, v, n in CONFIG_MODELS)):
        for variant in names:
            if wanted is not None and f"{protocol}/{dataset}/{variant}" not in wanted:
                continue
            row = study_row(dataset, protocol, variant, args.iters, args.epoch_batches)
            if reference:
                row["roof_fraction"] = round(row["gflop_per_s"] / reference["gflop_per_s"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    _write(args.out, rows)


def _write(path: str | None, rows: list[dict]) -> None:
    if path:
        with Path(path).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
