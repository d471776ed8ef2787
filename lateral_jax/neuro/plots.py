"""Headless matplotlib figures of the analyses, models side by side (F-/LC-/LCEI-CNN).

Each function takes ``results = {model_name: probe.measure(...)}`` (or kernels) and a path, and
writes one PNG.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lateral_jax.neuro import analysis  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _layers(results: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for r in results.values():
        names += [n for n in r["layers"] if n not in names]
    return names


def lateral_kernels(kernels: dict[str, np.ndarray], path: Path, *, max_channels: int = 12) -> str:
    """W_lat[:, :, i, j] for the first channels: rows presynaptic i, columns postsynaptic j; E red, I blue."""
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels), 4.2), squeeze=False)
    for ax, (name, w) in zip(axes[0], kernels.items(), strict=True):
        w = np.asarray(w)
        rows = 1 if w.shape[2] == 1 else min(max_channels, w.shape[2])  # depthwise: one row
        cols = min(max_channels, w.shape[-1])
        l = w.shape[0]
        grid = np.full((rows * (l + 1), cols * (l + 1)), np.nan)
        for i in range(rows):
            for j in range(cols):
                grid[i * (l + 1) : i * (l + 1) + l, j * (l + 1) : j * (l + 1) + l] = w[:, :, i, j]
        vmax = np.nanmax(np.abs(grid)) or 1.0
        ax.imshow(grid, cmap="bwr", vmin=-vmax, vmax=vmax)
        ax.set_title(f"{name}\nrows: presynaptic, cols: postsynaptic", fontsize=8)
        ax.axis("off")
    return _save(fig, path)


def metric_vs_loop(results: dict[str, Any], path: Path) -> str:
    """Lifetime sparseness, kurtosis, mean OSI and mean suppression index against loop t."""
    layers = _layers(results)
    metrics = [
        ("lifetime sparseness", lambda L: [e["lifetime_sparseness"]["mean"] for e in L["activation"]]),
        ("excess kurtosis", lambda L: [e["kurtosis"]["median"] for e in L["activation"]]),
        ("mean OSI", lambda L: [e["osi"]["mean"] for e in L["orientation"]["per_loop"]]),
        ("mean suppression index", lambda L: [e["suppression_index"]["mean"] for e in L["size_tuning"]["per_loop"]]),
    ]
    fig, axes = plt.subplots(len(layers), len(metrics), figsize=(3.4 * len(metrics), 2.6 * len(layers)), squeeze=False)
    for row, layer in enumerate(layers):
        for col, (label, get) in enumerate(metrics):
            ax = axes[row, col]
            for model, r in results.items():
                if layer in r["layers"]:
                    vals = get(r["layers"][layer])
                    ax.plot(range(len(vals)), vals, marker="o", label=model)
            ax.set(xlabel="loop t", ylabel=label, title=layer if col == 0 else "")
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def histograms(results: dict[str, Any], path: Path, key: str) -> str:
    """Histogram of a per-unit final-loop quantity: ``osi`` | ``suppression_index`` | ``purity``."""
    layers = _layers(results)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.6 * len(layers), 3.0), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        for model, r in results.items():
            L = r["layers"].get(layer, {})
            vals = {
                "osi": L.get("orientation", {}).get("osi"),
                "suppression_index": L.get("size_tuning", {}).get("suppression_index"),
                "purity": L.get("connection", {}).get("purity"),
            }[key]
            if vals is None:
                continue
            v = np.asarray(vals, float)
            ax.hist(v[np.isfinite(v)], bins=np.linspace(0, 1, 21), alpha=0.5, label=model)
        ax.set(title=layer, xlabel=key.replace("_", " "), ylabel="channels")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, path)


def tuning_curves(results: dict[str, Any], path: Path, *, layer: str, num_units: int = 6) -> str:
    """Orientation and size tuning curves of the most selective units of ``layer``."""
    fig, axes = plt.subplots(2, len(results), figsize=(3.6 * len(results), 5.4), squeeze=False)
    for col, (model, r) in enumerate(results.items()):
        L = r["layers"].get(layer)
        if L is None:
            continue
        curves, osi = np.asarray(L["orientation"]["curves"]), np.nan_to_num(np.asarray(L["orientation"]["osi"]))
        theta = np.degrees(L["orientation"]["orientations"])
        for u in np.argsort(-osi)[:num_units]:
            axes[0, col].plot(theta, curves[u] / max(curves[u].max(), 1e-12), marker=".")
        axes[0, col].set(title=f"{model}: orientation", xlabel="orientation (deg)", ylabel="normalised response")
        size_curves = np.asarray(L["size_tuning"]["curves"])
        si = np.nan_to_num(np.asarray(L["size_tuning"]["suppression_index"]))
        for u in np.argsort(-si)[:num_units]:
            axes[1, col].plot(L["size_tuning"]["radii"], size_curves[u] / max(size_curves[u].max(), 1e-12), marker=".")
        axes[1, col].set(title=f"{model}: size tuning", xlabel="disc radius (px)", ylabel="normalised response")
    return _save(fig, path)


def response_ccdf(samples: dict[str, np.ndarray], fits: dict[str, dict], path: Path) -> str:
    """Log–log complementary CDF of positive responses with the power-law and lognormal tail fits."""
    from scipy import stats

    fig, ax = plt.subplots(figsize=(5, 4))
    for model, x in samples.items():
        x = np.sort(x[x > 0])
        if x.size == 0:
            continue
        ccdf = 1.0 - np.arange(x.size) / x.size
        line = ax.loglog(x, ccdf, label=model)[0]
        f = fits.get(model)
        if f:
            tail_frac = float(np.mean(x >= f["xmin"]))  # the fit used a subsample: rescale to these data
            xs = np.geomspace(f["xmin"], x.max(), 50)
            ax.loglog(xs, tail_frac * (xs / f["xmin"]) ** (1 - f["alpha"]), "--", color=line.get_color(), lw=1)
            s, mu = f["lognormal_sigma"], f["lognormal_mu"]
            sf = stats.lognorm.sf(xs, s, scale=np.exp(mu)) / stats.lognorm.sf(f["xmin"], s, scale=np.exp(mu))
            ax.loglog(xs, tail_frac * sf, ":", color=line.get_color(), lw=1)
    ax.set(xlabel="response", ylabel="P(R ≥ r)", title="Response CCDF (-- power law, ·· lognormal)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def like_to_like(results: dict[str, Any], path: Path) -> str:
    """Lateral strength vs afferent similarity (binned means) for each lateral layer and model."""
    layers = [
        n
        for n in _layers(results)
        if any("like_to_like" in r["layers"].get(n, {}).get("connection", {}) for r in results.values())
    ]
    fig, axes = plt.subplots(1, max(len(layers), 1), figsize=(3.8 * max(len(layers), 1), 3.2), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=False):
        for model, r in results.items():
            ll = r["layers"].get(layer, {}).get("connection", {}).get("like_to_like")
            if not ll:
                continue
            means = [np.nan if m is None else m for m in ll["binned"]["mean_strength"]]
            centres = [np.nan if c is None else c for c in ll["binned"]["centres"]]
            ax.plot(centres, means, marker="o", label=f"{model} ρ={ll['rho_afferent_similarity']:.2f}")
        ax.set(title=layer, xlabel="afferent filter similarity", ylabel="mean lateral strength")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=7)
    return _save(fig, path)


def radial_profiles(results: dict[str, Any], path: Path) -> str:
    layers = [n for n in _layers(results) if any("connection" in r["layers"].get(n, {}) for r in results.values())]
    fig, axes = plt.subplots(1, max(len(layers), 1), figsize=(3.6 * max(len(layers), 1), 3.0), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=False):
        for model, r in results.items():
            c = r["layers"].get(layer, {}).get("connection")
            if not c:
                continue
            rp = c["radial_profile"]
            line = ax.plot(rp["radii"], rp["profile"], marker="o", label=model)[0]
            d = rp["dog"]
            if np.isfinite(d["sigma_e"]):
                xs = np.linspace(0, max(rp["radii"]), 50)
                ax.plot(
                    xs,
                    analysis.dog(xs, d["amp_e"], d["sigma_e"], d["amp_i"], d["sigma_i"]),
                    "--",
                    color=line.get_color(),
                    lw=1,
                )
        ax.axhline(0, color="k", lw=0.5)
        ax.set(title=layer, xlabel="distance (px)", ylabel="mean self-connection weight")
        ax.legend(fontsize=7)
    return _save(fig, path)
