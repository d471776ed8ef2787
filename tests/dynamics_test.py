"""The loop's analytic tools (lateral_jax/core/dynamics.py) against dense Jacobians, SVDs,
finite differences and the implicit solver."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lateral_jax.core import dynamics, models, recurrence
from lateral_jax.core.config import LateralConfig
from lateral_jax.core.layers import module_params
from lateral_jax.core.params import init_params

CONFIGS = {
    "group-norm, strong lateral": LateralConfig.stable(num_groups=2, lateral_init_scale=1.0, conv_algorithm="xla"),
    "no norm, leaky": LateralConfig.paper(lateral_init_scale=1.5, leak=0.5, conv_algorithm="xla"),
}


def _layer(config, batch=2):
    params = init_params(jax.random.key(0), in_channels=2, out_channels=4, config=config)
    x = jax.random.normal(jax.random.key(1), (batch, 5, 5, 2))
    state = recurrence.unroll(params, x, num_steps=4, config=config, return_states=False).final
    return params, recurrence.afferent_drive(params, x, config), state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matrix_free_tools_equal_the_dense_jacobian(name):
    config = CONFIGS[name]
    params, drive, state = _layer(config)
    jac = np.asarray(dynamics.step_jacobian(params, drive, state, config=config), np.float64)  # [B, n, n]
    v = jax.random.normal(jax.random.key(2), state.shape)
    flat_v = np.asarray(v, np.float64).reshape(len(jac), -1)
    jv = np.asarray(dynamics.step_jvp(params, drive, state, v, config=config)).reshape(len(jac), -1)
    vj = np.asarray(dynamics.step_vjp(params, drive, state, v, config=config)).reshape(len(jac), -1)
    np.testing.assert_allclose(jv, np.einsum("bij,bj->bi", jac, flat_v), atol=1e-5)
    np.testing.assert_allclose(vj, np.einsum("bji,bj->bi", jac, flat_v), atol=1e-5)
    rho = np.abs(np.linalg.eigvals(jac)).max(-1)
    sigma = np.linalg.svd(jac, compute_uv=False).max(-1)
    estimate = dynamics.spectral_radius(params, drive, state, config=config, num_iters=100)
    np.testing.assert_allclose(estimate, rho, rtol=0.03)
    np.testing.assert_allclose(
        dynamics.spectral_norm(params, drive, state, config=config, num_iters=60), sigma, rtol=1e-2
    )
    assert np.all(np.asarray(estimate) <= sigma * 1.001)  # ρ ≤ ‖J‖₂


def test_contraction_trusts_a_converged_contracting_fixed_point_and_not_an_expanding_one():
    calm = LateralConfig.stable(num_groups=2, conv_algorithm="xla")
    params, drive, _ = _layer(calm)
    a_star, _ = recurrence.implicit.fixed_point(params, drive, config=calm, tol=1e-6, max_steps=200)
    report = dynamics.contraction(params, drive, a_star, config=calm)
    assert np.all(report.trustworthy) and np.all(np.asarray(report.spectral_radius) < 0.98)
    assert np.all(np.asarray(report.residual) < 1e-4)
    wild = LateralConfig.paper(lateral_init_scale=4.0, conv_algorithm="xla")
    params, drive, state = _layer(wild)
    report = dynamics.contraction(params, drive, state, config=wild)
    assert not np.any(report.trustworthy) and np.all(np.asarray(report.spectral_radius) > 1.0)


def test_sensitivity_to_the_lateral_kernel_equals_finite_differences():
    config = LateralConfig.stable(num_groups=2, activation="tanh", conv_algorithm="xla")  # smooth: no ReLU kinks
    params, _, _ = _layer(config)
    x = jax.random.normal(jax.random.key(1), (2, 5, 5, 2))
    direction = jax.tree.map(jnp.zeros_like, params)._replace(
        w_lat=jax.random.normal(jax.random.key(4), params.w_lat.shape)
    )

    def run(p, x):
        return recurrence.unroll(p, x, num_steps=4, config=config, return_states=False).final

    y, dy = dynamics.sensitivity(params, x, direction, run=run)
    eps = 1e-2
    fd = (
        run(params._replace(w_lat=params.w_lat + eps * direction.w_lat), x)
        - run(params._replace(w_lat=params.w_lat - eps * direction.w_lat), x)
    ) / (2 * eps)
    # the primal of the JVP is the layer's output up to float32 rounding (1e-6 of its scale: an entry
    # near zero differs by 7e-9, 2e-6 of itself, since GroupNorm sums over (H, W) first)
    want = run(params, x)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(dy, fd, atol=2e-2 * float(jnp.max(jnp.abs(fd))))


def test_layer_spectral_radii_of_models_equal_the_per_layer_estimate():
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    model = models.LCCNN(widths=(8, 8), num_steps=2, lateral=CONFIGS["group-norm, strong lateral"])
    variables = model.init(jax.random.key(0), x)
    radii = jax.jit(lambda v, x: dynamics.layer_spectral_radii(model, v, x, num_iters=10))(variables, x)
    assert sorted(radii) == ["lateral_0", "lateral_1"] and radii["lateral_0"].shape == (2,)
    params = module_params(variables["params"]["lateral_0"])
    config = model.lateral
    state = recurrence.unroll(params, x, num_steps=2, config=config, return_states=False).final
    direct = dynamics.spectral_radius(
        params, recurrence.afferent_drive(params, x, config), state, config=config, num_iters=10
    )
    np.testing.assert_allclose(radii["lateral_0"], direct, rtol=1e-5)
    resnet = models.LateralResNet(stage_sizes=(1, 1), widths=(8, 8), num_steps=2, lateral_stages=(1,))
    variables = resnet.init(jax.random.key(0), x)
    assert sorted(dynamics.layer_spectral_radii(resnet, variables, x, num_iters=4)) == ["stage1_block0_lateral"]


def test_bad_iteration_counts_are_refused():
    config = CONFIGS["no norm, leaky"]
    params, drive, state = _layer(config)
    with pytest.raises(ValueError, match="num_iters=1 must be an int >= 2"):
        dynamics.spectral_radius(params, drive, state, config=config, num_iters=1)
