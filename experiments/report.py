"""``report.md`` for a comparison: a table of the models and learning-curve figures.

python -m experiments.report runs/main fcnn lccnn lceicnn
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

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


def plot_curves(workdir: Path, variants: list[str]) -> list[str]:
    figures = []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant in variants:
        m = read_metrics(workdir / variant)
        if m["train"]:
            axes[0].plot([r["step"] for r in m["train"]], [r["loss"] for r in m["train"]], label=variant)
        if m["eval"]:
            axes[1].plot([r["step"] for r in m["eval"]], [r["accuracy"] for r in m["eval"]], marker="o", label=variant)
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


def write_report(workdir: str | Path, variants: list[str], *, title: str = "") -> Path:
    workdir = Path(workdir)
    rows = []
    for variant in variants:
        final_path = workdir / variant / "final.json"
        if not final_path.exists():
            rows.append(f"| {variant} | not finished | | | | | | |")
            continue
        f = json.loads(final_path.read_text())
        tr, e = f.get("train", {}), f.get("ei", {})
        fmt = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
        rows.append(
            f"| {variant} | {f['num_params']:,} | {f['steps']} | **{f['validation_accuracy']:.4f}** | "
            f"{fmt(f.get('test_accuracy'), '.4f')} | {fmt(tr.get('final_loop_change'), '.4f')} | "
            f"{fmt(e.get('ei/purity_mean'))} | "
            f"{fmt(e.get('ei/fraction_excitatory'))} | {fmt(tr.get('images_per_s'), '.0f')} |"
        )
    finished = {
        v: json.loads((workdir / v / "final.json").read_text())
        for v in variants
        if (workdir / v / "final.json").exists()
    }
    figures = plot_curves(workdir, variants)
    lines = [
        f"# Report: {title or workdir.name}",
        "",
        "| model | parameters | steps | validation accuracy | test accuracy "
        "| final-loop change ‖a(T)−a(T−1)‖/‖a(T)‖ | E/I purity | fraction E | train images/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    if finished:
        best = max(finished, key=lambda v: finished[v]["validation_accuracy"])
        acc = {v: f["validation_accuracy"] for v, f in finished.items()}
        lines.append(
            f"**Best:** `{best}` with validation accuracy {acc[best]:.4f}"
            + (
                f" (F-CNN: {acc['fcnn']:.4f}, difference {acc[best] - acc['fcnn']:+.4f})."
                if "fcnn" in acc and best != "fcnn"
                else "."
            )
        )
        lines.append(
            "One seed per model: differences of a few points can be seed-to-seed variation (RESULTS.md has seeds)."
        )
        lines.append("")
    lines += [f"![{name}]({name})" for name in figures]
    analysis = workdir / "analysis" / "analysis.md"
    lines += [
        "",
        f"Neurophysiology analysis: [{analysis.relative_to(workdir)}]({analysis.relative_to(workdir)})"
        if analysis.exists()
        else "",
        "Files: `<model>/metrics.jsonl`, `<model>/final.json`, `<model>/checkpoints/`.",
    ]
    out = workdir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1]), sys.argv[2:]))
