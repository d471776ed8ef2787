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

from experiments import preemption

if __name__ == "__main__":  # SIGTERM exits 75 from the first moment (a run in training saves first)
    preemption.exit_75_on_sigterm()

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from experiments.configs import pathfinder_published, variants
from experiments.study_tables import VARIANTS, analytic_forward_flops, failure_table, summarise, tables  # noqa: F401
from lateral_jax.training.rundir import EXIT_PREEMPTED, EXIT_REFUSED

ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"

ANALYZED = ("fcnn", "lccnn_T4", "lceicnn_T4_l1e-3")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """A study protocol: CIFAR-10 settings (``widths`` .. ``train_subset``) and those of the
    embedded tasks (``synthetic_*``: Adam with a linear warm-up of ``synthetic_warmup`` steps,
    ``None`` = a tenth of the run up to 200, then cosine decay).  ``lateral``: the layers'
    preset, ``"stable"`` (GroupNorm on the drive and in the loop) or ``"paper"`` (no normalisation,
    :meth:`~lateral_jax.core.config.LateralConfig.paper`).  ``eval_every_epoch``: evaluate the
    validation split after every epoch (a learning curve in the run's ``metrics.jsonl``), not
    only at the end.  ``synthetic_validation``: generated validation examples (``None``: a quarter
    of ``synthetic_train``, at least 64).  An hGRU variant takes the Pathfinder benchmark's hGRU
    settings (:data:`experiments.configs.pathfinder_published.HGRU`)."""

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
    synthetic_widths: tuple[int, ...] = (16, 32, 32)
    synthetic_batch: int = 128
    synthetic_lr: float = 3e-3
    synthetic_warmup: int | None = None
    lateral: str = "stable"
    eval_every_epoch: bool = False
    synthetic_validation: int | None = None


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
        synthetic_batch=32,
    ),
}
# CIFAR-10 at a real schedule (experiments/device_run4.sh, one GPU): the gpu protocol at 25 epochs,
# and the reduced protocol of experiments/configs/cifar10.py (widths 32/64/128, 10,000-image
# subset) at 30 epochs instead of 10, so that training accuracy flattens.
PROTOCOLS["gpu_full"] = dataclasses.replace(PROTOCOLS["gpu"], name="gpu_full", epochs=25)
PROTOCOLS["reduced_long"] = dataclasses.replace(PROTOCOLS["cpu"], name="reduced_long", epochs=30)
# The embedded tasks on every seed (RESULTS.md, failure rates): a smaller model (widths 8/16/16,
# a quarter of the forward FLOPs of 16/32/32), batch 32 (4x the updates per image), a 100-step
# warm-up, 4 epochs of 4,096 generated images; seeds 0-4.
PROTOCOLS["embedded"] = dataclasses.replace(
    PROTOCOLS["cpu"],
    name="embedded",
    seeds=(0, 1, 2, 3, 4),
    synthetic_train=4096,
    synthetic_epochs=4,
    synthetic_widths=(8, 16, 16),
    synthetic_batch=32,
    synthetic_lr=2e-3,
    synthetic_warmup=100,
)
# CIFAR-10 to its plateau on a 2-core CPU (RESULTS.md): the full 45,000 / 5,000 split, widths
# 16/32/64 (LC-CNN T = 4: 0.19 GFLOP per trained image, ~300 images/s on 2 cores of the AVX-512
# kind), batch 64, 15 epochs of SGD with momentum (peak lr 0.05 after a 200-step warm-up, cosine
# decay to 0, weight decay 5e-4), random crop + flip, a validation pass per epoch.  15, not 10,
# epochs: at 10 the F-CNN still gained 1.3 points over its last 3 evaluations (seed 0).
PROTOCOLS["cifar_converged"] = dataclasses.replace(
    PROTOCOLS["cpu"],
    name="cifar_converged",
    widths=(16, 32, 64),
    epochs=15,
    batch_size=64,
    train_subset=None,
    eval_every_epoch=True,
)
# The normalisation confound (RESULTS.md): the embedded protocol with the paper's raw layers (no
# GroupNorm anywhere); gradient-norm clipping at 1.0 and non-finite-update skipping as everywhere.
PROTOCOLS["embedded_paper"] = dataclasses.replace(
    PROTOCOLS["embedded"], name="embedded_paper", lateral="paper", seeds=(0, 1, 2)
)
# Pathfinder on every seed (RESULTS.md, failure rates): the embedded protocol trained twice as long
# (8 epochs, 1,024 updates).  On the contour task 8 epochs take every lateral model of the main job
# to its plateau (97-98 %, seeds 0-2), where at 4 the last evaluations still rise by ~15 points.
PROTOCOLS["embedded_long"] = dataclasses.replace(PROTOCOLS["embedded"], name="embedded_long", synthetic_epochs=8)
# The field's benchmark (experiments/curves.py --protocol pathfinder_bench, RESULTS.md): Pathfinder
# by the published procedure at 32 x 32, lengths 6 / 9 / 14, the embedded tasks' models and
# optimiser on 16,384 generated images x 4 epochs (length 6: the LC-CNN reached 92 % by its third
# epoch of the 8-epoch pilot, results/pathfinder_published/pilot_16384x8_length6.jsonl), 1,024
# validation images, seeds 0-2.
PROTOCOLS["pathfinder_bench"] = dataclasses.replace(
    PROTOCOLS["embedded"],
    name="pathfinder_bench",
    seeds=(0, 1, 2),
    synthetic_train=16384,
    synthetic_epochs=4,
    synthetic_validation=1024,
)


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
        num_validation=protocol.synthetic_validation or max(protocol.synthetic_train // 4, 64),
        seed=0,
    )


def run_config(dataset: str, variant: str, seed: int, protocol: Protocol, num_train: int, *, archive: Path = ARCHIVE):
    """The ``RunConfig`` of one study run; ``num_train`` (training examples) sets the warm-up."""
    from lateral_jax.core.config import LateralConfig, LoopOptions
    from lateral_jax.core.hgru import HGRUConfig
    from lateral_jax.training.config import ModelConfig, RunConfig
    from lateral_jax.training.optimizer import OptimizerConfig

    cifar = dataset == "cifar10"
    widths = protocol.widths if cifar else protocol.synthetic_widths
    epochs = protocol.epochs if cifar else protocol.synthetic_epochs
    batch_size = protocol.batch_size if cifar else protocol.synthetic_batch
    steps = epochs * (num_train // batch_size)
    warmup = protocol.synthetic_warmup if not cifar and protocol.synthetic_warmup is not None else min(200, steps // 10)
    groups = 8 if min(widths) % 8 == 0 else 4
    fields = variants.overrides(variant)
    preset = LateralConfig.paper if protocol.lateral == "paper" else LateralConfig.stable
    if fields["kind"] == "hgru":
        fields["hgru"] = HGRUConfig(**pathfinder_published.HGRU)
    if "loop" in fields:  # the _crbp variants' implicit mode
        fields["loop"] = LoopOptions(**fields["loop"])
    model = ModelConfig(
        widths=widths,
        lateral=preset(num_groups=groups, **fields.pop("lateral", {})),
        dtype=protocol.dtype,
        **fields,
    )
    optimizer = OptimizerConfig(
        name="momentum" if cifar else "adam",
        learning_rate=protocol.learning_rate if cifar else protocol.synthetic_lr,
        weight_decay=5e-4 if cifar else 0.0,
        warmup_steps=min(warmup, steps),
    )
    return RunConfig(
        data=data_config(dataset, protocol, archive=archive),
        model=model,
        optimizer=optimizer,
        batch_size=batch_size,
        num_epochs=float(epochs),
        seed=seed,
        log_every=0,
        eval_every=0 if cifar and protocol.eval_every_epoch else steps,
        checkpoint_every=0,
        keep_checkpoints=1,
        device_data=True,
        progress=False,
    )


def run_dir(out_path: Path, dataset: str, variant: str, seed: int) -> Path:
    """The training run folder of one study run (beside the results file)."""
    return out_path.with_name(f"{out_path.stem}_runs") / f"{dataset}_{variant}_seed{seed}"


def run_one(
    dataset: str, variant: str, seed: int, protocol: Protocol, config, out_path: Path, *, folder: Path | None = None
) -> dict | None:
    """Trains (or resumes) one study run and returns its results row (``None``: preempted, rerun).
    ``folder``: the run folder (default :func:`run_dir`)."""
    import jax

    from lateral_jax.training import run, train

    folder = run_dir(out_path, dataset, variant, seed) if folder is None else folder
    try:
        final, diverged_step = run.train_and_evaluate(config, folder), None
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
        "lateral_size": m.lateral.lateral_size,
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
        **learning_curve(folder),
        **spectral_radii(folder),
    }


def _evaluations(folder: Path) -> list[dict]:
    """The ``"eval"`` records of the run's ``metrics.jsonl`` (none when it has no file)."""
    from lateral_jax.training.metrics import read_metrics

    path = folder / "metrics.jsonl"
    return [r for r in read_metrics(path) if r.get("kind") == "eval"] if path.exists() else []


def spectral_radii(folder: Path) -> dict:
    """``{"spectral_radius": {layer: ρ(J)}}`` of the run's last evaluation (the loop Jacobian's
    spectral radius at the final state, ``RunConfig.spectral_images``), else ``{}``."""
    evals = _evaluations(folder)
    prefix = "loop/spectral_radius/"
    last = max(evals, key=lambda r: r["step"]) if evals else {}
    radii = {k[len(prefix) :]: round(float(v), 4) for k, v in last.items() if k.startswith(prefix)}
    return {"spectral_radius": radii} if radii else {}


def learning_curve(folder: Path) -> dict:
    """``{"val_curve": [[step, accuracy], ...]}`` from the run's ``metrics.jsonl`` when it evaluated
    more than once (``Protocol.eval_every_epoch``), else ``{}``."""
    evals = _evaluations(folder)
    if len(evals) < 2:
        return {}
    return {"val_curve": [[r["step"], round(float(r["accuracy"]), 4)] for r in sorted(evals, key=lambda r: r["step"])]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", default="gpu", choices=sorted(PROTOCOLS))
    p.add_argument("--datasets", default="cifar10,contour,pathfinder")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default="results/study.jsonl")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the protocol's)")
    p.add_argument("--time-budget-s", type=float, default=float("inf"))
    p.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "bfloat16"),
        help="override the protocol's compute dtype (recorded in each row); e.g. float32 to run the gpu "
        "protocol on a CPU, where bfloat16 is about 2x slower",
    )
    p.add_argument("--archive", default=str(ARCHIVE), help="the CIFAR-10 JPEG archive")
    p.add_argument(
        "--shard",
        default="0/1",
        help="i/n: run only every n-th run from the i-th (start n processes, e.g. one per core with "
        "taskset, appending to the same --out)",
    )
    p.add_argument("--tables", default=None, help="only print the tables of these (comma-separated) results files")
    p.add_argument(
        "--failures",
        default=None,
        help="with --tables: also the failure-rate tables of these (comma-separated) protocols, e.g. cpu,embedded",
    )
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
        if args.failures:
            print(failure_table(rows, tuple(args.failures.split(","))))
        return
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        p.error(str(e))
    protocol = PROTOCOLS[args.protocol]
    if args.seeds:
        protocol = dataclasses.replace(protocol, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.dtype:
        protocol = dataclasses.replace(protocol, dtype=args.dtype)
    out = Path(args.out)
    if args.analyze:
        analyze_runs(out, args.datasets.split(","), protocol)
        return
    from lateral_jax.training import checkpoint, programs, run, rundir
    from lateral_jax.training.data import sources

    programs.enable_compilation_cache()
    programs.quiet_libraries()

    try:
        finished = run_study(
            out,
            args.datasets.split(","),
            args.variants.split(","),
            protocol,
            Path(args.archive),
            args.time_budget_s,
            shard=shard,
        )
    except (run.RunFolderError, checkpoint.CheckpointMismatchError, checkpoint.DiskFullError, sources.DataError) as e:
        print(f"error: {rundir.one_line(str(e))}", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)
    if not finished:
        print("preempted: the unfinished run saved a checkpoint; rerun the same command to resume.", flush=True)
        sys.exit(EXIT_PREEMPTED)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    print(tables(rows))


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``, or a ``ValueError`` saying what a shard is."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"--shard={text!r} must be i/n with 0 <= i < n (e.g. 0/2 and 1/2 for two processes).")
    return index, count


def run_study(
    out: Path,
    datasets: list[str],
    names: list[str],
    protocol: Protocol,
    archive: Path,
    time_budget_s: float,
    *,
    shard: tuple[int, int] = (0, 1),
) -> bool:
    """Runs every (dataset, seed, variant) not yet in ``out``, appending one row each; ``False``
    when a preemption (SIGTERM) stopped it.  ``shard=(i, n)`` runs the i-th of every n runs."""
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
    position = -1
    for dataset in datasets:
        if dataset == "cifar10" and not archive.exists():
            print(f"SKIP cifar10: {archive} is absent", flush=True)
            continue
        num_train = len(run.build_data(data_config(dataset, protocol, archive=archive), 0).train)
        for seed in protocol.seeds:
            for variant in names:
                position += 1
                if position % shard[1] != shard[0] or (dataset, variant, seed, protocol.name) in done:
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
