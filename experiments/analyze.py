"""In-silico neurophysiology of trained models: analysis.json, figures and analysis.md.

  python -m experiments.analyze runs/main                 # every model of a comparison folder
  python -m experiments.analyze runs/main/fcnn runs/main/lccnn --out runs/main/analysis

Each argument is a training run folder (with config.json and checkpoints/) or a comparison folder
holding such runs.  Output (default ``<first folder>/analysis``): ``analysis.json`` (every number),
``analysis.md`` (tables against biological reference values, one sentence per property) and PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

# Biological reference values (macaque/cat V1) used in the comparison table.
BIOLOGY = {
    "suppression_index": (0.38, "mean suppression index of macaque V1 (Cavanaugh et al. 2002)"),
    "fraction_excitatory": (0.8, "about 80 % of cortical neurons are excitatory"),
    "co_orthogonal_ratio": (
        2.0,
        "co-oriented pairs connect about 2× as strongly as orthogonal ones (Bosking et al. 1997; Ko et al. 2011)",
    ),
    "lifetime_sparseness": (0.6, "V1 lifetime sparseness to natural images ≈ 0.4–0.8 (Vinje & Gallant 2000)"),
    "osi": (0.4, "V1 median OSI ≈ 0.3–0.5 (Ringach et al. 2002)"),
}


def run_folders(paths: list[str]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if (p / "config.json").exists():
            out.append(p)
        else:
            subs = sorted(d for d in p.iterdir() if (d / "config.json").exists()) if p.is_dir() else []
            if not subs:
                raise SystemExit(f"{p} is neither a training run (config.json) nor a folder of runs.")
            out += subs
    return out


def _fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def summarise(name: str, result: dict) -> dict:
    """One row per layer: the final-loop numbers compared in the table."""
    rows = {}
    for layer, L in result["layers"].items():
        act = L["activation"]
        row = {
            "lifetime_sparseness_t0": act[0]["lifetime_sparseness"]["mean"],
            "lifetime_sparseness": act[-1]["lifetime_sparseness"]["mean"],
            "population_sparseness": act[-1]["population_sparseness"]["mean"],
            "kurtosis": act[-1]["kurtosis"]["median"],
            "activity_fraction": act[-1]["activity_fraction"],
            "heavy_tail": act[-1].get("heavy_tail", {}).get("verdict"),
            "tail_alpha": act[-1].get("heavy_tail", {}).get("alpha"),
            "osi_t0": L["orientation"]["per_loop"][0]["osi"]["median"],
            "osi": L["orientation"]["per_loop"][-1]["osi"]["median"],
            "global_osi": L["orientation"]["per_loop"][-1]["global_osi"]["median"],
            "half_width_deg": float(np.nanmedian(L["orientation"]["half_width_deg"]))
            if np.isfinite(L["orientation"]["half_width_deg"]).any()
            else None,
            "suppression_index_t0": L["size_tuning"]["per_loop"][0]["suppression_index"]["mean"],
            "suppression_index": L["size_tuning"]["per_loop"][-1]["suppression_index"]["mean"],
            "iso_suppression": L["surround"]["iso_suppression"]["median"],
            "ortho_suppression": L["surround"]["ortho_suppression"]["median"],
        }
        c = L.get("connection")
        if c:
            row.update(
                purity=c["purity_mean"],
                fraction_excitatory=c["fraction_excitatory"],
                balance=c["balance"],
                mexican_hat=c["radial_profile"]["mexican_hat"],
            )
            ll = c.get("like_to_like")
            if ll:
                row.update(
                    rho_similarity=ll["rho_afferent_similarity"],
                    p_similarity=ll["p_afferent_similarity"],
                    rho_orientation=ll["rho_orientation_similarity"],
                    co_orthogonal_ratio=ll["co_orthogonal_ratio"],
                )
        rows[layer] = row
    return rows


def verdicts(summaries: dict[str, dict]) -> list[str]:
    """One sentence per property: does it hold (per model, averaged over layers)?"""

    def avg(model, key):
        vals = [
            r.get(key)
            for r in summaries[model].values()
            if isinstance(r.get(key), (int, float)) and math.isfinite(r.get(key))
        ]
        return float(np.mean(vals)) if vals else None

    lines = []
    for model in summaries:
        s0, sT = avg(model, "lifetime_sparseness_t0"), avg(model, "lifetime_sparseness")
        si = avg(model, "suppression_index")
        osi = avg(model, "osi")
        fe = avg(model, "fraction_excitatory")
        pur = avg(model, "purity")
        rho = avg(model, "rho_similarity")
        tails = [r.get("heavy_tail") for r in summaries[model].values()]
        parts = [f"**{model}**:"]
        if s0 is not None and sT is not None:
            trend = "rises" if sT > s0 + 0.01 else "falls" if sT < s0 - 0.01 else "unchanged"
            parts.append(f"sparseness {s0:.2f} → {sT:.2f} over the loops ({trend});")
        parts.append(f"heavy tails: {', '.join(str(t) for t in tails)};")
        if osi is not None:
            parts.append(f"median OSI {osi:.2f} ({'orientation selective' if osi > 0.2 else 'weakly selective'});")
        if si is not None:
            present = "surround suppression present" if si > 0.1 else "little surround suppression"
            parts.append(f"suppression index {si:.2f} vs V1 0.38 ({present});")
        if fe is not None:
            parts.append(
                f"E fraction {fe:.2f} (cortex ≈ 0.8), purity {pur:.2f} ({'Dale-like' if pur > 0.9 else 'mixed signs'});"
            )
        if rho is not None:
            parts.append(
                f"like-to-like ρ {rho:+.2f} ({'like-to-like wiring' if rho > 0.1 else 'no like-to-like wiring'})."
            )
        lines.append(" ".join(parts))
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--num-images", type=int, default=512, help="validation images used for activation statistics")
    args = p.parse_args(argv)

    from lateral_jax.training import run
    from lateral_jax.training.data import pipeline

    folders = run_folders(args.runs)
    out = Path(args.out) if args.out else (folders[0].parent if len(folders) > 1 else folders[0]) / "analysis"
    entries = {}
    for folder in folders:
        trained = run.load_trained(folder)
        batch = next(
            pipeline.eval_batches(
                trained.data.validation,
                global_batch_size=min(args.num_images, len(trained.data.validation)),
                normalisation=trained.data.normalisation,
            )
        )
        entries[folder.name] = (
            trained.model,
            trained.params,
            batch["image"][batch["label"] >= 0],
            trained.data.normalisation,
            {"step": trained.step, "run": str(folder)},
        )
    analyze_models(entries, out)


def analyze_models(entries: dict, out: Path) -> Path:
    """Probes every ``name → (model, params, natural images, normalisation, info)`` and writes
    ``analysis.json``, the figures and ``analysis.md`` to ``out``."""
    import jax

    from lateral_jax.core import dynamics, ei
    from lateral_jax.neuro import plots, probe

    out.mkdir(parents=True, exist_ok=True)
    results, summaries, kernels, tails, samples = {}, {}, {}, {}, {}
    for name, (model, params, images, normalisation, info) in entries.items():
        if not probe.has_lateral_layers(params):
            print(f"analysis: {name} skipped (the probe measures LateralConv layers; it has none)", flush=True)
            continue
        print(f"analysing {name} on {len(images)} natural images and grating stimuli...", flush=True)
        result = probe.measure(model, params, natural_images=images, normalisation=normalisation)
        result.update(info)
        results[name] = result
        summaries[name] = summarise(name, result)
        radii = dynamics.layer_spectral_radii(model, {"params": params}, jax.numpy.asarray(images[:16]))
        for layer, rho in radii.items():
            rho = np.asarray(rho, np.float64)
            result["layers"].setdefault(layer, {})["loop_spectral_radius"] = {
                "median": float(np.median(rho)),
                "max": float(np.max(rho)),
                "images": len(rho),
            }
            summaries[name].setdefault(layer, {})["spectral_radius"] = float(np.median(rho))
        kernels.update(
            {f"{name}{k}": np.asarray(v) for k, v in ei.lateral_kernels(params).items() if np.asarray(v).ndim == 4}
        )
        last_layer = list(result["layers"])[-1]
        samples[name] = probe.record_states(model, params, jax.numpy.asarray(images))[last_layer][-1].ravel()
        ht = result["layers"][last_layer]["activation"][-1].get("heavy_tail")
        if ht:
            tails[name] = ht
    first_layer = list(next(iter(results.values()))["layers"])[0]
    figures = {
        "metric_vs_loop.png": plots.metric_vs_loop(results, out / "metric_vs_loop.png"),
        "osi_hist.png": plots.histograms(results, out / "osi_hist.png", "osi"),
        "suppression_hist.png": plots.histograms(results, out / "suppression_hist.png", "suppression_index"),
        "tuning_curves.png": plots.tuning_curves(results, out / "tuning_curves.png", layer=first_layer),
        "response_ccdf.png": plots.response_ccdf(samples, tails, out / "response_ccdf.png"),
    }
    if kernels:
        figures["lateral_kernels.png"] = plots.lateral_kernels(
            dict(list(kernels.items())[:4]), out / "lateral_kernels.png"
        )
        figures["purity_hist.png"] = plots.histograms(results, out / "purity_hist.png", "purity")
        figures["like_to_like.png"] = plots.like_to_like(results, out / "like_to_like.png")
        figures["radial_profiles.png"] = plots.radial_profiles(results, out / "radial_profiles.png")
    payload = {"summary": summaries, "results": results, "biology": BIOLOGY}
    (out / "analysis.json").write_text(json.dumps(payload, indent=1, default=float))
    write_markdown(out / "analysis.md", summaries, figures)
    print(f"analysis: {out / 'analysis.md'}", flush=True)
    return out / "analysis.md"


def write_markdown(path: Path, summaries: dict[str, dict], figures: dict[str, str]) -> None:
    cols = [
        ("lifetime_sparseness", "lifetime sparseness", ".3f"),
        ("population_sparseness", "population sparseness", ".3f"),
        ("kurtosis", "kurtosis (median)", ".2f"),
        ("heavy_tail", "tail verdict", "s"),
        ("osi", "OSI (median)", ".3f"),
        ("half_width_deg", "half-width (deg)", ".1f"),
        ("suppression_index", "suppression index", ".3f"),
        ("iso_suppression", "iso-surround suppr. (median)", ".3f"),
        ("ortho_suppression", "ortho-surround suppr. (median)", ".3f"),
        ("fraction_excitatory", "fraction E", ".2f"),
        ("purity", "E/I purity", ".3f"),
        ("rho_similarity", "like-to-like ρ", "+.3f"),
        ("co_orthogonal_ratio", "co/orth ratio", ".2f"),
        ("mexican_hat", "Mexican hat (None: kernel too small to fit)", "s"),
        ("spectral_radius", "loop ρ(J) at a(T) (median)", ".3f"),
    ]
    lines = [
        "# In-silico neurophysiology",
        "",
        "Final-loop values per model and layer (loop-0 values and every per-unit number are in `analysis.json`).",
        "ρ(J) is the spectral radius of one loop's Jacobian at a(T) (power iteration, 16 natural images): "
        "below 1, a perturbation of the final state decays loop by loop.",
        "",
    ]
    lines.append("| model | layer | " + " | ".join(c[1] for c in cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for model, layers in summaries.items():
        for layer, row in layers.items():
            cells = [(_fmt(row.get(k), f) if f != "s" else str(row.get(k, "–"))) for k, _, f in cols]
            lines.append(f"| {model} | {layer} | " + " | ".join(cells) + " |")
    lines += ["", "## Biological reference values", ""]
    lines += [f"- {k.replace('_', ' ')}: {v} — {why}" for k, (v, why) in BIOLOGY.items()]
    lines += ["", "## Does each property hold?", ""] + [f"- {v}" for v in verdicts(summaries)]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures.values()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
