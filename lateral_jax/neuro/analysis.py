"""Activation and connection analyses of model units, as in V1 physiology (definitions: docs/analysis.md).

Activation
  * sparseness (Treves–Rolls / Vinje–Gallant): ``S = (1 - (Σr/n)² / (Σr²/n)) / (1 - 1/n)`` — over
    stimuli for one unit (lifetime) or over units for one stimulus (population); 0 for a constant
    response, 1 for a response to exactly one of n.
  * excess kurtosis ``E[(r-μ)⁴]/σ⁴ - 3``; activity fraction (share of responses > 0).
  * heavy tails (Clauset, Shalizi & Newman 2009): power-law exponent by maximum likelihood,
    ``α = 1 + n / Σ ln(x_i / x_min)``, with ``x_min`` minimising the Kolmogorov–Smirnov distance; a
    lognormal and an exponential fitted to the same tail (truncated at ``x_min``) by maximum
    likelihood; Vuong's normalised log-likelihood ratios decide.  Verdict (our rule): "lognormal"
    if the lognormal is significantly better; else "exponential" (light tail) if the exponential
    is; else "power_law" if the power law is significantly better than the exponential; else
    "inconclusive".  A truncated lognormal can mimic a power law, so true power-law data are
    typically *not* distinguishable from a lognormal (Clauset et al.): the exponential comparison
    is what separates heavy from light tails.
  * orientation: tuning curves, preferred orientation, ``OSI = (R_pref - R_orth)/(R_pref + R_orth)``,
    global ``OSI = |Σ R e^{2iθ}| / Σ R``, von Mises half-width at half-height.
  * centre–surround: size tuning, suppression index ``(R_peak - R_largest)/R_peak`` (macaque V1 mean
    ≈ 0.38), surround modulation by iso- and orthogonally oriented annuli.

Connection
  * like-to-like: lateral strength between channels vs afferent-filter similarity and vs
    preferred-orientation difference (Spearman ρ with a permutation p-value, co-/orthogonal ratio).
  * radial profile of a lateral kernel and a difference-of-Gaussians (Mexican hat) fit.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import optimize, special, stats

# ------------------------------------------------------------------------------------------
# Activation statistics
# ------------------------------------------------------------------------------------------


def sparseness(responses: np.ndarray, axis: int = 0) -> np.ndarray:
    """Treves–Rolls sparseness along ``axis`` (responses are rectified first; NaN if all zero)."""
    r = np.maximum(np.asarray(responses, np.float64), 0.0)
    n = r.shape[axis]
    mean_sq = np.mean(r, axis=axis) ** 2
    sq_mean = np.mean(r**2, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (1.0 - mean_sq / sq_mean) / (1.0 - 1.0 / n)


def excess_kurtosis(responses: np.ndarray, axis: int = 0) -> np.ndarray:
    return stats.kurtosis(np.asarray(responses, np.float64), axis=axis, fisher=True, bias=True)


def activity_fraction(responses: np.ndarray) -> float:
    return float(np.mean(np.asarray(responses) > 0))


# ------------------------------------------------------------------------------------------
# Heavy tails
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks: float
    n_tail: int


@dataclasses.dataclass(frozen=True)
class TailComparison:
    power_law: PowerLawFit
    lognormal_mu: float
    lognormal_sigma: float
    loglik_ratio: float  # Σ (ℓ_powerlaw - ℓ_lognormal) over the tail; > 0 favours the power law
    normalised_ratio: float  # R / (σ √n)
    p_value: float
    exponential_ratio: float  # normalised Σ (ℓ_powerlaw - ℓ_exponential): > 0 = heavier than exponential
    exponential_p_value: float
    verdict: str  # "power_law" | "lognormal" | "exponential" | "inconclusive"


def fit_power_law(
    samples: np.ndarray, *, num_candidates: int = 200, min_tail: int = 50, min_tail_fraction: float = 0.1
) -> PowerLawFit:
    """Continuous power-law MLE with ``x_min`` chosen by the KS distance (Clauset et al. 2009).

    ``x_min`` is searched among quantiles that leave at least ``max(min_tail, min_tail_fraction · n)``
    samples in the tail (our choice: tails of a few hundred points make the KS choice noisy and the
    likelihood-ratio test that follows powerless).
    """
    x = np.sort(np.asarray(samples, np.float64))
    x = x[x > 0]
    min_tail = max(min_tail, int(min_tail_fraction * x.size))
    if x.size < min_tail:
        raise ValueError(f"need at least {min_tail} positive samples for a power-law fit; got {x.size}.")
    candidates = np.unique(np.quantile(x[: x.size - min_tail + 1], np.linspace(0, 1, num_candidates)))
    best = None
    for xmin in candidates:
        tail = x[x >= xmin]
        n = tail.size
        if n < min_tail:
            continue
        alpha = 1.0 + n / np.sum(np.log(tail / xmin))
        empirical = np.arange(1, n + 1) / n
        model = 1.0 - (tail / xmin) ** (1.0 - alpha)
        ks = float(np.max(np.abs(empirical - model)))
        if best is None or ks < best.ks:
            best = PowerLawFit(float(alpha), float(xmin), ks, int(n))
    return best


def _lognormal_tail_loglik(tail: np.ndarray, xmin: float, mu: float, sigma: float) -> np.ndarray:
    """Per-sample log-likelihood of a lognormal truncated to ``x ≥ xmin``."""
    log_pdf = -np.log(tail * sigma * math.sqrt(2 * math.pi)) - (np.log(tail) - mu) ** 2 / (2 * sigma**2)
    log_survival = special.log_ndtr(-(math.log(xmin) - mu) / sigma)
    return log_pdf - log_survival


def compare_power_law_lognormal(samples: np.ndarray, *, significance: float = 0.1) -> TailComparison:
    """Fits both distributions to the power-law tail and runs Vuong's likelihood-ratio test."""
    pl = fit_power_law(samples)
    x = np.asarray(samples, np.float64)
    tail = x[x >= pl.xmin]
    logs = np.log(tail)

    def nll(params):
        mu, log_sigma = params
        return -np.sum(_lognormal_tail_loglik(tail, pl.xmin, mu, math.exp(log_sigma)))

    res = optimize.minimize(
        nll,
        x0=[logs.mean(), math.log(max(logs.std(), 1e-3))],
        method="Nelder-Mead",
        options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 4000},
    )
    mu, sigma = float(res.x[0]), float(math.exp(res.x[1]))
    ll_pl = np.log((pl.alpha - 1) / pl.xmin) - pl.alpha * np.log(tail / pl.xmin)
    r, normalised, p = _vuong(ll_pl, _lognormal_tail_loglik(tail, pl.xmin, mu, sigma))
    rate = 1.0 / max(tail.mean() - pl.xmin, 1e-12)  # exponential truncated at x_min: MLE rate
    _, exp_normalised, exp_p = _vuong(ll_pl, np.log(rate) - rate * (tail - pl.xmin))
    if p < significance and r < 0:
        verdict = "lognormal"
    elif exp_p < significance and exp_normalised < 0:
        verdict = "exponential"
    elif exp_p < significance and exp_normalised > 0 and not (p < significance and r < 0):
        verdict = "power_law"
    else:
        verdict = "inconclusive"
    return TailComparison(pl, mu, sigma, r, normalised, p, exp_normalised, exp_p, verdict)


def _vuong(ll_a: np.ndarray, ll_b: np.ndarray) -> tuple[float, float, float]:
    """Vuong's test: ``(R = Σ(ℓ_a - ℓ_b), R / (σ √n), two-sided p)``."""
    diff = ll_a - ll_b
    r, sd = float(diff.sum()), float(diff.std())
    normalised = r / (sd * math.sqrt(diff.size)) if sd > 0 else 0.0
    return r, normalised, float(special.erfc(abs(normalised) / math.sqrt(2)))


# ------------------------------------------------------------------------------------------
# Orientation tuning
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OrientationTuning:
    preferred: np.ndarray  # [units], radians in [0, π)
    osi: np.ndarray  # [units]
    global_osi: np.ndarray  # [units]
    half_width: np.ndarray  # [units], radians (von Mises HWHH); NaN where the fit failed


def orientation_tuning(curves: np.ndarray, orientations: np.ndarray, *, fit_width: bool = True) -> OrientationTuning:
    """Tuning metrics of ``curves[units, n_θ]`` sampled at ``orientations`` (radians, over [0, π))."""
    curves = np.maximum(np.asarray(curves, np.float64), 0.0)
    theta = np.asarray(orientations, np.float64)
    k = theta.size
    pref_idx = np.argmax(curves, axis=1)
    orth_idx = (pref_idx + k // 2) % k
    rows = np.arange(curves.shape[0])
    r_pref, r_orth = curves[rows, pref_idx], curves[rows, orth_idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        osi = (r_pref - r_orth) / (r_pref + r_orth)
        vec = np.abs((curves * np.exp(2j * theta)[None]).sum(axis=1)) / curves.sum(axis=1)
    half = np.full(curves.shape[0], np.nan)
    if fit_width:
        for u in range(curves.shape[0]):
            half[u] = _von_mises_half_width(curves[u], theta)
    return OrientationTuning(theta[pref_idx] % np.pi, osi, vec, half)


def _von_mises_half_width(curve: np.ndarray, theta: np.ndarray) -> float:
    """Fits ``b + a·exp(κ(cos 2(θ-θ_p) - 1))``; returns the half-width at half-height in radians."""
    if not np.isfinite(curve).all() or curve.max() <= curve.min():
        return float("nan")

    def f(t, b, a, kappa, tp):
        return b + a * np.exp(kappa * (np.cos(2 * (t - tp)) - 1))

    p0 = [curve.min(), curve.max() - curve.min(), 2.0, theta[np.argmax(curve)]]
    try:
        (b, a, kappa, tp), _ = optimize.curve_fit(
            f, theta, curve, p0=p0, bounds=([-np.inf, 0, 1e-3, -np.pi], [np.inf, np.inf, 200, 2 * np.pi]), maxfev=5000
        )
    except (RuntimeError, ValueError):
        return float("nan")
    c = 1 + math.log(0.5) / kappa
    return float(0.5 * math.acos(c)) if c > -1 else float(np.pi / 2)


# ------------------------------------------------------------------------------------------
# Centre–surround
# ------------------------------------------------------------------------------------------


def _responsive(values: np.ndarray, min_fraction: float) -> np.ndarray:
    """Units whose response exceeds ``min_fraction`` of the largest unit's (others are NaN)."""
    top = np.nanmax(values) if values.size else 0.0
    return values > max(min_fraction * top, 1e-12)


def suppression_index(size_curves: np.ndarray, *, min_fraction: float = 0.01) -> np.ndarray:
    """``(R_peak - R_largest) / R_peak`` for ``size_curves[units, n_radii]`` (radii ascending).

    NaN for units whose peak is below ``min_fraction`` of the strongest unit's (not driven)."""
    r = np.maximum(np.asarray(size_curves, np.float64), 0.0)
    peak = r.max(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(_responsive(peak, min_fraction), (peak - r[:, -1]) / peak, np.nan)


def surround_modulation(
    centre: np.ndarray, iso: np.ndarray, ortho: np.ndarray, *, min_fraction: float = 0.1
) -> dict[str, np.ndarray]:
    """Per-unit suppression by iso/ortho annuli: ``1 - R_surround / R_centre`` (> 0 suppresses).

    NaN for units whose centre response is below ``min_fraction`` of the strongest unit's: a ratio
    to a near-zero centre response says nothing about the surround."""
    c = np.maximum(np.asarray(centre, np.float64), 0.0)
    ok = _responsive(c, min_fraction)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "iso_suppression": np.where(ok, 1.0 - np.maximum(iso, 0.0) / c, np.nan),
            "ortho_suppression": np.where(ok, 1.0 - np.maximum(ortho, 0.0) / c, np.nan),
        }


# ------------------------------------------------------------------------------------------
# Connection properties
# ------------------------------------------------------------------------------------------


def lateral_strength(w_lat: np.ndarray, *, part: str = "net") -> np.ndarray:
    """Lateral weight from channel i to channel j summed over space (HWIO): ``S[i, j] = Σ W[:, :, i, j]``
    (``part="net"``), or only its excitatory ``Σ relu(W)`` / inhibitory ``Σ relu(-W)`` part."""
    w = np.asarray(w_lat, np.float64)
    if part == "excitatory":
        w = np.maximum(w, 0.0)
    elif part == "inhibitory":
        w = np.maximum(-w, 0.0)
    elif part != "net":
        raise ValueError(f"part={part!r} must be 'net', 'excitatory' or 'inhibitory'.")
    return w.sum(axis=(0, 1))


def afferent_similarity(w_ff: np.ndarray) -> np.ndarray:
    """Cosine similarity of the afferent filters of every pair of output channels, ``[C, C]``."""
    f = np.asarray(w_ff, np.float64).reshape(-1, w_ff.shape[-1]).T
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return f @ f.T


def orientation_difference(preferred: np.ndarray) -> np.ndarray:
    """``|θ_i - θ_j|`` modulo π, in [0, π/2], for every pair."""
    d = np.abs(preferred[:, None] - preferred[None, :]) % np.pi
    return np.minimum(d, np.pi - d)


@dataclasses.dataclass(frozen=True)
class Correlation:
    rho: float
    p_value: float  # permutation p-value (two-sided)
    n_pairs: int


def like_to_like(
    strength: np.ndarray, similarity: np.ndarray, *, num_permutations: int = 1000, seed: int = 0
) -> Correlation:
    """Spearman ρ between lateral strength and a pair feature over off-diagonal pairs, with a
    permutation p-value (strengths shuffled across pairs)."""
    mask = ~np.eye(strength.shape[0], dtype=bool)
    s, f = strength[mask], similarity[mask]
    rho = float(stats.spearmanr(s, f).statistic)
    rng = np.random.default_rng(seed)
    rank_f = stats.rankdata(f)
    rank_s = stats.rankdata(s)
    null = np.array([np.corrcoef(rng.permutation(rank_s), rank_f)[0, 1] for _ in range(num_permutations)])
    p = float((np.sum(np.abs(null) >= abs(rho)) + 1) / (num_permutations + 1))
    return Correlation(rho, p, int(s.size))


def co_orthogonal_ratio(strength: np.ndarray, orientation_diff: np.ndarray) -> float:
    """Mean lateral strength of co-oriented pairs (Δθ < 22.5°) over that of orthogonal ones (Δθ > 67.5°)."""
    mask = ~np.eye(strength.shape[0], dtype=bool)
    co = strength[mask & (orientation_diff < np.pi / 8)]
    orth = strength[mask & (orientation_diff > 3 * np.pi / 8)]
    if co.size == 0 or orth.size == 0 or orth.mean() == 0:
        return float("nan")
    return float(co.mean() / orth.mean())


def radial_profile(w_lat: np.ndarray, *, self_connections: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean lateral weight vs distance from the kernel centre: ``(radii, profile)``.

    Averages over channel pairs (only ``i = j`` if ``self_connections`` and the kernel is full;
    depthwise kernels are their own self-connections)."""
    w = np.asarray(w_lat, np.float64)
    if w.shape[2] == 1:
        per_position = w[:, :, 0, :].mean(axis=-1)
    elif self_connections:
        per_position = np.einsum("hwii->hw", w) / w.shape[-1]
    else:
        per_position = w.mean(axis=(2, 3))
    h, wd = per_position.shape
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(wd) - (wd - 1) / 2, indexing="ij")
    r = np.round(np.sqrt(yy**2 + xx**2), 6)
    radii = np.unique(r)
    return radii, np.array([per_position[r == v].mean() for v in radii])


@dataclasses.dataclass(frozen=True)
class DoGFit:
    amp_e: float
    sigma_e: float
    amp_i: float
    sigma_i: float
    r_squared: float
    max_radius: float = float("inf")  # the largest distance the profile covers

    @property
    def mexican_hat(self) -> bool:
        """A positive centre (A_e > A_i > 0), a distinctly wider inhibitory surround
        (1.2 σ_e ≤ σ_i ≤ the largest measured distance) and a fit explaining more than half of the
        variance.  Near-cancelling DoGs (σ_i ≈ σ_e) and surrounds wider than the kernel (fitted to
        a profile that merely declines through zero) do not count."""
        return (
            self.amp_e > self.amp_i > 0
            and 1.2 * self.sigma_e <= self.sigma_i <= self.max_radius
            and self.r_squared > 0.5
        )


def dog(r: np.ndarray, amp_e: float, sigma_e: float, amp_i: float, sigma_i: float) -> np.ndarray:
    """Difference of Gaussians ``A_e exp(-r²/2σ_e²) - A_i exp(-r²/2σ_i²)``."""
    return amp_e * np.exp(-(r**2) / (2 * sigma_e**2)) - amp_i * np.exp(-(r**2) / (2 * sigma_i**2))


def fit_dog(radii: np.ndarray, profile: np.ndarray, *, min_points: int = 5) -> DoGFit:
    """Least-squares DoG fit (both amplitudes ≥ 0); ``r_squared`` is the fraction of variance explained.

    A profile with fewer than ``min_points`` distinct radii (a 3×3 kernel has 3) cannot constrain
    the 4 parameters: the fit is then all-NaN and ``mexican_hat`` is False."""
    radii, profile = np.asarray(radii, np.float64), np.asarray(profile, np.float64)
    if radii.size < min_points:
        return DoGFit(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    scale = max(np.abs(profile).max(), 1e-12)
    y = profile / scale
    best = None
    for se0, si0 in ((0.5, 2.0), (1.0, 3.0), (0.7, 1.5)):
        try:
            p, _ = optimize.curve_fit(
                dog, radii, y, p0=[1.0, se0, 0.5, si0], bounds=([0, 0.05, 0, 0.05], [50, 20, 50, 40]), maxfev=20000
            )
        except (RuntimeError, ValueError):
            continue
        resid = np.sum((y - dog(radii, *p)) ** 2)
        if best is None or resid < best[1]:
            best = (p, resid)
    if best is None:
        return DoGFit(float("nan"), float("nan"), float("nan"), float("nan"), float("nan"))
    p, resid = best
    total = np.sum((y - y.mean()) ** 2)
    r2 = 1.0 - resid / total if total > 0 else float("nan")
    return DoGFit(float(p[0] * scale), float(p[1]), float(p[2] * scale), float(p[3]), float(r2), float(radii.max()))
