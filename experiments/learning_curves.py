"""Learning curves of a study protocol that evaluates every epoch, and whether each run reached its plateau.

  python -m experiments.learning_curves results/cifar_converged/study.jsonl --figure results/cifar_converged/curves.png

Reads the ``val_curve`` of each row (``[[step, accuracy], ...]``, written by ``experiments.study``
for protocols with ``eval_every_epoch``) and prints a markdown table per dataset: for each variant
the final validation accuracy (mean ± std over seeds, each seed's value) and the *plateau change*,
the largest minus the smallest of a run's last ``--last`` evaluations in points (the plateau
criterion: below ``--within`` points for every seed).  ``--figure`` draws the mean ± std curve of
every variant against the epoch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def plateau_change(curve: list[list[float]], last: int = 3) -> float:
    """max − min of the last ``last`` accuracies of a curve, in points (100 × accuracy)."""
    tail = [acc for _, acc in curve[-last:]]
    return 100.0 * (max(tail) - min(tail))


def by_variant(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """``{(dataset, variant): rows with a curve, by seed}`` in first-seen order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if row.get("val_curve") and not row.get("diverged"):
            groups.setdefault((row["dataset"], row["variant"]), []).append(row)
    return {k: sorted(v, key=lambda r: r["seed"]) for k, v in groups.items()}


def plateau_table(rows: list[dict], *, last: int = 3, within: float = 0.5) -> str:
    """Markdown: per variant, final accuracy and plateau change of each seed, and the verdict."""
    lines = []
    for dataset in dict.fromkeys(d for d, _ in by_variant(rows)):
        lines += [
            f"{dataset} ({rows[0]['protocol']}): final validation accuracy and plateau change "
            f"(max − min of the last {last} evaluations, points)",
            "",
            "| variant | seeds | accuracy mean ± std | per seed | plateau change per seed | plateau (< "
            f"{within:g} points) |",
            "|---|---|---|---|---|---|",
        ]
        for (d, variant), runs in by_variant(rows).items():
            if d != dataset:
                continue
            accs = np.array([r["val_accuracy"] for r in runs])
            changes = [plateau_change(r["val_curve"], last) for r in runs]
            met = sum(c < within for c in changes)
            lines.append(
                f"| {variant} | {', '.join(str(r['seed']) for r in runs)} | {accs.mean():.4f} ± {accs.std():.4f} "
                f"| {', '.join(f'{a:.4f}' for a in accs)} | {', '.join(f'{c:.2f}' for c in changes)} "
                f"| {met} / {len(runs)} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(rows: list[dict], path: str | Path) -> None:
    """Mean ± std (over seeds) validation accuracy against the epoch, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = by_variant(rows)
    datasets = list(dict.fromkeys(d for d, _ in groups))
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for (d, variant), runs in groups.items():
            if d != dataset:
                continue
            length = min(len(r["val_curve"]) for r in runs)
            curves = np.array([[acc for _, acc in r["val_curve"][:length]] for r in runs])
            epochs = np.arange(1, length + 1)
            mean, std = curves.mean(axis=0), curves.std(axis=0)
            ax.plot(epochs, mean, marker="o", markersize=3, label=f"{variant} (n={len(runs)})")
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{dataset}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="comma-separated study results files (JSONL)")
    p.add_argument("--last", type=int, default=3, help="evaluations in the plateau window")
    p.add_argument("--within", type=float, default=0.5, help="plateau criterion, in points")
    p.add_argument("--figure", default=None, help="write the learning-curve figure here (PNG)")
    args = p.parse_args(argv)
    rows = [json.loads(x) for path in args.results.split(",") for x in Path(path).read_text().splitlines() if x]
    if not by_variant(rows):
        p.error(f"no row of {args.results} has a learning curve (val_curve); run a protocol with eval_every_epoch.")
    print(plateau_table(rows, last=args.last, within=args.within))
    if args.figure:
        figure(rows, args.figure)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
