"""Tests of stimuli and analyses on constructed ground truth (lateral_jax/stimuli.py, analysis.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lateral_jax.neuro import analysis, stimuli
from lateral_jax.training.data.pipeline import IDENTITY, Normalisation

SIZE = 31
ORIENTATIONS = np.arange(12) * np.pi / 12
FREQ = 0.15
PHASES = np.arange(4) * np.pi / 2


def gabor_filter(theta, size=11, freq=FREQ, sigma=2.5):
    """A zero-mean Gabor filter whose bars have orientation theta (same convention as the gratings)."""
    r = np.arange(size) - (size - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    across = -x * np.sin(theta) + y * np.cos(theta)
    g = np.exp(-(x**2 + y**2) / (2 * sigma**2)) * np.cos(2 * np.pi * freq * across)
    return g - g.mean()


def centre_response(filters, images):
    """Rectified, phase-averaged response of centred filters to images [n, p, S, S] → [units, n]."""
    s, k = images.shape[-1], filters.shape[-1]
    lo = (s - k) // 2
    patch = np.asarray(images)[..., lo : lo + k, lo : lo + k]
    resp = np.einsum("uhw,...hw->u...", filters, patch)
    return np.maximum(resp, 0).mean(axis=-1)


def test_gabor_bank_recovers_preferred_orientations_and_high_osi():
    thetas = ORIENTATIONS[[0, 2, 5, 9]]
    filters = np.stack([gabor_filter(t) for t in thetas])
    bank = stimuli.grating_bank(SIZE, ORIENTATIONS, [FREQ], PHASES)[:, 0]  # [θ, φ, S, S]
    curves = centre_response(filters, bank)
    tuning = analysis.orientation_tuning(curves, ORIENTATIONS)
    np.testing.assert_allclose(tuning.preferred, thetas % np.pi, atol=1e-6)
    assert np.all(tuning.osi > 0.9)
    assert np.all(tuning.global_osi > 0.3)
    assert np.all((tuning.half_width > np.deg2rad(5)) & (tuning.half_width < np.deg2rad(45)))


def test_isotropic_filter_has_osi_near_zero():
    r = np.arange(11) - 5
    y, x = np.meshgrid(r, r, indexing="ij")
    dog_filter = np.exp(-(x**2 + y**2) / 2.0) - 0.25 * np.exp(-(x**2 + y**2) / 8.0)
    bank = stimuli.grating_bank(SIZE, ORIENTATIONS, [FREQ], PHASES)[:, 0]
    curves = centre_response(dog_filter[None], bank)
    tuning = analysis.orientation_tuning(curves, ORIENTATIONS, fit_width=False)
    assert tuning.osi[0] < 0.05 and tuning.global_osi[0] < 0.05


def test_designed_centre_surround_unit_gives_the_analytic_suppression_index():
    """A unit that sums the grating energy in its centre (radius 3) and subtracts 0.5 × the energy in
    its surround (radius 3..9): for full-contrast discs, R(r) = A_c(r) - 0.05 A_s(r), so
    SI = (R_peak - R_largest)/R_peak = 0.05 A_s / A_c, computed from the masks."""
    radii = np.arange(1, 16, dtype=np.float32)
    r = np.hypot(*np.meshgrid(np.arange(SIZE) + 0.5 - SIZE / 2, np.arange(SIZE) + 0.5 - SIZE / 2, indexing="ij"))
    centre, surround = (r <= 3).astype(float), ((r > 3) & (r <= 9)).astype(float)
    discs = np.asarray(stimuli.size_tuning_stimuli(SIZE, radii, 0.0, FREQ, PHASES))  # [r, φ, S, S]
    energy = discs**2  # phase-averaged local contrast energy
    resp = (np.einsum("rphw,hw->rp", energy, centre) - 0.05 * np.einsum("rphw,hw->rp", energy, surround)).mean(axis=1)
    si = analysis.suppression_index(resp[None])[0]
    full = np.stack([np.asarray(stimuli.grating(SIZE, 0.0, FREQ, p)) for p in PHASES]) ** 2  # full field
    a_c, a_s = (full * centre).sum(axis=(1, 2)).mean(), (full * surround).sum(axis=(1, 2)).mean()
    expected = 0.05 * a_s / a_c  # peak: a disc filling the centre; largest: both filled
    assert si == pytest.approx(expected, abs=0.05)
    assert si > 0.3
    pure_centre = np.einsum("rphw,hw->rp", energy, centre).mean(axis=1)
    assert analysis.suppression_index(pure_centre[None])[0] == pytest.approx(0.0, abs=0.02)


def test_power_law_samples_recover_alpha_and_are_classified():
    rng = np.random.default_rng(0)
    samples = (1 - rng.random(10_000)) ** (-1 / 1.5)  # Pareto with α = 2.5, x_min = 1
    cmp = analysis.compare_power_law_lognormal(samples)
    assert cmp.power_law.alpha == pytest.approx(2.5, abs=0.1)
    assert cmp.verdict == "power_law"
    assert cmp.exponential_ratio > 3 and cmp.exponential_p_value < 0.01  # far heavier than exponential
    assert cmp.p_value > 0.1  # and not rejected in favour of a lognormal


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lognormal_samples_are_classified_lognormal(seed):
    samples = np.random.default_rng(seed).lognormal(mean=0.0, sigma=0.5, size=10_000)
    cmp = analysis.compare_power_law_lognormal(samples)
    assert cmp.verdict == "lognormal" and cmp.loglik_ratio < 0


def test_exponential_samples_are_light_tailed():
    samples = np.random.default_rng(0).exponential(size=10_000)
    assert analysis.compare_power_law_lognormal(samples).verdict in ("exponential", "lognormal")


def test_sparseness_extremes_and_kurtosis():
    assert analysis.sparseness(np.eye(10)[3]) == pytest.approx(1.0)
    assert analysis.sparseness(np.full(10, 2.5)) == pytest.approx(0.0)
    both = analysis.sparseness(np.stack([np.eye(8)[0], np.ones(8)], axis=1), axis=0)
    np.testing.assert_allclose(both, [1.0, 0.0], atol=1e-12)
    assert analysis.excess_kurtosis(np.random.default_rng(0).normal(size=100_000)) == pytest.approx(0.0, abs=0.05)
    assert analysis.activity_fraction(np.array([0.0, 1.0, -1.0, 2.0])) == 0.5


def test_like_to_like_on_constructed_weights():
    rng = np.random.default_rng(0)
    c = 24
    feats = rng.normal(size=(c, 9))
    sim = analysis.afferent_similarity(feats.T.reshape(3, 3, 1, c))
    strength = 2.0 * sim + 0.05 * rng.normal(size=(c, c))
    corr = analysis.like_to_like(strength, sim)
    assert corr.rho > 0.9 and corr.p_value < 0.01 and corr.n_pairs == c * (c - 1)
    shuffled = np.random.default_rng(1).permutation(strength.ravel()).reshape(c, c)  # one fixed draw
    null = analysis.like_to_like(shuffled, sim)
    assert abs(null.rho) < 0.15 and null.p_value > 0.05


def test_co_orthogonal_ratio():
    preferred = np.array([0.0, 0.1, np.pi / 2, np.pi / 2 + 0.1])
    diff = analysis.orientation_difference(preferred)
    strength = np.where(diff < np.pi / 8, 2.0, 1.0)
    assert analysis.co_orthogonal_ratio(strength, diff) == pytest.approx(2.0)


def test_dog_fit_recovers_mexican_hat():
    size = 9
    r = np.arange(size) - (size - 1) / 2
    yy, xx = np.meshgrid(r, r, indexing="ij")
    profile2d = analysis.dog(np.hypot(yy, xx), 1.0, 0.8, 0.4, 2.5)
    w = np.zeros((size, size, 4, 4))
    for i in range(4):
        w[:, :, i, i] = profile2d
    radii, prof = analysis.radial_profile(w)
    fit = analysis.fit_dog(radii, prof)
    assert fit.sigma_e == pytest.approx(0.8, rel=0.05) and fit.sigma_i == pytest.approx(2.5, rel=0.05)
    assert fit.sigma_e < fit.sigma_i and fit.mexican_hat and fit.r_squared > 0.99


def test_stimuli_shapes_and_model_input_mapping():
    bank = stimuli.grating_bank(16, ORIENTATIONS[:3], [0.1, 0.2], PHASES[:2])
    assert bank.shape == (3, 2, 2, 16, 16) and float(jnp.abs(bank).max()) <= 1.0
    cs = stimuli.centre_surround_stimuli(32, centre_radius=4, gap=2, orientation=0.0, frequency=0.12, phases=PHASES)
    assert set(cs) == {"centre", "iso", "ortho"} and cs["iso"].shape == (4, 32, 32)
    # the centre is the same in all three; the surrounds differ
    np.testing.assert_allclose(cs["iso"][:, 16, 16], cs["centre"][:, 16, 16], atol=1e-4)
    assert float(jnp.abs(cs["iso"] - cs["ortho"]).max()) > 0.5
    assert float(jnp.abs(cs["centre"][:, 0, 0]).max()) < 1e-3  # grey far from the centre
    x = stimuli.to_model_input(bank[0, 0], IDENTITY, 1)
    np.testing.assert_array_equal(x[..., 0], bank[0, 0])
    norm = Normalisation((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    y = stimuli.to_model_input(jnp.zeros((16, 16)), norm, 3)
    np.testing.assert_allclose(y[0, 0], [0.0, 0.5, 1.0], atol=1e-6)  # grey 0.5 in each channel's scale
    imgs, labels = stimuli.gabor_contours(8, seed=0)
    assert imgs.shape == (8, 32, 32) and labels.shape == (8,)
    assert jax.numpy.all(jnp.isfinite(imgs))


def test_dog_fit_refuses_an_underdetermined_profile():
    radii, prof = analysis.radial_profile(np.ones((3, 3, 2, 2)))
    assert radii.size == 3
    fit = analysis.fit_dog(radii, prof)
    assert np.isnan(fit.sigma_e) and not fit.mexican_hat


def test_a_monotone_profile_crossing_zero_is_not_a_mexican_hat():
    """A near-cancelling DoG (σ_e ≈ σ_i) fits a profile that only decreases through zero; it must not count."""
    radii = np.array([0.0, 1.0, np.sqrt(2), 2.0, np.sqrt(5), np.sqrt(8)])
    fit = analysis.fit_dog(radii, 0.008 - 0.006 * radii)
    assert not fit.mexican_hat
