"""Tests of the E/I separation (lateral_jax/ei.py) on hand-built kernels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lateral_jax.core import ei


def kernel_from_channels(values):
    """A [1, 1, C, C] kernel whose presynaptic channel j (axis 2) holds the row values[j]."""
    w = jnp.asarray(values, jnp.float32)
    return w[None, None]


def test_channel_mass_on_a_hand_built_kernel():
    # channel 0: +1, +2 → P=3, N=0; channel 1: -1, +3 → P=3, N=1
    w = kernel_from_channels([[1.0, 2.0], [-1.0, 3.0]])
    p, n = ei.channel_mass(w)
    np.testing.assert_allclose(p, [3.0, 3.0])
    np.testing.assert_allclose(n, [0.0, 1.0])
    # depthwise [l, l, 1, C]: channel j owns w[:, :, 0, j]
    dw = jnp.stack([jnp.array([[1.0, -2.0], [3.0, -4.0]])[:, :, None]], axis=0)[0].reshape(2, 1, 1, 2)
    p, n = ei.channel_mass(jnp.tile(dw, (1, 2, 1, 1)))
    np.testing.assert_allclose(p, [2 * 4.0, 0.0])
    np.testing.assert_allclose(n, [0.0, 2 * 6.0])


def test_mixed_sign_penalty_is_zero_iff_every_channel_is_pure():
    pure = kernel_from_channels([[1.0, 2.0], [-1.0, -3.0], [0.0, 0.5]])
    assert float(ei.mixed_sign_penalty(pure)) == 0.0
    assert float(ei.mixed_sign_penalty(pure, smooth=True)) == 0.0
    mixed = kernel_from_channels([[1.0, -2.0], [-1.0, -3.0], [0.0, 0.5]])
    assert float(ei.mixed_sign_penalty(mixed)) == pytest.approx(1.0)  # min(1, 2)
    assert float(ei.mixed_sign_penalty(mixed, smooth=True)) == pytest.approx(2.0 / 3.0, rel=1e-6)
    # a pytree of kernels sums over leaves
    assert float(ei.mixed_sign_penalty({"a": mixed, "b": [mixed, pure]})) == pytest.approx(2.0)


def test_mixed_sign_penalty_is_positive_for_random_kernels():
    w = jax.random.normal(jax.random.key(0), (3, 3, 8, 8))
    assert float(ei.mixed_sign_penalty(w)) > 0.0


def test_dale_signs_and_fixed_assignment():
    np.testing.assert_array_equal(ei.dale_signs(5, 0.8), [1, 1, 1, 1, -1])
    np.testing.assert_array_equal(ei.dale_signs(4, 0.0), [-1, -1, -1, -1])
    w = kernel_from_channels([[1.0, -2.0], [-1.0, 4.0]])  # f_E = 0.5: channel 0 E, channel 1 I
    # E channel 0 pays its negative mass 2; I channel 1 pays its positive mass 4
    assert float(ei.fixed_assignment_penalty(w, excitatory_fraction=0.5)) == pytest.approx(6.0)


def test_two_population_penalty():
    w_e = jnp.array([1.0, -0.5, 2.0]).reshape(1, 1, 1, 3)
    w_i = jnp.array([-1.0, 0.25, -2.0]).reshape(1, 1, 1, 3)
    assert float(ei.two_population_penalty(w_e, w_i)) == pytest.approx(0.75)
    params = {"layer": {"w_lat": jnp.abs(w_e), "w_inh": -jnp.abs(w_i)}}
    assert float(ei.ei_penalty(params, mode="two_population")) == 0.0


def test_parametrisation_keeps_every_sign_through_100_optimiser_steps():
    signs = ei.dale_signs(6, 0.5)
    raw = jax.random.normal(jax.random.key(1), (3, 3, 6, 6))
    target = jax.random.normal(jax.random.key(2), (3, 3, 6, 6)) * 3.0  # pulls toward both signs
    opt = optax.adam(0.1)
    state = opt.init(raw)

    @jax.jit
    def step(raw, state):
        grads = jax.grad(lambda v: jnp.sum((ei.parametrise(v, signs) - target) ** 2))(raw)
        updates, state = opt.update(grads, state, raw)
        return optax.apply_updates(raw, updates), state

    expected = jnp.broadcast_to(signs.reshape(1, 1, 6, 1), raw.shape)
    for _ in range(100):
        raw, state = step(raw, state)
        np.testing.assert_array_equal(jnp.sign(ei.parametrise(raw, signs)), expected)
    assert float(ei.mixed_sign_penalty(ei.parametrise(raw, signs))) == 0.0


def test_inverse_parametrise_round_trips_magnitudes():
    w = jax.random.normal(jax.random.key(3), (3, 3, 4, 4))
    signs = jnp.sign(w[0, 0, :, 0])
    v = ei.inverse_parametrise(w)
    np.testing.assert_allclose(jax.nn.softplus(v), jnp.abs(w), rtol=1e-4, atol=1e-6)
    assert ei.parametrise(v, signs).shape == w.shape


@pytest.mark.parametrize("excitatory_fraction", [None, 0.75])
def test_projection_leaves_no_wrong_sign_weight(excitatory_fraction):
    key = jax.random.key(4)
    params = {
        "conv": {
            "w_lat": jax.random.normal(key, (3, 3, 4, 4)),
            "w_ff": jax.random.normal(key, (3, 3, 3, 4)),
            "w_inh": jax.random.normal(key, (5, 5, 4, 4)),
        }
    }
    opt = optax.chain(optax.sgd(0.1), ei.project_dale(excitatory_fraction=excitatory_fraction))
    state = opt.init(params)
    for i in range(5):
        step_key = jax.random.key(10 + i)
        grads = jax.tree_util.tree_map(lambda p, k=step_key: jax.random.normal(k, p.shape), params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        p, n = ei.channel_mass(params["conv"]["w_lat"])
        assert np.all(np.minimum(np.asarray(p), np.asarray(n)) == 0.0), "a channel kept both signs"
        assert float(ei.mixed_sign_penalty(params["conv"]["w_lat"])) == 0.0
        assert float(jnp.max(params["conv"]["w_inh"])) <= 0.0
    if excitatory_fraction is not None:
        d = ei.diagnose(params["conv"]["w_lat"])
        np.testing.assert_array_equal(np.asarray(d.excitatory), [True, True, True, False])
    # non-lateral leaves are untouched by the projection: they have both signs
    assert float(jnp.min(params["conv"]["w_ff"])) < 0 < float(jnp.max(params["conv"]["w_ff"]))


def test_projection_needs_params():
    opt = ei.project_dale()
    with pytest.raises(ValueError, match="project_dale needs params"):
        opt.update({"w_lat": jnp.zeros((1, 1, 2, 2))}, opt.init(None))


def test_diagnostics_on_a_hand_built_kernel():
    # channel 0: P=3, N=1 → purity 0.5, E; channel 1: P=0, N=2 → purity 1, I; channel 2: P=2, N=2 → 0, not E
    w = kernel_from_channels([[2.0, 1.0, -1.0], [0.0, -2.0, 0.0], [1.0, -2.0, 1.0]])
    d = ei.diagnose(w)
    np.testing.assert_allclose(d.purity, [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(d.excitatory, [True, False, False])
    assert float(d.fraction_excitatory) == pytest.approx(1.0 / 3.0)
    assert float(d.balance) == pytest.approx(5.0 / 5.0)
    summary = ei.diagnostics({"layer": {"w_lat": w}})
    (entry,) = summary.values()
    assert float(entry["purity_mean"]) == pytest.approx(0.5)
    assert float(entry["purity_min"]) == 0.0


def test_lateral_kernels_finds_kernels_by_name_and_applies_the_parametrisation():
    v = jnp.zeros((3, 3, 4, 4))
    found = ei.lateral_kernels(
        {"a": {"v_lat": v, "w_ff": jnp.ones((3, 3, 3, 4))}, "b": {"w_lat": jnp.ones((3, 3, 2, 2))}},
        excitatory_fraction=0.5,
    )
    assert sorted(found) == ["['a']['v_lat']", "['b']['w_lat']"]
    chex.assert_trees_all_close(found["['a']['v_lat']"][0, 0, :, 0], jnp.array([1.0, 1.0, -1.0, -1.0]) * jnp.log(2.0))


@pytest.mark.parametrize("value", [-0.1, 1.5, "half"])
def test_fraction_outside_unit_interval(value):
    with pytest.raises(ValueError, match=f"excitatory_fraction={value!r}"):
        ei.dale_signs(4, value)


def test_unknown_mode():
    with pytest.raises(ValueError, match="ei_mode='dale' is not supported; choose one of 'none', 'mixed_sign'"):
        ei.ei_penalty({}, mode="dale")
    with pytest.raises(ValueError, match="needs inhibitory kernels w_inh"):
        ei.ei_penalty({"w_lat": jnp.ones((1, 1, 2, 2))}, mode="two_population")
