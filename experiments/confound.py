"""The normalisation confound: the emergent-property analysis with and without GroupNorm in the loop.

  python -m experiments.confound --out results/confound_contour        # analyse, then tabulate
  python -m experiments.confound --out results/confound_contour --tables-only

GroupNorm divides each unit by statistics pooled over space: a divisive normalisation that can by
itself make units look surround-suppressed or sparse.  This driver runs
:mod:`experiments.analyze` on the seed-``N`` runs of :data:`MODELS` trained on the contour task
under the ``embedded`` study protocol (the stable preset: GroupNorm on the drive and in every
loop) and under ``embedded_paper`` (the paper's raw layers: no normalisation anywhere), one
analysis per preset and seed (``<out>/<preset>_seed<N>/analysis.json``, skipped when present), and
tabulates each property as mean ± sample std over seeds of its average over the three layers
(``<out>/confound.md``).  The 5 × 5 and 7 × 7 lateral kernels (``lccnn_T4_k5``, ``lccnn_T4_k7``)
are there for the Mexican-hat test, which a 3 × 3 kernel (three distances) cannot pass.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from experiments import study, study_tables

MODELS = ("fcnn", "lccnn_T4", "lceicnn_T4_l1e-3", "lccnn_T4_k5", "lccnn_T4_k7")
PRESETS = {"stable": "results/study_embedded.jsonl", "paper": "results/study_embedded_paper.jsonl"}
SEEDS = (0, 1, 2)
DATASET = "contour"
# (label, summary key, loop-0 key or None)
PROPERTIES = (
    ("lifetime sparseness (loop 0 → T)", "lifetime_sparseness", "lifetime_sparseness_t0"),
    ("population sparseness", "population_sparseness", None),
    ("excess kurtosis (median)", "kurtosis", None),
    ("median OSI (loop 0 → T)", "osi", "osi_t0"),
    ("mean suppression index (loop 0 → T)", "suppression_index", "suppression_index_t0"),
    ("E/I sign purity", "purity", None),
    ("fraction of E channels", "fraction_excitatory", None),
    ("like-to-like ρ (afferent similarity)", "rho_similarity", None),
    ("co-/orthogonal excitatory ratio", "co_orthogonal_ratio", None),
)


def analyse(out: Path, presets: dict[str, Path], models=MODELS, seeds=SEEDS) -> dict[tuple[str, int], Path]:
    """``{(preset, seed): analysis.json}``, running :mod:`experiments.analyze` where it is missing."""
    from experiments import analyze

    done = {}
    for preset, results in presets.items():
        for seed in seeds:
            folders = [str(d) for m in models if (d := study.run_dir(results, DATASET, m, seed)).exists()]
            target = out / f"{preset}_seed{seed}"
            if (target / "analysis.json").exists():
                done[preset, seed] = target / "analysis.json"
            elif folders:
                analyze.main([*folders, "--out", str(target)])
                done[preset, seed] = target / "analysis.json"
            else:
                print(f"no {DATASET} runs of seed {seed} beside {results}", flush=True)
    return done


def layer_mean(summary: dict, key: str) -> float | None:
    """The mean of ``key`` over a model's layers (finite numbers only; ``None`` when there are none)."""
    values = [v for layer in summary.values() if isinstance(v := layer.get(key), (int, float)) and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def collect(analyses: dict[tuple[str, int], Path]) -> dict[tuple[str, str], list[dict]]:
    """``{(model, preset): [summary of each seed]}`` from the analyses."""
    out: dict[tuple[str, str], list[dict]] = {}
    for (preset, seed), path in sorted(analyses.items()):
        summaries = json.loads(path.read_text())["summary"]
        for model in MODELS:
            name = f"{DATASET}_{model}_seed{seed}"
            if name in summaries:
                out.setdefault((model, preset), []).append(summaries[name])
    return out


def _stat(values: list[float]) -> str:
    if not values:
        return "–"
    std = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{std}"


def table(collected: dict[tuple[str, str], list[dict]]) -> str:
    """Markdown: a column per (model, preset), a row per property; Mexican-hat layers counted."""
    columns = [(m, p) for m in MODELS for p in PRESETS if (m, p) in collected]
    lines = study_tables.header("property", [f"{m} ({p})" for m, p in columns])
    for label, key, key_t0 in PROPERTIES:
        cells = []
        for column in columns:
            final = [v for s in collected[column] if (v := layer_mean(s, key)) is not None]
            if key_t0 is None or not final:
                cells.append(_stat(final))
                continue
            first = [v for s in collected[column] if (v := layer_mean(s, key_t0)) is not None]
            same = column[0] == "fcnn"  # no loops: loop 0 is the output
            cells.append(_stat(final) if same else f"{_stat(first)} → {_stat(final)}")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tails, hats = [], []
    for column in columns:
        verdicts = [layer.get("heavy_tail") for s in collected[column] for layer in s.values()]
        tails.append(", ".join(f"{v} {verdicts.count(v)}" for v in sorted(set(map(str, verdicts)))))
        marks = [layer.get("mexican_hat") for s in collected[column] for layer in s.values() if "purity" in layer]
        hats.append("–" if not marks else f"{sum(m is True for m in marks)} / {len(marks)}")
    lines.append("| response tails (layers × seeds) | " + " | ".join(tails) + " |")
    lines.append("| Mexican-hat profile (layers × seeds) | " + " | ".join(hats) + " |")
    seeds = {p: max((len(v) for (m, q), v in collected.items() if q == p), default=0) for p in PRESETS}
    return "\n".join(lines) + "\n\nSeeds: " + ", ".join(f"{p} {n}" for p, n in seeds.items()) + ".\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/confound_contour")
    for preset, default in PRESETS.items():
        p.add_argument(f"--{preset}", default=default, help=f"study results file of the {preset} preset")
    p.add_argument("--tables-only", action="store_true", help="tabulate the analyses already in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    presets = {preset: Path(getattr(args, preset)) for preset in PRESETS}
    if args.tables_only:
        analyses = {
            (pr, s): f for pr in PRESETS for s in SEEDS if (f := out / f"{pr}_seed{s}" / "analysis.json").exists()
        }
    else:
        analyses = analyse(out, presets)
    text = table(collect(analyses))
    out.mkdir(parents=True, exist_ok=True)
    (out / "confound.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
