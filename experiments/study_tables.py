"""The study's tables: accuracy per model over seeds, and how often a run fails to learn.

Rows are the JSON lines :mod:`experiments.study` appends (one per dataset, variant, seed).  A run
*fails* when it diverged or its validation accuracy lies within :data:`FAIL_MARGIN` of chance
(``1 / classes``: 50 % on the two-class embedded tasks).
"""

from __future__ import annotations

import math

import numpy as np

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
FEED_FORWARD = ("fcnn", "fcnn_matched")
FAIL_MARGIN = 0.05
CLASSES = {"cifar10": 10, "mnist": 10, "fashion_mnist": 10}
# rows written before the compute dtype was recorded: the protocol's
_OLD_DTYPES = {"gpu": "bfloat16"}


def _dtype(row: dict) -> str:
    return row.get("dtype", _OLD_DTYPES.get(row["protocol"], "float32"))


def chance(dataset: str) -> float:
    """Accuracy of guessing: ``1 / classes`` (the embedded tasks have two)."""
    return 1.0 / CLASSES.get(dataset, 2)


def failed(row: dict) -> bool:
    """Whether a run did not learn: diverged, or validation accuracy below chance + :data:`FAIL_MARGIN`."""
    # (a hair under the bound, so that 10 % + 5 points is not lost to rounding)
    return row["val_accuracy"] is None or row["val_accuracy"] < chance(row["dataset"]) + FAIL_MARGIN - 1e-9


def failure_rates(rows: list[dict]) -> dict[tuple[str, str, str], tuple[int, int]]:
    """``{(dataset, protocol, variant): (failed runs, runs)}``."""
    out: dict[tuple[str, str, str], tuple[int, int]] = {}
    for r in rows:
        key = (r["dataset"], r["protocol"], r["variant"])
        bad, n = out.get(key, (0, 0))
        out[key] = (bad + failed(r), n + 1)
    return out


def header(first: str, columns: list[str]) -> list[str]:
    """The two header lines of a markdown table with the columns ``first, *columns``."""
    return ["| " + " | ".join([first, *columns]) + " |", "|---|" + "---|" * len(columns)]


def failure_table(rows: list[dict], protocols: tuple[str, ...], order: tuple[str, ...] = VARIANTS) -> str:
    """Markdown: per dataset and variant, failed / runs under each protocol (a dash where it has no rows).

    A feed-forward model (:data:`FEED_FORWARD`) that fails on every seed is marked: the criterion
    allows a model without lateral loops to fail a task that needs them.
    """
    rates = failure_rates(rows)
    lines = []
    for dataset in sorted({r["dataset"] for r in rows}):
        lines += [
            f"#### {dataset}: runs within {100 * FAIL_MARGIN:.0f} points of chance",
            "",
            *header("model", [f"protocol `{p}`" for p in protocols]),
        ]
        for variant in order:
            cells = []
            for p in protocols:
                if (dataset, p, variant) not in rates:
                    cells.append("–")
                    continue
                bad, n = rates[dataset, p, variant]
                mark = " (feed-forward, fails every seed)" if variant in FEED_FORWARD and bad == n else ""
                cells.append(f"{bad} / {n}{mark}")
            if any(c != "–" for c in cells):
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def analytic_forward_flops(row: dict) -> float:
    """Forward FLOPs per image of a study row's model (``models.forward_flops``, 32×32 inputs; the
    lateral kernel size from the row, or from its variant's ``_k<n>`` suffix).
    XLA's cost analysis is not used for the tables: on GPU it omits the cuDNN convolution custom calls."""
    from experiments.configs import variants
    from lateral_jax.core import models

    cifar = row["dataset"] == "cifar10"
    lateral_size = row.get("lateral_size") or variants.overrides(row["variant"]).get("lateral", {}).get(
        "lateral_size", 3
    )
    return models.forward_flops(
        row["widths"],
        num_steps=0 if row["kind"] in ("fcnn", "fcnn_matched") else row["num_steps"],
        in_channels=3 if cifar else 1,
        num_classes=10 if cifar else 2,
        lateral_size=lateral_size,
    )


def summarise(rows: list[dict]) -> dict:
    """{(dataset, variant): mean, std, n, diverged, params, flops, ...} (``protocol`` and ``device``
    from the first row; ``runs_on``: each device and compute dtype the seeds ran on)."""
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
            "runs_on": sorted(
                {f"{r['device']} {r.get('dtype', _OLD_DTYPES.get(r['protocol'], 'float32'))}" for r in rs}
            ),
            # wall time on the first run's device only (a CPU seed beside GPU seeds would swamp it)
            "wall_s": float(np.mean([r["wall_s"] for r in rs if r["device"] == rs[0]["device"] and "wall_s" in r])),
            "per_seed": " / ".join(
                "div." if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.1f}"
                for r in sorted(rs, key=lambda r: r.get("seed", 0))
            ),
        }
    return out


def tables(rows: list[dict], order: tuple[str, ...] = VARIANTS) -> str:
    """One markdown table per protocol and dataset: a row per variant (those of ``order`` first, in
    its order, then any others), mean ± sample std over seeds."""
    by_protocol: dict[str, list[dict]] = {}
    for r in rows:
        by_protocol.setdefault(r["protocol"], []).append(r)
    extra = tuple(sorted({r["variant"] for r in rows} - set(order)))
    return "\n".join(_protocol_tables(rs, order + extra) for _, rs in sorted(by_protocol.items()))


def _protocol_tables(rows: list[dict], order: tuple[str, ...]) -> str:
    summary = summarise(rows)
    lines = []
    for dataset in sorted({k[0] for k in summary}):
        lines += [
            f"### {dataset}",
            "",
            "| model | val. accuracy (mean ± std) | seeds | diverged | parameters | forward MFLOP/image "
            "| E/I purity | fraction E | s/run | per seed (%) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for variant in order:
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
                s["per_seed"],
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
