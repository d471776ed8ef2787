"""``report.md`` for a comparison: the models' accuracy over seeds, a table of the runs and
learning-curve figures.

python -m experiments.report runs/main fcnn lccnn lceicnn                 # one run per model
python -m experiments.report runs/main fcnn=fcnn_seed0,fcnn_seed1 ...      # a model's seeds
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"train": [], "eval": []}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["kind"], []).append(row)
    for kind in out:  # a resumed run may repeat steps: keep the last record of each step
        out[kind] = sorted({r["step"]: r for r in out[kind]}.values(), key=lambda r: r["step"])
    return out


def plot_curves(workdir: Path, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """``learning_curves.png``: training loss and validation accuracy of every run, a colour per model."""
    figures = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for colour, (variant, runs) in enumerate(groups.items()):
        for i, name in enumerate(runs):
            m = read_metrics(workdir / name)
            style = dict(color=f"C{colour}", label=variant if i == 0 else None, alpha=1.0 if i == 0 else 0.55)
            if m["train"]:
                axes[0].plot([r["step"] for r in m["train"]], [r["loss"] for r in m["train"]], **style)
            if m["eval"]:
                axes[1].plot([r["step"] for r in m["eval"]], [r["accuracy"] for r in m["eval"]], marker="o", **style)
    axes[0].set(xlabel="step", ylabel="training loss", title="Training loss")
    axes[1].set(xlabel="step", ylabel="validation accuracy", title="Validation accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(workdir / "learning_curves.png", dpi=110)
    plt.close(fig)
    figures.append("learning_curves.png")
    return figures


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def late_rise(run_dir: Path, window: int = 3) -> float | None:
    """How far from its plateau a run ended: validation accuracy at the last evaluation minus at the
    ``window``-th last, in points (``None`` with fewer evaluations)."""
    evals = sorted(read_metrics(run_dir)["eval"], key=lambda r: r["step"])
    if len(evals) < window:
        return None
    return 100.0 * (evals[-1]["accuracy"] - evals[-window]["accuracy"])


def write_report(workdir: str | Path, groups: Mapping[str, Sequence[str]] | Sequence[str], *, title: str = "") -> Path:
    """Writes ``<workdir>/report.md``; ``groups`` maps each model (variant) to its runs' folder names
    (one per seed), or lists models that have one run each, named as their folders."""
    workdir = Path(workdir)
    groups = dict(groups) if isinstance(groups, Mapping) else {v: [v] for v in groups}
    finals = {
        name: json.loads((workdir / name / "final.json").read_text())
        for runs in groups.values()
        for name in runs
        if (workdir / name / "final.json").exists()
    }
    fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    rises = {name: late_rise(workdir / name) for name in finals}
    rows = []
    for runs in groups.values():
        for name in runs:
            if name not in finals:
                rows.append(f"| {name} | not finished | | | | | | | | |")
                continue
            f = finals[name]
            tr, e = f.get("train", {}), f.get("ei", {})
            rows.append(
                f"| {name} | {f['num_params']:,} | {f['steps']} | **{f['validation_accuracy']:.4f}** | "
                f"{fmt(f.get('test_accuracy'), '.4f')} | {fmt(tr.get('final_loop_change'), '.4f')} | "
                f"{fmt(e.get('ei/purity_mean'))} | "
                f"{fmt(e.get('ei/fraction_excitatory'))} | {fmt(tr.get('images_per_s'), '.0f')} | "
                f"{fmt(rises.get(name), '+.1f')} |"
            )
    accuracy = {v: [finals[n]["validation_accuracy"] for n in runs if n in finals] for v, runs in groups.items()}
    accuracy = {v: a for v, a in accuracy.items() if a}
    lines = [f"# Report: {title or workdir.name}", ""]
    if accuracy:
        seeds = max(len(a) for a in accuracy.values())
        lines += [
            f"Validation accuracy, mean ± sample std over {seeds} seed(s):" if seeds > 1 else "Validation accuracy:",
            "",
            "| model | validation accuracy | seeds | per seed |",
            "|---|---|---|---|",
        ]
        for v, a in accuracy.items():
            lines.append(f"| {v} | **{_mean_std(a)}** | {len(a)} | {' / '.join(f'{x:.4f}' for x in a)} |")
        lines.append("")
        best = max(accuracy, key=lambda v: np.mean(accuracy[v]))
        against = ""
        if "fcnn" in accuracy and best != "fcnn":
            gap = np.mean(accuracy[best]) - np.mean(accuracy["fcnn"])
            against = f" (F-CNN: {np.mean(accuracy['fcnn']):.4f}, difference {gap:+.4f})"
        lines.append(f"**Best (mean):** `{best}` with {np.mean(accuracy[best]):.4f}{against}.")
        if seeds == 1:
            lines.append("One seed per model: differences of a few points can be seed-to-seed variation.")
        measured = [r for r in rises.values() if r is not None]
        if measured:
            lines.append(
                f"**Plateau:** averaged over the {len(measured)} runs, validation accuracy rose "
                f"{np.mean(measured):+.1f} points from the third-last to the last evaluation (largest "
                f"{max(measured):+.1f}); a run at its plateau rises by at most 1 point."
            )
        lines.append("")
    lines += [
        "| run | parameters | steps | validation accuracy | test accuracy "
        "| final-loop change ‖a(T)−a(T−1)‖/‖a(T)‖ | E/I purity | fraction E | train images/s "
        "| rise over the last 3 evaluations (points) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    figures = plot_curves(workdir, groups)
    lines += [f"![{name}]({name})" for name in figures]
    analysis = workdir / "analysis" / "analysis.md"
    lines += [
        "",
        f"Neurophysiology analysis (each model's first seed): [{analysis.relative_to(workdir)}]"
        f"({analysis.relative_to(workdir)})"
        if analysis.exists()
        else "",
        "Files: `<run>/metrics.jsonl`, `<run>/final.json`, `<run>/checkpoints/`.",
    ]
    out = workdir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _parse_groups(args: list[str]) -> dict[str, list[str]]:
    """``model`` or ``model=run,run,...`` per argument."""
    return {a.split("=", 1)[0]: (a.split("=", 1)[1].split(",") if "=" in a else [a]) for a in args}


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1]), _parse_groups(sys.argv[2:])))
