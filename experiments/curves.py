"""Difficulty curves: accuracy against task difficulty, feed-forward controls against lateral loops.

  python -m experiments.curves --out results/curves_embedded.jsonl                      # every knob
  python -m experiments.curves --knobs pathfinder:curve_length --shard 0/2 --out ...     # one of 2 processes
  python -m experiments.curves --tables results/curves_embedded.jsonl --figure results/curves_embedded.png
  python -m experiments.curves --protocol pathfinder_bench --knobs pathfinder_published:contour_length \
      --models fcnn,fcnn_matched,lccnn_T4,lccnn_T8,lceicnn_T4_l1e-3,hgru_T8,hgru_T8_crbp --reuse "" \
      --shard 0/2 --out results/pathfinder_published/benchmark.jsonl        # the field's benchmark
  python -m experiments.curves ... --models hgru_T8_crbp --levels 6       # one level only

Each knob of a task (:data:`KNOBS`: contour path length, spacing and clutter; Pathfinder curve
length and distractors) is varied alone, the others left at their defaults
(:class:`~lateral_jax.training.data.synthetic.ContourSpec`, ``PathfinderSpec``), and every model
of :data:`MODELS` (F-CNN, its parameter-matched control, LC-CNN at T = 1, 2, 4, 8, LCEI-CNN, the
unshared control) trains on each level for each seed, under the ``embedded`` study protocol
(:mod:`experiments.study`: the protocol on which every lateral model learns the default
difficulty on every seed).  A run is an ordinary training run folder; its row (the study's, plus
``knob`` and ``level``) is appended to ``--out`` as it finishes, finished rows are skipped and an
unfinished run resumes, so rerunning the command continues the curves.  At a knob's default level
the study's own rows (``--reuse``) stand in for runs of the same config.  Runs go knob by knob in
``--knobs`` order and, within a knob, seed by seed, so a cut leaves whole curves of the first knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from experiments import study, study_tables

KNOBS: dict[tuple[str, str], tuple[float, ...]] = {
    # fewer aligned elements: harder
    ("contour", "path_length"): (8, 6, 4),
    # elements further apart: integration over a longer range
    ("contour", "spacing"): (4.0, 5.0, 6.0),
    # a denser background grid: more clutter
    ("contour", "grid"): (3, 4, 6),
    # longer curves to trace (Linsley et al. 2018)
    ("pathfinder", "curve_length"): (16.0, 24.0, 32.0),
    # more distractor curves
    ("pathfinder", "num_curves"): (2, 3, 4),
    # the field's benchmark: Pathfinder by the published procedure, paddles per path (protocol
    # pathfinder_bench, models BENCHMARK_MODELS)
    ("pathfinder_published", "contour_length"): (6, 9, 14),
}
EMBEDDED_KNOBS = tuple(k for k in KNOBS if k[0] != "pathfinder_published")
BENCHMARK_MODELS = ("fcnn", "fcnn_matched", "lccnn_T4", "lccnn_T8", "lceicnn_T4_l1e-3", "hgru_T8", "hgru_T8_crbp")
MODELS = (
    "fcnn",
    "fcnn_matched",
    "lccnn_T1",
    "lccnn_T2",
    "lccnn_T4",
    "lccnn_T8",
    "lceicnn_T4_l1e-3",
    "unshared_T4",
)
SEEDS = (0, 1, 2)
PROTOCOL = "embedded"


def default_level(task: str, knob: str) -> float:
    """The knob's value in the task's default spec."""
    from lateral_jax.training.data import synthetic

    return getattr(synthetic.TASKS[task][1](), knob)


def level_config(task: str, knob: str, level: float, variant: str, seed: int, protocol: study.Protocol):
    """The study run config of ``variant`` with ``knob = level`` (the default level: the study's own config)."""
    config = study.run_config(task, variant, seed, protocol, protocol.synthetic_train)
    if level == default_level(task, knob):
        return config
    value = int(level) if isinstance(default_level(task, knob), int) else float(level)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, task=((knob, value),)))


def run_folder(out: Path, task: str, knob: str, level: float, variant: str, seed: int) -> Path:
    return out.with_name(f"{out.stem}_runs") / f"{task}_{knob}{level:g}_{variant}_seed{seed}"


def read_rows(paths: list[Path]) -> list[dict]:
    return [json.loads(line) for p in paths if p.exists() for line in p.read_text().splitlines() if line.strip()]


def plan(knobs: list[tuple[str, str]], models: tuple[str, ...], seeds: tuple[int, ...]) -> list[tuple]:
    """``(task, knob, level, variant, seed)`` of every run: knob by knob (in the given priority order),
    within a knob seed by seed."""
    return [
        (task, knob, float(level), variant, seed)
        for task, knob in knobs
        for seed in seeds
        for level in KNOBS[task, knob]
        for variant in models
    ]


def run_curves(
    out: Path,
    knobs: list[tuple[str, str]],
    *,
    models: tuple[str, ...] = MODELS,
    seeds: tuple[int, ...] = SEEDS,
    protocol: study.Protocol | None = None,
    reuse: list[Path] = (),
    shard: tuple[int, int] = (0, 1),
    levels: tuple[float, ...] | None = None,
) -> bool:
    """Runs every planned run not yet in ``out`` (or, at a default level, in ``reuse``), only at
    ``levels`` when given; ``False`` when a preemption stopped it."""
    protocol = protocol or study.PROTOCOLS[PROTOCOL]
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["dataset"], r["knob"], r["level"], r["variant"], r["seed"]) for r in read_rows([out])}
    studied = {
        (r["dataset"], r["variant"], r["seed"]) for r in read_rows(list(reuse)) if r["protocol"] == protocol.name
    }
    planned = [run for run in plan(knobs, models, seeds) if levels is None or run[2] in levels]
    for position, (task, knob, level, variant, seed) in enumerate(planned):
        if position % shard[1] != shard[0] or (task, knob, level, variant, seed) in done:
            continue
        if level == default_level(task, knob) and (task, variant, seed) in studied:
            continue
        config = level_config(task, knob, level, variant, seed, protocol)
        folder = run_folder(out, task, knob, level, variant, seed)
        row = study.run_one(task, variant, seed, protocol, config, out, folder=folder)
        if row is None:
            return False
        row = {**row, "knob": knob, "level": level}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        acc = "diverged" if row["diverged"] else f"{row['val_accuracy']:.4f}"
        print(f"{task:10s} {knob}={level:g} {variant:18s} seed {seed}: {acc}", flush=True)
    return True


def curve_points(rows: list[dict], reuse_rows: list[dict] = (), protocol: str = PROTOCOL) -> dict[tuple, list[float]]:
    """``{(task, knob, level, variant): [accuracy per seed]}``; a study row of ``protocol`` counts at
    every knob's default level; a diverged run counts as chance (50 %)."""
    points: dict[tuple, list[float]] = {}
    for r in rows:
        points.setdefault((r["dataset"], r["knob"], r["level"], r["variant"]), []).append(r["val_accuracy"] or 0.5)
    for r in reuse_rows:
        for task, knob in KNOBS:
            if task == r["dataset"] and r["protocol"] == protocol and r["seed"] in SEEDS:
                key = (task, knob, float(default_level(task, knob)), r["variant"])
                points.setdefault(key, []).append(r["val_accuracy"] or 0.5)
    return points


def tables(points: dict[tuple, list[float]], models: tuple[str, ...] = MODELS) -> str:
    """A markdown table per knob that has a curve (rows: models; columns: levels; mean ± sample std over
    seeds, n) and the gain of each lateral model over the better of the two feed-forward controls at
    each level where both ran."""
    lines = []
    for task, knob in KNOBS:
        levels = sorted({k[2] for k in points if k[:2] == (task, knob)})
        if levels in ([], [float(default_level(task, knob))]):  # no curve: at most the study's default
            continue
        order = list(KNOBS[task, knob])
        levels.sort(key=lambda v: order.index(v) if v in order else len(order))
        lines += [
            f"#### {task}: {knob} (easier → harder; default {default_level(task, knob):g})",
            "",
            *study_tables.header("model", [f"{knob} = {v:g}" for v in levels]),
        ]
        for variant in models:
            cells = [_cell(points.get((task, knob, v, variant))) for v in levels]
            if any(c != "–" for c in cells):
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        for variant in [m for m in models if not m.startswith("fcnn")]:
            gains = []
            for v in levels:
                control = [np.mean(points[k]) for m in ("fcnn", "fcnn_matched") if (k := (task, knob, v, m)) in points]
                mine = points.get((task, knob, v, variant))
                both = len(control) == 2  # the better of F-CNN and its parameter-matched control
                gains.append("–" if not (both and mine) else f"{100 * (np.mean(mine) - max(control)):+.1f}")
            if any(g != "–" for g in gains):
                lines.append(f"| {variant} − best F-CNN (points) | " + " | ".join(gains) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(accs: list[float] | None) -> str:
    if not accs:
        return "–"
    std = f" ± {100 * np.std(accs, ddof=1):.1f}" if len(accs) > 1 else ""
    return f"{100 * np.mean(accs):.1f}{std} ({len(accs)})"


def figure(points: dict[tuple, list[float]], path: Path, models: tuple[str, ...] = MODELS) -> None:
    """One panel per knob: mean accuracy (± sample std over seeds) against the level, a line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = [k for k in KNOBS if any(p[:2] == k and p[2] != default_level(*k) for p in points)]
    fig, axes = plt.subplots(1, len(knobs), figsize=(4.2 * len(knobs), 3.6), squeeze=False)
    for ax, (task, knob) in zip(axes[0], knobs, strict=True):
        order = list(KNOBS[task, knob])
        for variant in models:
            xs = [v for v in order if (task, knob, float(v), variant) in points]
            if not xs:
                continue
            accs = [points[task, knob, float(v), variant] for v in xs]
            mean = [100 * np.mean(a) for a in accs]
            err = [100 * np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in accs]
            style = "--" if variant.startswith("fcnn") else "-"
            ax.errorbar([order.index(v) for v in xs], mean, yerr=err, capsize=2, ls=style, marker="o", label=variant)
        ax.set_xticks(range(len(order)), [f"{v:g}" for v in order])
        ax.axhline(50, color="grey", lw=0.8)
        ax.set(title=f"{task}: {knob}", xlabel=f"{knob} (easier → harder)", ylabel="validation accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spectral_table(rows: list[dict], models: tuple[str, ...] = MODELS) -> str:
    """ρ(J) of each model's loops at its final state (mean over the layers of the run's last
    evaluation; mean ± sample std over seeds) per knob level: e.g. the hGRU with and without
    C-RBP.  Empty when no row has spectral radii."""
    cells: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("spectral_radius"):
            key = (r["dataset"], r["knob"], r["level"], r["variant"])
            cells.setdefault(key, []).append(float(np.mean(list(r["spectral_radius"].values()))))
    lines = []
    for task, knob in KNOBS:
        levels = [float(v) for v in KNOBS[task, knob] if any(k[:3] == (task, knob, float(v)) for k in cells)]
        if not levels:
            continue
        lines += [f"#### {task}: {knob}, loop ρ(J) at the final state", ""]
        lines += study_tables.header("model", [f"{knob} = {v:g}" for v in levels])
        for variant in models:
            values = [cells.get((task, knob, v, variant)) for v in levels]
            if any(values):
                lines.append(f"| {variant} | " + " | ".join(_rho_cell(x) for x in values) + " |")
        lines.append("")
    return "\n".join(lines)


def _rho_cell(values: list[float] | None) -> str:
    if not values:
        return "–"
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def parse_knobs(text: str) -> list[tuple[str, str]]:
    knobs = [tuple(k.split(":", 1)) for k in text.split(",") if k]
    unknown = [":".join(k) for k in knobs if k not in KNOBS]
    if unknown:
        names = ", ".join(f"{t}:{k}" for t, k in KNOBS)
        raise ValueError(f"--knobs: unknown {', '.join(unknown)}; choose from {names}.")
    return knobs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/curves_embedded.jsonl")
    p.add_argument(
        "--knobs", default=",".join(f"{t}:{k}" for t, k in EMBEDDED_KNOBS), help="task:knob,... in priority order"
    )
    p.add_argument("--protocol", default=PROTOCOL, choices=sorted(study.PROTOCOLS), help="the study protocol")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    p.add_argument("--reuse", default="results/study_embedded.jsonl", help="study rows standing in at default levels")
    p.add_argument("--levels", default=None, help="only these (comma-separated) knob levels, e.g. 6,9")
    p.add_argument("--shard", default="0/1", help="i/n: every n-th run from the i-th (one process per core)")
    p.add_argument("--tables", default=None, help="only print the tables of these (comma-separated) results files")
    p.add_argument("--figure", default=None, help="with --tables: also draw the curves to this PNG")
    args = p.parse_args(argv)
    reuse = [Path(r) for r in args.reuse.split(",") if r]
    if args.tables:
        rows = read_rows([Path(t) for t in args.tables.split(",")])
        points = curve_points(rows, read_rows(reuse), protocol=args.protocol)
        models = tuple(args.models.split(","))
        print(tables(points, models))
        print(spectral_table(rows, models))
        if args.figure:
            figure(points, Path(args.figure), models)
        return
    try:
        knobs, shard = parse_knobs(args.knobs), study.parse_shard(args.shard)
        models = tuple(args.models.split(","))
        for name in models:
            study.variants.overrides(name)
        levels = None if args.levels is None else tuple(float(v) for v in args.levels.split(","))
        known = {float(v) for k in knobs for v in KNOBS[k]}
        if levels is not None and not set(levels) <= known:
            raise ValueError(f"--levels: {args.levels} is not among the knobs' levels {sorted(known)}.")
    except ValueError as e:
        p.error(str(e))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    protocol = study.PROTOCOLS[args.protocol]
    finished = run_curves(
        Path(args.out), knobs, models=models, seeds=seeds, protocol=protocol, reuse=reuse, shard=shard, levels=levels
    )
    if not finished:
        print("preempted: the unfinished run saved a checkpoint; rerun the same command to resume.", flush=True)
        sys.exit(study.EXIT_PREEMPTED)
    print(tables(curve_points(read_rows([Path(args.out)]), read_rows(reuse), protocol=args.protocol), models))


if __name__ == "__main__":
    main()
