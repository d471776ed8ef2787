"""The reproduction study: every model variant × seeds on CIFAR-10 and the embedded tasks.

  python -m experiments.study --protocol gpu --out experiments/results/study_gpu.jsonl     # on a GPU
  python -m experiments.study --protocol cpu --out experiments/results/study_cpu.jsonl     # reduced
  python -m experiments.study --tables experiments/results/study_gpu.jsonl                 # tables only

Each run (dataset, variant, seed) trains with the whole dataset on the device
(``train.make_device_epoch``: one jitted ``lax.scan`` per epoch, augmentation in JAX) and appends one
JSON line to ``--out``: validation accuracy, parameters, forward FLOPs per image (XLA cost
analysis), divergence, wall time, final-loop change and E/I diagnostics.  Finished runs found in
``--out`` are skipped, so rerunning resumes; a run killed mid-way resumes from its last finished
epoch (orbax checkpoints in ``<out stem>_checkpoints/``, removed once its row is written).  ``--dtype``
overrides the protocol's compute dtype (recorded per row; tables mark variants whose seeds ran on
different devices or dtypes with †).  Runs go breadth-first (every variant's seed 0, then
seed 1, ...) so that a ``--time-budget-s`` cut leaves balanced partial results.  The seed-0
parameters of F-/LC-/LCEI-CNN are saved as ``<out stem>_<dataset>_<variant>.npz`` for
``experiments/analyze.py --params``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"

# name → model overrides (on top of the protocol's base model)
VARIANTS = {
    "fcnn": {"kind": "fcnn"},
    "lccnn_T1": {"kind": "lccnn", "num_steps": 1},
    "lccnn_T2": {"kind": "lccnn", "num_steps": 2},
    "lccnn_T4": {"kind": "lccnn", "num_steps": 4},
    "lceicnn_T4_l1e-3": {"kind": "lceicnn", "ei_mode": "mixed_sign", "ei_weight": 1e-3},
    "lceicnn_T4_l1e-2": {"kind": "lceicnn", "ei_mode": "mixed_sign", "ei_weight": 1e-2},
    "lceicnn_T4_param": {"kind": "lceicnn", "ei_mode": "parametrise"},
    "lceicnn_T4_proj": {"kind": "lceicnn", "ei_mode": "project"},
    "fcnn_matched": {"kind": "fcnn_matched"},
    "unshared_T4": {"kind": "unshared", "num_steps": 4},
}
SAVE_PARAMS = ("fcnn", "lccnn_T4", "lceicnn_T4_l1e-3")


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    widths: tuple[int, ...]
    epochs: int
    batch_size: int
    learning_rate: float
    dtype: str
    train_subset: int | None
    seeds: tuple[int, ...] = (0, 1, 2)
    synthetic_train: int = 8192
    synthetic_epochs: int = 10


PROTOCOLS = {
    # A GPU run of the full 45k/5k split; fewer epochs than the 25 of DESIGN §5 to fit 15 device-minutes.
    "gpu": Protocol(
        "gpu", (64, 128, 256), epochs=6, batch_size=256, learning_rate=0.1, dtype="bfloat16", train_subset=None
    ),
    # The reduced CPU protocol of the issue: widths 32/64/128, 10,000-image subset, 10 epochs.
    "cpu": Protocol(
        "cpu",
        (32, 64, 128),
        epochs=10,
        batch_size=128,
        learning_rate=0.05,
        dtype="float32",
        train_subset=10_000,
        synthetic_train=3072,
        synthetic_epochs=5,
    ),
    # For tests.
    "smoke": Protocol(
        "smoke",
        (8, 8),
        epochs=1,
        batch_size=32,
        learning_rate=0.05,
        dtype="float32",
        train_subset=256,
        seeds=(0, 1),
        synthetic_train=128,
        synthetic_epochs=1,
    ),
}


def load_dataset(
    name: str, protocol: Protocol, *, split_seed: int = 0, cache_dir: Path | None = None, archive: Path = ARCHIVE
):
    """(train images f32, train labels, val images, val labels, num classes, normalisation), NHWC."""
    from lateral_jax.training.data import pipeline, sources, synthetic

    if name == "cifar10":
        cache = cache_dir / "cifar10_arrays.npz" if cache_dir else None
        images, labels, classes = sources.load_image_folder_arrays(archive, cache=cache)
        train_idx, val_idx = sources.train_validation_split(labels, validation_fraction=0.1, seed=split_seed)
        if protocol.train_subset:
            _, keep = sources.train_validation_split(
                labels[train_idx], validation_fraction=protocol.train_subset / len(train_idx), seed=split_seed + 7
            )
            train_idx = train_idx[keep]
        x = images.astype(np.float32) / 255.0
        mean, std = x[train_idx].mean(axis=(0, 1, 2)), x[train_idx].std(axis=(0, 1, 2))
        x = (x - mean) / std
        norm = pipeline.Normalisation(tuple(map(float, mean)), tuple(map(float, std)), 255.0)
        return x[train_idx], labels[train_idx], x[val_idx], labels[val_idx], len(classes), norm
    train = synthetic.make_task(name, protocol.synthetic_train, seed=split_seed)
    val = synthetic.make_task(name, max(protocol.synthetic_train // 4, 64), seed=split_seed + 10_000)
    return train["image"], train["label"], val["image"], val["label"], 2, pipeline.IDENTITY


def build(variant: str, protocol: Protocol, dataset: str, num_classes: int, input_shape):
    from lateral_jax.core.recurrence import LateralConfig
    from lateral_jax.training import run

    widths = protocol.widths if dataset == "cifar10" else (16, 32, 32)  # the main job's contour model
    overrides = dict(VARIANTS[variant])
    groups = 8 if min(widths) >= 8 and min(widths) % 8 == 0 else 4
    config = run.ModelConfig(
        widths=widths, lateral=LateralConfig.stable(num_groups=groups), dtype=protocol.dtype, **overrides
    )
    return run.build_model(config, num_classes, input_shape), config


def forward_flops(model, params, input_shape) -> float | None:
    import jax
    import jax.numpy as jnp

    try:
        cost = (
            jax.jit(lambda p, x: model.apply({"params": p}, x).logits)
            .lower(params, jnp.zeros((1, *input_shape)))
            .compile()
            .cost_analysis()
        )
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - cost analysis is best-effort on some backends
        return None


def run_one(dataset, variant, seed, protocol, arrays, compiled_cache, out_path: Path, save_params: bool) -> dict:
    import jax
    import jax.numpy as jnp

    from lateral_jax.training import checkpoint, train

    x_tr, y_tr, x_va, y_va, num_classes, _ = arrays
    key = (dataset, variant)
    if key not in compiled_cache:
        model, mconfig = build(variant, protocol, dataset, num_classes, x_tr.shape[1:])
        epochs = protocol.epochs if dataset == "cifar10" else protocol.synthetic_epochs
        steps = epochs * (len(x_tr) // protocol.batch_size)
        opt = train.OptimizerConfig(
            name="momentum" if dataset == "cifar10" else "adam",
            learning_rate=protocol.learning_rate if dataset == "cifar10" else 3e-3,
            weight_decay=5e-4 if dataset == "cifar10" else 0.0,
            total_steps=steps,
            warmup_steps=min(200, steps // 10),
        )
        tx = train.make_optimizer(opt, ei_mode=mconfig.ei_mode)
        mesh = train.make_mesh()
        epoch_fn = train.make_device_epoch(
            model, tx, mesh, batch_size=protocol.batch_size, augment=dataset == "cifar10"
        )
        eval_fn = train.make_device_eval(model, mesh, batch_size=512)
        compiled_cache[key] = (model, mconfig, tx, mesh, epoch_fn, eval_fn, epochs)
    model, mconfig, tx, mesh, epoch_fn, eval_fn, epochs = compiled_cache[key]
    data_key = ("device_arrays", dataset)
    if data_key not in compiled_cache:  # one transfer per dataset, shared by every variant and seed
        compiled_cache[data_key] = [train.replicate(a, mesh) for a in (x_tr, y_tr, x_va, y_va)]
    data = compiled_cache[data_key]
    t0 = time.perf_counter()
    state = train.replicate(train.init_state(model, tx, jax.random.key(seed), jnp.zeros((1, *x_tr.shape[1:]))), mesh)
    # One checkpoint per finished epoch, so a killed run resumes where it stopped (a CPU run of the
    # gpu protocol takes hours); removed once the run's row is written.
    ckpt = checkpoint.Checkpointer(run_checkpoint_dir(out_path, dataset, variant, seed), max_to_keep=1)
    start, earlier_wall, change = 0, 0.0, float("nan")
    restored = ckpt.restore(state)
    if restored is not None:
        start, state, progress = restored
        earlier_wall, change = progress["wall_s"], progress["final_loop_change"]
        print(f"{dataset}/{variant}/seed {seed}: resuming after epoch {start} of {epochs}", flush=True)
    diverged_epoch = None
    try:
        for e in range(start, epochs):
            state, metrics = epoch_fn(state, data[0], data[1], jax.random.fold_in(jax.random.key(seed + 1000), e))
            if int(state.nonfinite_step) >= 0:
                diverged_epoch = e
                break
            change = float(jnp.mean(metrics["final_loop_change"])) if "final_loop_change" in metrics else float("nan")
            progress = {"wall_s": earlier_wall + time.perf_counter() - t0, "final_loop_change": change}
            ckpt.save(e + 1, state, progress, force=True)
    finally:  # an interrupted run still finishes writing its last epoch's (asynchronous) checkpoint
        ckpt.close()
    acc, loss = eval_fn(state.params, data[2], data[3])
    acc = float(acc)
    wall = earlier_wall + time.perf_counter() - t0
    params = jax.device_get(state.params)
    diag = train.ei_metrics(params)
    row = {
        "dataset": dataset,
        "protocol": protocol.name,
        "variant": variant,
        "seed": seed,
        "kind": mconfig.kind,
        "num_steps": mconfig.num_steps if mconfig.kind != "fcnn" else 0,
        "widths": list(getattr(model, "widths", mconfig.widths)),
        "epochs": epochs,
        "train_examples": int(len(x_tr)),
        "val_examples": int(len(x_va)),
        "val_accuracy": acc if diverged_epoch is None else None,
        "val_loss": float(loss) if diverged_epoch is None else None,
        "diverged": diverged_epoch is not None,
        "diverged_epoch": diverged_epoch,
        "num_params": int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params))),
        "xla_forward_flops_per_image": forward_flops(model, params, x_tr.shape[1:]),
        "final_loop_change": change,
        "wall_s": round(wall, 2),
        "device": jax.devices()[0].device_kind,
        "dtype": protocol.dtype,
        **diag,
    }
    if save_params and variant in SAVE_PARAMS and seed == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(out_path.with_name(f"{out_path.stem}_{dataset}_{variant}.npz"), **flat)
    return row


def run_checkpoint_dir(out_path: Path, dataset: str, variant: str, seed: int) -> Path:
    """Where a run's per-epoch checkpoints live while it is unfinished (beside the results file)."""
    return out_path.with_name(f"{out_path.stem}_checkpoints") / f"{dataset}_{variant}_seed{seed}"


def analyze_saved(
    params_dir: Path, dataset: str, protocol: Protocol, out: Path, *, archive: Path = ARCHIVE, num_images: int = 512
) -> None:
    """Neurophysiology of the saved seed-0 F-/LC-/LCEI-CNN parameters (``*_<dataset>_<variant>.npz``)."""
    import jax
    import jax.numpy as jnp

    from experiments import analyze

    arrays = load_dataset(dataset, protocol, archive=archive)
    x_va, normalisation, num_classes = arrays[2][:num_images], arrays[5], arrays[4]
    entries = {}
    for variant in SAVE_PARAMS:
        files = sorted(params_dir.glob(f"*_{dataset}_{variant}.npz"))
        if not files:
            print(f"no saved params for {dataset}/{variant} in {params_dir}", flush=True)
            continue
        model, _ = build(variant, protocol, dataset, num_classes, x_va.shape[1:])
        template = model.init(jax.random.key(0), jnp.zeros((1, *x_va.shape[1:])))["params"]
        with np.load(files[0]) as z:
            leaves = [
                jnp.asarray(z[jax.tree_util.keystr(k)]) for k, _ in jax.tree_util.tree_flatten_with_path(template)[0]
            ]
        params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
        entries[variant] = (
            model,
            params,
            x_va,
            normalisation,
            {"params_file": files[0].name, "protocol": protocol.name},
        )
    analyze.analyze_models(entries, out)


def analytic_forward_flops(row: dict) -> float:
    """Forward FLOPs per image of a study row's model: afferent convs + T lateral convs per layer
    (3×3 kernels, SAME, 2×2 pooling) + the head.  XLA's cost analysis is not used for the tables:
    on GPU it omits the cuDNN convolution custom calls."""
    size = 32
    cin = 3 if row["dataset"] == "cifar10" else 1
    steps = 0 if row["kind"] in ("fcnn", "fcnn_matched") else row["num_steps"]
    flops = 0.0
    for w in row["widths"]:
        flops += 2 * 9 * cin * w * size * size + steps * 2 * 9 * w * w * size * size
        cin, size = w, size // 2
    return flops + 2 * cin * (10 if row["dataset"] == "cifar10" else 2)


def summarise(rows: list[dict]) -> dict:
    """{(dataset, variant): mean, std, n, diverged, params, flops}."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["variant"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        accs = [r["val_accuracy"] for r in rs if r["val_accuracy"] is not None]
        out[key] = {
            "mean": float(np.mean(accs)) if accs else float("nan"),
            "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else float("nan"),
            "n": len(accs),
            "diverged": sum(r["diverged"] for r in rs),
            "params": rs[0]["num_params"],
            "flops": analytic_forward_flops(rs[0]),
            "purity": float(np.mean([r.get("ei/purity_mean", float("nan")) for r in rs])),
            "frac_e": float(np.mean([r.get("ei/fraction_excitatory", float("nan")) for r in rs])),
            "protocol": rs[0]["protocol"],
            "device": rs[0]["device"],
            "runs_on": sorted({f"{r['device']} {r.get('dtype', PROTOCOLS[r['protocol']].dtype)}" for r in rs}),
            # wall time on the first run's device only (a CPU seed beside GPU seeds would swamp it)
            "wall_s": float(np.mean([r["wall_s"] for r in rs if r["device"] == rs[0]["device"]])),
        }
    return out


def tables(rows: list[dict]) -> str:
    summary = summarise(rows)
    lines = []
    for dataset in sorted({k[0] for k in summary}):
        lines += [
            f"### {dataset}",
            "",
            "| model | val. accuracy (mean ± std) | seeds | diverged | parameters | forward MFLOP/image "
            "| E/I purity | fraction E | s/run |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in VARIANTS:
            s = summary.get((dataset, variant))
            if s is None:
                continue
            std = "" if math.isnan(s["std"]) else f" ± {100 * s['std']:.2f}"
            flops = "–" if s["flops"] is None else f"{s['flops'] / 1e6:.1f}"
            pur = "–" if math.isnan(s["purity"]) else f"{s['purity']:.3f}"
            fe = "–" if math.isnan(s["frac_e"]) else f"{s['frac_e']:.2f}"
            acc = f"{100 * s['mean']:.2f}{std} %"
            seeds = f"{s['n']}" + ("†" if len(s["runs_on"]) > 1 else "")
            cells = [variant, acc, seeds, s["diverged"], f"{s['params']:,}", flops, pur, fe, f"{s['wall_s']:.1f}"]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        first = next(iter(summary.values()))
        lines += ["", f"Protocol `{first['protocol']}` on {first['device']}.", ""]
        mixed = {v: s["runs_on"] for (d, v), s in summary.items() if d == dataset and len(s["runs_on"]) > 1}
        if mixed:
            lines += [
                "† seeds run on more than one device/compute dtype: "
                + "; ".join(f"{v}: {', '.join(on)}" for v, on in mixed.items())
                + ".",
                "",
            ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="gpu", choices=sorted(PROTOCOLS))
    p.add_argument("--datasets", default="cifar10,contour,pathfinder")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="experiments/results/study.jsonl")
    p.add_argument("--time-budget-s", type=float, default=float("inf"))
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="override the protocol's compute dtype (recorded in each row); e.g. float32 to run the gpu "
        "protocol on a CPU, where bfloat16 is about 2x slower",
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--archive", default=str(ARCHIVE), help="the CIFAR-10 JPEG archive")
    p.add_argument("--tables", default=None, help="only print the tables of these (comma-separated) results files")
    p.add_argument(
        "--analyze", default=None, help="run the neurophysiology analysis on the saved seed-0 params (.npz folder)"
    )
    args = p.parse_args(argv)
    if args.tables:
        rows = [
            json.loads(line)
            for path in args.tables.split(",")
            for line in Path(path).read_text().splitlines()
            if line.strip()
        ]
        print(tables(rows))
        return
    protocol = PROTOCOLS[args.protocol]
    if args.dtype:
        protocol = dataclasses.replace(protocol, dtype=args.dtype)
    if args.analyze:
        for dataset in args.datasets.split(","):
            analyze_saved(
                Path(args.analyze),
                dataset,
                protocol,
                Path(args.out).with_name(f"analysis_{dataset}_{protocol.name}"),
                archive=Path(args.archive),
            )
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["dataset"], r["variant"], r["seed"], r["protocol"]))
    t_start = time.perf_counter()
    cache: dict = {}
    for dataset in args.datasets.split(","):
        if dataset == "cifar10" and not Path(args.archive).exists():
            print(f"SKIP cifar10: {args.archive} is absent", flush=True)
            continue
        arrays = load_dataset(
            dataset, protocol, cache_dir=Path(args.cache_dir) if args.cache_dir else None, archive=Path(args.archive)
        )
        for seed in protocol.seeds:
            for variant in args.variants.split(","):
                if (dataset, variant, seed, protocol.name) in done:
                    continue
                if time.perf_counter() - t_start > args.time_budget_s:
                    print(f"time budget reached: skipping {dataset}/{variant}/seed {seed}", flush=True)
                    continue
                row = run_one(dataset, variant, seed, protocol, arrays, cache, out, save_params=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                shutil.rmtree(run_checkpoint_dir(out, dataset, variant, seed), ignore_errors=True)
                acc = "diverged" if row["diverged"] else f"{row['val_accuracy']:.4f}"
                print(f"{dataset:10s} {variant:18s} seed {seed}: {acc}  ({row['wall_s']:.1f} s)", flush=True)
        cache.clear()
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    print(tables(rows))


if __name__ == "__main__":
    main()
