"""The reproduction study: model variants × seeds on CIFAR-10 and the embedded tasks.

  python -m experiments.study --protocol gpu --out results/study_gpu.jsonl     # on a GPU
  python -m experiments.study --protocol cpu --out results/study_cpu.jsonl     # reduced
  python -m experiments.study --tables results/study_gpu.jsonl                 # tables only

Each run (dataset, variant, seed) is an ordinary training run,
``lateral_jax.training.run.train_and_evaluate``, in ``<out stem>_runs/<dataset>_<variant>_seed<N>``,
with the whole training split on the device (``RunConfig.device_data``: one jitted ``lax.scan``
per epoch, augmentation in JAX), a checkpoint per epoch and one evaluation at the end; its row
(validation accuracy, parameters, divergence, wall time, final-loop change, E/I diagnostics) is
appended to ``--out``.  Rows already in ``--out`` are skipped and an unfinished run resumes from
its last epoch, so rerunning the command resumes the study.  Variants are named as in
``experiments/configs/variants.py``; the data of a dataset (generated examples, splits) is the same
for every seed, so seeds differ in initialisation and batch order only.  Runs go breadth-first
(every variant's seed 0, then seed 1, ...) so that a ``--time-budget-s`` cut leaves balanced
partial results.  ``--analyze`` runs ``experiments/analyze.py`` on the seed-0 runs of F-/LC-/LCEI-CNN.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from experiments.configs import variants
from lateral_jax.training.rundir import EXIT_PREEMPTED, EXIT_REFUSED

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"

VARIANTS = (
    "fcnn",
    "lccnn_T1",
    "lccnn_T2",
    "lccnn_T4",
    "lceicnn_T4_l1e-3",
    "lceicnn_T4_l1e-2",
    "lceicnn_T4_param",
    "lceicnn_T4_proj",
    "fcnn_matched",
    "unshared_T4",
)
ANALYZED = ("fcnn", "lccnn_T4", "lceicnn_T4_l1e-3")


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
    # A GPU run of the full 45k/5k split (6 epochs fit 15 minutes of device time).
    "gpu": Protocol(
        "gpu", (64, 128, 256), epochs=6, batch_size=256, learning_rate=0.1, dtype="bfloat16", train_subset=None
    ),
    # The reduced CPU protocol: widths 32/64/128, 10,000-image subset, 10 epochs.
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


def data_config(dataset: str, protocol: Protocol, *, archive: Path = ARCHIVE):
    """The ``DataConfig`` of ``dataset`` under ``protocol`` (data seed 0 for every run)."""
    from lateral_jax.training.config import DataConfig

    if dataset == "cifar10":
        return DataConfig(
            dataset="image_folder",
            archive=str(archive),
            validation_fraction=0.1,
            train_subset=protocol.train_subset,
            seed=0,
            augment=True,
        )
    return DataConfig(
        dataset=dataset,
        num_train=protocol.synthetic_train,
        num_validation=max(protocol.synthetic_train // 4, 64),
        seed=0,
    )


def run_config(dataset: str, variant: str, seed: int, protocol: Protocol, num_train: int, *, archive: Path = ARCHIVE):
    """The ``RunConfig`` of one study run; ``num_train`` (training examples) sets the warm-up."""
    from lateral_jax.core.config import LateralConfig
    from lateral_jax.training.config import ModelConfig, RunConfig
    from lateral_jax.training.train import OptimizerConfig

    cifar = dataset == "cifar10"
    widths = protocol.widths if cifar else (16, 32, 32)  # the main job's contour model
    epochs = protocol.epochs if cifar else protocol.synthetic_epochs
    steps = epochs * (num_train // protocol.batch_size)
    groups = 8 if min(widths) % 8 == 0 else 4
    model = ModelConfig(
        widths=widths,
        lateral=LateralConfig.stable(num_groups=groups),
        dtype=protocol.dtype,
        **variants.overrides(variant),
    )
    optimizer = OptimizerConfig(
        name="momentum" if cifar else "adam",
        learning_rate=protocol.learning_rate if cifar else 3e-3,
        weight_decay=5e-4 if cifar else 0.0,
        warmup_steps=min(200, steps // 10),
    )
    return RunConfig(
        data=data_config(dataset, protocol, archive=archive),
        model=model,
        optimizer=optimizer,
        batch_size=protocol.batch_size,
        num_epochs=float(epochs),
        seed=seed,
        log_every=0,
        eval_every=steps,
        checkpoint_every=0,
        keep_checkpoints=1,
        device_data=True,
        progress=False,
    )


def run_dir(out_path: Path, dataset: str, variant: str, seed: int) -> Path:
    """The training run folder of one study run (beside the results file)."""
    return out_path.with_name(f"{out_path.stem}_runs") / f"{dataset}_{variant}_seed{seed}"


def run_one(dataset: str, variant: str, seed: int, protocol: Protocol, config, out_path: Path) -> dict | None:
    """Trains (or resumes) one study run and returns its results row (``None``: preempted, rerun)."""
    import jax

    from lateral_jax.training import run, train

    try:
        final, diverged_step = run.train_and_evaluate(config, run_dir(out_path, dataset, variant, seed)), None
    except (train.NonFiniteLossError, run.DivergenceError) as e:
        final, diverged_step = None, e.step
    if final is not None and final.get("preempted"):
        return None
    m = config.model
    row = {
        "dataset": dataset,
        "protocol": protocol.name,
        "variant": variant,
        "seed": seed,
        "kind": m.kind,
        "num_steps": 0 if m.kind in ("fcnn", "fcnn_matched") else m.num_steps,
        "epochs": int(config.num_epochs),
        "diverged": final is None,
        "diverged_step": diverged_step,
        "device": jax.devices()[0].device_kind,
        "dtype": m.dtype,
    }
    if final is None:
        return {**row, "val_accuracy": None, "val_loss": None, "widths": list(m.widths)}
    return {
        **row,
        "widths": final["widths"],
        "train_examples": final["train_examples"],
        "val_examples": final["validation_examples"],
        "val_accuracy": final["validation_accuracy"],
        "val_loss": final["validation_loss"],
        "num_params": final["num_params"],
        "final_loop_change": final["train"].get("final_loop_change", float("nan")),
        "wall_s": final["wall_s"],
        **final["ei"],
    }


def analytic_forward_flops(row: dict) -> float:
    """Forward FLOPs per image of a study row's model (``models.forward_flops``, 32×32 inputs).
    XLA's cost analysis is not used for the tables: on GPU it omits the cuDNN convolution custom calls."""
    from lateral_jax.core import models

    cifar = row["dataset"] == "cifar10"
    return models.forward_flops(
        row["widths"],
        num_steps=0 if row["kind"] in ("fcnn", "fcnn_matched") else row["num_steps"],
        in_channels=3 if cifar else 1,
        num_classes=10 if cifar else 2,
    )


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
            "params": next((r["num_params"] for r in rs if r.get("num_params")), None),
            "flops": analytic_forward_flops(rs[0]),
            "purity": float(np.mean([r.get("ei/purity_mean", float("nan")) for r in rs])),
            "frac_e": float(np.mean([r.get("ei/fraction_excitatory", float("nan")) for r in rs])),
            "protocol": rs[0]["protocol"],
            "device": rs[0]["device"],
            "runs_on": sorted({f"{r['device']} {r.get('dtype', PROTOCOLS[r['protocol']].dtype)}" for r in rs}),
            # wall time on the first run's device only (a CPU seed beside GPU seeds would swamp it)
            "wall_s": float(np.mean([r["wall_s"] for r in rs if r["device"] == rs[0]["device"] and "wall_s" in r])),
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
            cells = [
                variant,
                acc,
                seeds,
                s["diverged"],
                "–" if s["params"] is None else f"{s['params']:,}",
                flops,
                pur,
                fe,
                f"{s['wall_s']:.1f}",
            ]
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
    p.add_argument("--out", default="results/study.jsonl")
    p.add_argument("--time-budget-s", type=float, default=float("inf"))
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="override the protocol's compute dtype (recorded in each row); e.g. float32 to run the gpu "
        "protocol on a CPU, where bfloat16 is about 2x slower",
    )
    p.add_argument("--archive", default=str(ARCHIVE), help="the CIFAR-10 JPEG archive")
    p.add_argument("--tables", default=None, help="only print the tables of these (comma-separated) results files")
    p.add_argument(
        "--analyze", action="store_true", help="run experiments/analyze.py on the seed-0 runs of F-/LC-/LCEI-CNN"
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
    out = Path(args.out)
    if args.analyze:
        analyze_runs(out, args.datasets.split(","), protocol)
        return
    from lateral_jax.training import checkpoint, run
    from lateral_jax.training.data import sources

    try:
        finished = run_study(
            out, args.datasets.split(","), args.variants.split(","), protocol, Path(args.archive), args.time_budget_s
        )
    except (run.RunFolderError, checkpoint.CheckpointMismatchError, sources.BadImageError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    if not finished:
        print("preempted: the unfinished run saved a checkpoint; rerun the same command to resume.", flush=True)
        sys.exit(EXIT_PREEMPTED)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    print(tables(rows))


def run_study(
    out: Path, datasets: list[str], names: list[str], protocol: Protocol, archive: Path, time_budget_s: float
) -> bool:
    """Runs every (dataset, seed, variant) not yet in ``out``, appending one row each; ``False``
    when a preemption (SIGTERM) stopped it."""
    from lateral_jax.training import run

    for name in names:
        variants.overrides(name)  # an unknown variant fails before anything trains
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["dataset"], r["variant"], r["seed"], r["protocol"]))
    t_start = time.perf_counter()
    for dataset in datasets:
        if dataset == "cifar10" and not archive.exists():
            print(f"SKIP cifar10: {archive} is absent", flush=True)
            continue
        num_train = len(run.build_data(data_config(dataset, protocol, archive=archive), 0).train)
        for seed in protocol.seeds:
            for variant in names:
                if (dataset, variant, seed, protocol.name) in done:
                    continue
                if time.perf_counter() - t_start > time_budget_s:
                    print(f"time budget reached: skipping {dataset}/{variant}/seed {seed}", flush=True)
                    continue
                config = run_config(dataset, variant, seed, protocol, num_train, archive=archive)
                row = run_one(dataset, variant, seed, protocol, config, out)
                if row is None:
                    return False
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                acc = "diverged" if row["diverged"] else f"{row['val_accuracy']:.4f}"
                print(f"{dataset:10s} {variant:18s} seed {seed}: {acc}", flush=True)
    return True


def analyze_runs(out: Path, datasets: list[str], protocol: Protocol) -> None:
    """``experiments/analyze.py`` on the seed-0 runs of :data:`ANALYZED` (``analysis_<dataset>_<protocol>``)."""
    from experiments import analyze

    for dataset in datasets:
        folders = [str(d) for v in ANALYZED if (d := run_dir(out, dataset, v, 0)).exists()]
        if not folders:
            print(f"no seed-0 runs of {dataset} beside {out}", flush=True)
            continue
        analyze.main(folders + ["--out", str(out.with_name(f"analysis_{dataset}_{protocol.name}"))])


if __name__ == "__main__":
    main()
