"""In-silico neurophysiology of a model: stimuli in, every analysis out, per layer and per loop t.

The model is used only through ``model.apply(..., record="all")``, which returns the per-loop
states ``a(0..T)`` of every lateral layer from one forward pass.  A *unit* is the centre position
of a channel's feature map; its response to a stimulus is averaged over the stimulus phases.

For each lateral layer the probe measures
  * on natural inputs (the validation images): lifetime/population sparseness, excess kurtosis,
    activity fraction and the heavy-tail verdict, at every loop t;
  * with gratings (12 orientations × 3 spatial frequencies × 4 phases): tuning curves, preferred
    orientation, OSI, global OSI, von Mises half-width, at every loop t;
  * with grating discs at each unit's preferred orientation and frequency: size tuning and the
    suppression index, at every loop t; with centre + annulus stimuli: iso/ortho surround
    suppression at the final loop;
  * on the parameters: E/I diagnostics, like-to-like statistics, radial profile and DoG fit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lateral_jax.core import ei
from lateral_jax.neuro import analysis, stimuli
from lateral_jax.training.data.pipeline import Normalisation


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    num_orientations: int = 12
    frequencies: tuple[float, ...] = (0.08, 0.14, 0.22)  # cycles/pixel at the input
    num_phases: int = 4
    num_radii: int = 10
    max_tail_samples: int = 20_000
    batch_size: int = 256


@functools.partial(jax.jit, static_argnums=0)
def _per_loop_states(model: Any, params: Any, images: jax.Array) -> dict[str, jax.Array]:
    return model.apply({"params": params}, images, record="all").states


def record_states(model: Any, params: Any, images: jax.Array, *, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-loop states of every lateral layer for ``images``: ``{layer: [T+1, N, H, W, C]}`` (float32).

    Batches of ``batch_size`` (the last one padded), so one compiled program serves every call.
    """
    n = images.shape[0]
    size = min(batch_size, n)
    chunks: dict[str, list[np.ndarray]] = {}
    for start in range(0, n, size):
        batch = images[start : start + size]
        if batch.shape[0] < size:
            batch = jnp.concatenate([batch, jnp.zeros((size - batch.shape[0], *batch.shape[1:]), batch.dtype)])
        out = jax.device_get(_per_loop_states(model, params, batch))
        for name, s in out.items():
            chunks.setdefault(name, []).append(np.asarray(s, np.float32))
    return {name: np.concatenate(parts, axis=1)[:, :n] for name, parts in chunks.items()}


def has_lateral_layers(params: Any) -> bool:
    """Whether ``params`` hold a layer the probe measures (a ``LateralConv``, identified by its
    ``w_ff``; an F-CNN's layers count, the hGRU model's stem and loop do not)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return any(any(getattr(entry, "key", None) == "w_ff" for entry in path) for path, _ in leaves)


def centre(states: np.ndarray) -> np.ndarray:
    """Responses of the centre unit of each channel: ``[T+1, N, H, W, C]`` → ``[T+1, N, C]``."""
    return states[:, :, states.shape[2] // 2, states.shape[3] // 2, :]


def _summary(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()), "n": int(v.size)}


def activation_statistics(states: np.ndarray, *, max_tail_samples: int, seed: int = 0) -> list[dict]:
    """Sparseness, kurtosis, activity and heavy tails at each loop, for responses ``[T+1, N, H, W, C]``."""
    out = []
    rng = np.random.default_rng(seed)
    for t in range(states.shape[0]):
        r = states[t].reshape(-1, states.shape[-1])  # [samples, channels]
        lifetime = analysis.sparseness(r, axis=0)
        population = analysis.sparseness(r, axis=1)
        kurt = analysis.excess_kurtosis(r, axis=0)
        pos = r[r > 0]
        entry = {
            "loop": t,
            "lifetime_sparseness": _summary(lifetime),
            "population_sparseness": _summary(population),
            "kurtosis": _summary(kurt),
            "activity_fraction": analysis.activity_fraction(r),
            "values": {"lifetime_sparseness": lifetime.tolist()},
        }
        if pos.size >= 500:
            sample = rng.choice(pos, size=min(max_tail_samples, pos.size), replace=False)
            cmp = analysis.compare_power_law_lognormal(sample)
            entry["heavy_tail"] = {
                "alpha": cmp.power_law.alpha,
                "xmin": cmp.power_law.xmin,
                "n_tail": cmp.power_law.n_tail,
                "lognormal_mu": cmp.lognormal_mu,
                "lognormal_sigma": cmp.lognormal_sigma,
                "R_vs_lognormal": cmp.normalised_ratio,
                "p_vs_lognormal": cmp.p_value,
                "R_vs_exponential": cmp.exponential_ratio,
                "p_vs_exponential": cmp.exponential_p_value,
                "verdict": cmp.verdict,
            }
        out.append(entry)
    return out


def _orientation_per_loop(grating_resp: np.ndarray, thetas: np.ndarray):
    """Orientation tuning at every loop from grating responses ``[T+1, θ, f, φ, C]``; returns the
    preferred frequency per unit, the final loop's tuning and curves, and per-loop summaries."""
    g = grating_resp.mean(axis=3)  # [T+1, θ, f, C] phase-averaged
    num_loops = g.shape[0]
    best_f = np.argmax(g[-1].max(axis=0), axis=0)  # [C] preferred frequency at the final loop
    c_idx = np.arange(g.shape[-1])
    per_loop = []
    for t in range(num_loops):
        curves = g[t][:, best_f, c_idx].T  # [C, θ]
        tuning = analysis.orientation_tuning(curves, thetas, fit_width=(t == num_loops - 1))
        per_loop.append(
            {
                "loop": t,
                "osi": _summary(tuning.osi),
                "global_osi": _summary(tuning.global_osi),
                "responsive": int(np.sum(curves.max(axis=1) > 0)),
            }
        )
    return best_f, tuning, curves, per_loop


def _size_tuning_per_loop(disc_resp: np.ndarray, best_f: np.ndarray, pref_idx: np.ndarray, radii: np.ndarray) -> dict:
    """Size tuning at each unit's preferred frequency and orientation from disc responses
    ``[T+1, f, θ, r, φ, C]``: per-loop suppression indices and the final loop's curves."""
    d = disc_resp.mean(axis=4)  # [T+1, f, θ, r, C]
    c_idx = np.arange(d.shape[-1])
    size_curves = np.stack([d[:, best_f[c], pref_idx[c], :, c] for c in c_idx], axis=1)  # [T+1, C, r]
    per_loop = [
        {"loop": t, "suppression_index": _summary(analysis.suppression_index(size_curves[t]))}
        for t in range(size_curves.shape[0])
    ]
    return {
        "per_loop": per_loop,
        "suppression_index": analysis.suppression_index(size_curves[-1]).tolist(),
        "radii": radii.tolist(),
        "curves": size_curves[-1].tolist(),
        "peak_radius_median": float(np.nanmedian(radii[np.argmax(size_curves[-1], axis=1)])),
    }


def measure(
    model: Any,
    params: Any,
    *,
    natural_images: np.ndarray,
    normalisation: Normalisation,
    config: ProbeConfig = ProbeConfig(),
) -> dict[str, Any]:
    """Every analysis for every lateral layer of ``model`` (see the module docstring)."""
    size, channels = natural_images.shape[1], natural_images.shape[-1]
    thetas = np.arange(config.num_orientations) * np.pi / config.num_orientations
    phases = np.arange(config.num_phases) * 2 * np.pi / config.num_phases
    freqs = np.asarray(config.frequencies)

    def responses(patterns: jax.Array) -> dict[str, np.ndarray]:
        flat = patterns.reshape(-1, size, size)
        x = stimuli.to_model_input(flat, normalisation, channels)
        states = record_states(model, params, x, batch_size=config.batch_size)
        return {k: centre(v).reshape(v.shape[0], *patterns.shape[:-2], v.shape[-1]) for k, v in states.items()}

    natural = record_states(model, params, jnp.asarray(natural_images), batch_size=config.batch_size)
    grating_resp = responses(stimuli.grating_bank(size, thetas, freqs, phases))  # [T+1, θ, f, φ, C]
    radii = np.linspace(1.0, size / 2, config.num_radii)
    disc_bank = stimuli.size_tuning_bank(
        size, jnp.asarray(radii), jnp.asarray(thetas), jnp.asarray(freqs), jnp.asarray(phases)
    )
    disc_resp = responses(disc_bank)  # [T+1, f, θ, r, φ, C]
    kernels = ei.lateral_kernels(params)
    layers: dict[str, Any] = {}
    for name, states in natural.items():
        best_f, final_tuning, final_curves, per_loop_orientation = _orientation_per_loop(grating_resp[name], thetas)
        pref_idx = np.argmax(final_curves, axis=1)
        size_tuning = _size_tuning_per_loop(disc_resp[name], best_f, pref_idx, radii)
        peak_radius = size_tuning["peak_radius_median"]
        cs = _surround(
            model,
            params,
            size,
            channels,
            normalisation,
            config,
            name,
            peak_radius,
            thetas,
            freqs,
            phases,
            best_f,
            pref_idx,
        )
        layer = {
            "activation": activation_statistics(states, max_tail_samples=config.max_tail_samples),
            "orientation": {
                "per_loop": per_loop_orientation,
                "osi": final_tuning.osi.tolist(),
                "global_osi": final_tuning.global_osi.tolist(),
                "preferred": final_tuning.preferred.tolist(),
                "half_width_deg": np.degrees(final_tuning.half_width).tolist(),
                "curves": final_curves.tolist(),
                "orientations": thetas.tolist(),
            },
            "size_tuning": size_tuning,
            "surround": cs,
        }
        w_key = next((k for k in kernels if name in k and "w_inh" not in k), None)
        if w_key is not None:
            layer["connection"] = connection_statistics(
                np.asarray(kernels[w_key]), np.asarray(params[name]["w_ff"]), final_tuning.preferred
            )
        layers[name] = layer
    return {"layers": layers, "num_loops": int(next(iter(natural.values())).shape[0] - 1)}


def _surround(
    model, params, size, channels, normalisation, config, name, centre_radius, thetas, freqs, phases, best_f, pref_idx
):
    """Iso/ortho annulus modulation at each unit's preferred orientation and frequency (final loop)."""
    stim = stimuli.centre_surround_bank(
        size, float(centre_radius), 1.0, jnp.asarray(thetas), jnp.asarray(freqs), jnp.asarray(phases)
    )  # [f, θ, φ, S, S] per kind
    resp = {}
    for kind, patterns in stim.items():
        x = stimuli.to_model_input(patterns.reshape(-1, size, size), normalisation, channels)
        states = record_states(model, params, x, batch_size=config.batch_size)[name]
        r = centre(states)[-1].reshape(len(freqs), len(thetas), len(phases), -1).mean(axis=2)  # [f, θ, C]
        resp[kind] = np.array([r[best_f[c], pref_idx[c], c] for c in range(r.shape[-1])])
    mod = analysis.surround_modulation(resp["centre"], resp["iso"], resp["ortho"])
    return {
        "centre_radius": centre_radius,
        "iso_suppression": _summary(mod["iso_suppression"]),
        "ortho_suppression": _summary(mod["ortho_suppression"]),
    }


def _binned_strength(strength: np.ndarray, similarity: np.ndarray, num_bins: int = 10) -> dict[str, list]:
    """Mean lateral strength of the off-diagonal pairs in afferent-similarity quantile bins."""
    mask = ~np.eye(strength.shape[0], dtype=bool)
    s, f = strength[mask], similarity[mask]
    edges = np.unique(np.quantile(f, np.linspace(0.0, 1.0, num_bins + 1)))
    num_bins = len(edges) - 1
    idx = np.clip(np.digitize(f, edges) - 1, 0, num_bins - 1)
    means = [float(s[idx == b].mean()) if np.any(idx == b) else None for b in range(num_bins)]
    return {
        "centres": (0.5 * (edges[1:] + edges[:-1])).tolist(),
        "mean_strength": means,
        "count": np.bincount(idx, minlength=num_bins).tolist(),
    }


def connection_statistics(w_lat: np.ndarray, w_ff: np.ndarray, preferred: np.ndarray) -> dict[str, Any]:
    """E/I diagnostics, like-to-like and the radial profile of one lateral kernel."""
    d = ei.diagnose(jnp.asarray(w_lat))
    out: dict[str, Any] = {
        "purity": np.asarray(d.purity).tolist(),
        "purity_mean": float(d.purity.mean()),
        "fraction_excitatory": float(d.fraction_excitatory),
        "balance": float(d.balance),
    }
    radii, profile = analysis.radial_profile(w_lat)
    fit = analysis.fit_dog(radii, profile)
    out["radial_profile"] = {
        "radii": radii.tolist(),
        "profile": profile.tolist(),
        "dog": dataclasses.asdict(fit),
        "mexican_hat": bool(fit.mexican_hat) if np.isfinite(fit.r_squared) else None,  # None: too few radii
    }
    if w_lat.shape[2] > 1 and w_lat.shape[2] == w_ff.shape[-1]:
        strength = analysis.lateral_strength(w_lat)
        sim = analysis.afferent_similarity(w_ff)
        dtheta = analysis.orientation_difference(np.asarray(preferred))
        by_sim = analysis.like_to_like(strength, sim)
        by_ori = analysis.like_to_like(strength, -dtheta)
        out["like_to_like"] = {
            "rho_afferent_similarity": by_sim.rho,
            "p_afferent_similarity": by_sim.p_value,
            "rho_orientation_similarity": by_ori.rho,
            "p_orientation_similarity": by_ori.p_value,
            "co_orthogonal_ratio": analysis.co_orthogonal_ratio(
                analysis.lateral_strength(w_lat, part="excitatory"), dtheta
            ),
            "n_pairs": by_sim.n_pairs,
            "binned": _binned_strength(strength, sim),
        }
    return out
