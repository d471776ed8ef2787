"""The fast CPU paths against their references: Winograd convolution (lateral_jax/winograd.py), the
``conv_algorithm`` switch of the core, and the elementwise-gradient max-pool (lateral_jax/pooling.py).

Tolerances (stated in the README): float32 Winograd F(2×2, 3×3) vs ``lax.conv_general_dilated``:
max |Δ| ≤ 1e-5 · max |reference| for values and gradients; F(4×4, 3×3): 1e-4; float64: 1e-10;
bfloat16 Winograd vs the float32 reference: 5e-2.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lateral_jax.core import models, pooling, recurrence
from lateral_jax.core.recurrence import LateralConfig, LoopOptions
from lateral_jax.kernels import winograd


def direct(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def loss(conv):
    """A non-linear loss, so the gradient needs the forward values too."""
    return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) * jnp.arange(w.shape[-1], dtype=x.dtype).reshape(1, 1, 1, -1))


SHAPES = [  # (batch, height, width, c_in, c_out)
    (3, 7, 5, 3, 6),  # odd sizes are padded and cropped; a batch of 3 is chunked by a divisor
    (1, 1, 1, 2, 2),
    (5, 6, 10, 16, 8),
]


@pytest.mark.parametrize(
    "shape,tile,tol",
    [(shape, 2, 1e-5) for shape in SHAPES] + [(SHAPES[0], 4, 1e-4)],
    ids=str,
)
def test_winograd_matches_direct_convolution_values_and_gradients(key, shape, tile, tol):
    b, h, w, ci, co = shape
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (b, h, w, ci))
    k = jax.random.normal(kw, (3, 3, ci, co)) / np.sqrt(9 * ci)
    conv = jax.jit(lambda x, w: winograd.conv3x3(x, w, tile=tile))
    assert conv(x, k).shape == (b, h, w, co)
    assert rel_err(conv(x, k), direct(x, k)) < tol
    ours = jax.grad(loss(conv), argnums=(0, 1))(x, k)
    ref = jax.grad(loss(direct), argnums=(0, 1))(x, k)
    for got, want in zip(ours, ref, strict=True):
        assert got.shape == want.shape
        assert rel_err(got, want) < tol


def test_winograd_float64_is_exact_to_rounding(key):
    with jax.enable_x64(True):
        x = jax.random.normal(key, (2, 6, 6, 5), jnp.float64)
        k = jax.random.normal(jax.random.key(1), (3, 3, 5, 3), jnp.float64)
        assert rel_err(winograd.conv3x3(x, k), direct(x, k)) < 1e-12
        gx, gk = jax.grad(loss(winograd.conv3x3), argnums=(0, 1))(x, k)
        rx, rk = jax.grad(loss(direct), argnums=(0, 1))(x, k)
        assert rel_err(gx, rx) < 1e-10 and rel_err(gk, rk) < 1e-10


def test_winograd_bfloat16_is_close_to_the_float32_reference(key):
    x = jax.random.normal(key, (2, 8, 8, 16))
    k = jax.random.normal(jax.random.key(1), (3, 3, 16, 8)) / 12.0
    out = winograd.conv3x3(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    assert rel_err(out.astype(jnp.float32), direct(x, k)) < 5e-2


def test_winograd_vmaps_over_kernels_and_chunks_in_cache_sized_pieces(key):
    x = jax.random.normal(key, (4, 6, 6, 3))
    ks = jax.random.normal(jax.random.key(1), (5, 3, 3, 3, 2))
    batched = jax.vmap(winograd.conv3x3, in_axes=(None, 0))(x, ks)
    assert rel_err(batched, jnp.stack([direct(x, k) for k in ks])) < 1e-5
    # chunk = the largest divisor of the batch whose 4·h·w·c transformed values fit the budget
    assert winograd.chunk_size(128, 32, 32, 64) == 8
    assert winograd.chunk_size(128, 8, 8, 256) == 32
    assert winograd.chunk_size(7, 32, 32, 64) == 7 or 7 % winograd.chunk_size(7, 32, 32, 64) == 0
    assert winograd.chunk_size(12, 4, 4, 4, elements=4 * 4 * 4 * 4 * 5) == 4  # 5 fit, 4 divides 12
    assert winograd.chunk_size(3, 100, 100, 100) == 1


@pytest.mark.parametrize("m", winograd.TILES)
def test_winograd_transforms_are_adjoint_pairs(key, m):
    """⟨T(a), b⟩ = ⟨a, Tᵀ(b)⟩ for the output and kernel transforms used by the hand-written VJP."""
    a = jax.random.normal(key, ((m + 2) ** 2, 2 * 3 * 2, 5))
    b = jax.random.normal(jax.random.key(1), (2, 3 * m, 2 * m, 5))
    out, out_t = jax.jit(
        lambda a, b: (winograd.transform_output(a, 2, 3 * m, 2 * m, m), winograd.transform_output_transpose(b, m))
    )(a, b)
    np.testing.assert_allclose(jnp.vdot(out, b), jnp.vdot(a, out_t), rtol=1e-4)
    g = jax.random.normal(key, (3, 3, 2, 4))
    u = jax.random.normal(jax.random.key(2), ((m + 2) ** 2, 2, 4))
    np.testing.assert_allclose(
        jnp.vdot(winograd.transform_kernel(g, m), u), jnp.vdot(g, winograd.transform_kernel_transpose(u, m)), rtol=1e-4
    )


def test_winograd_rejects_bad_input_with_a_fix():
    with pytest.raises(ValueError, match=r"\[3, 3, C_in, C_out\] kernel.*conv_algorithm='xla'"):
        winograd.conv3x3(jnp.zeros((1, 4, 4, 2)), jnp.zeros((5, 5, 2, 2)))
    with pytest.raises(ValueError, match=r"\[3, 3, C_in, C_out\]"):
        winograd.conv3x3(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"tile=3 is not supported; choose one of \(2, 4\)"):
        winograd.conv3x3(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), tile=3)


def test_winograd_tile_is_4_on_maps_of_32_and_more_or_256_channels(key):
    assert recurrence.winograd_tile(32, 32) == 4 and recurrence.winograd_tile(64, 48) == 4
    assert recurrence.winograd_tile(16, 16) == 2 and recurrence.winograd_tile(32, 16) == 2
    assert recurrence.winograd_tile(34, 34) == 2  # not a multiple of 4: no padded F(4×4) tiles
    assert recurrence.winograd_tile(8, 8, 256, 256) == 4 and recurrence.winograd_tile(16, 16, 512, 256) == 4
    assert recurrence.winograd_tile(8, 8, 128, 256) == 2 and recurrence.winograd_tile(16, 16, 128, 128) == 2
    assert recurrence.winograd_tile(6, 6, 256, 256) == 2
    x = jax.random.normal(key, (1, 32, 32, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 2)) / 5.0
    f4 = jax.jit(lambda x, w: recurrence.conv(x, w, algorithm="winograd"))
    assert rel_err(f4(x, w), direct(x, w)) < 1e-4
    tiled = jax.jit(winograd.conv3x3, static_argnames="tile")
    chex.assert_trees_all_equal(f4(x, w), tiled(x, w, tile=4))  # the F(4×4) path was taken ...
    assert not np.array_equal(f4(x, w), tiled(x, w, tile=2))  # ... which rounds differently from F(2×2)
    x, w = jax.random.normal(key, (2, 8, 8, 256)), jax.random.normal(key, (3, 3, 256, 256)) / 48.0
    assert rel_err(f4(x, w), direct(x, w)) < 1e-4
    chex.assert_trees_all_equal(f4(x, w), tiled(x, w, tile=4))  # wide layers take F(4×4) on 8×8 maps


def test_conv_algorithm_choice(key):
    x32 = jnp.zeros((128, 32, 32, 64))  # the reference workload's first lateral convolution
    w3, w5 = jnp.zeros((3, 3, 64, 64)), jnp.zeros((5, 5, 64, 64))
    assert jax.default_backend() == "cpu"
    assert recurrence.use_winograd(x32, w3, "auto")
    assert not recurrence.use_winograd(x32, w3, "xla")
    assert not recurrence.use_winograd(x32.astype(jnp.bfloat16), w3, "auto")  # bf16 → XLA
    assert not recurrence.use_winograd(x32, w5, "auto")  # 5×5 → XLA
    assert not recurrence.use_winograd(jnp.zeros((4096, 32, 32, 3)), jnp.zeros((3, 3, 3, 64)), "auto")  # thin
    assert not recurrence.use_winograd(jnp.zeros((8, 16, 16, 16)), jnp.zeros((3, 3, 16, 16)), "auto")  # small
    assert not recurrence.use_winograd(x32, jnp.zeros((3, 3, 1, 64)), "auto", depthwise=True)
    assert recurrence.use_winograd(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2)), "winograd")
    with pytest.raises(ValueError, match="needs full-mixing 3x3 kernels; got a 3x3 depthwise kernel"):
        recurrence.use_winograd(x32, jnp.zeros((3, 3, 1, 64)), "winograd", depthwise=True)
    with pytest.raises(ValueError, match="conv_algorithm"):
        LateralConfig(conv_algorithm="fft")


@pytest.mark.parametrize("grad_mode", ["remat"])  # √T checkpoints around Winograd's hand-written VJP
def test_lccnn_with_winograd_equals_the_xla_reference(key, grad_mode):
    """The model-level fast path: logits, loss gradient and a jitted train step that traces once."""
    loop = LoopOptions(grad_mode=grad_mode, truncate_steps=2 if grad_mode == "truncated" else None)
    kwargs = {"widths": (4, 8), "num_classes": 3, "num_steps": 2, "loop": loop}
    x = jax.random.normal(key, (2, 6, 6, 3))
    ref = models.LCCNN(lateral=LateralConfig.paper(lateral_init_scale=1.0, conv_algorithm="xla"), **kwargs)
    fast = models.LCCNN(lateral=LateralConfig.paper(lateral_init_scale=1.0, conv_algorithm="winograd"), **kwargs)
    params = ref.init(jax.random.key(1), x)["params"]

    def loss_fn(model):
        return jax.jit(lambda p: jnp.mean(model.apply({"params": p}, x).logits ** 2))

    assert rel_err(fast.apply({"params": params}, x).logits, ref.apply({"params": params}, x).logits) < 1e-5
    g_fast, g_ref = jax.grad(loss_fn(fast))(params), jax.grad(loss_fn(ref))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_ref), strict=True):
        assert rel_err(a, b) < 1e-4

    def total(p):
        return jnp.sum(fast.apply({"params": p}, x).logits)

    chex.clear_trace_counter()  # the counter is per function definition, shared by the parametrisations
    step = jax.jit(jax.grad(chex.assert_max_traces(total, n=1)))
    step(params)
    step(jax.tree_util.tree_map(lambda p: p + 1.0, params))  # same shapes: no retrace


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 5, 7, 2), (3, 4, 4, 1)], ids=str)
def test_max_pool_equals_flax_in_value_and_gradient(key, shape):
    x = jnp.round(jax.random.normal(key, shape) * 2) / 2  # many ties, incl. all-equal windows
    x = x.at[0, :2, :2].set(1.0)
    g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

    def ref_pool(x):
        return nn.max_pool(x, (2, 2), strides=(2, 2))

    np.testing.assert_array_equal(pooling.max_pool(x), ref_pool(x))
    ours = jax.grad(lambda x: jnp.sum(pooling.max_pool(x) * g))(x)
    ref = jax.grad(lambda x: jnp.sum(ref_pool(x) * g))(x)
    np.testing.assert_array_equal(ours, ref)  # the first maximum of each window gets the gradient
    assert float(jnp.sum(ours != 0)) <= g.size


def test_max_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="NHWC batch; got shape \\(4, 4\\)"):
        pooling.max_pool(jnp.zeros((4, 4)))
    with pytest.raises(ValueError, match="size=0 must be a positive int"):
        pooling.max_pool(jnp.zeros((1, 4, 4, 1)), 0)


def test_auto_unroll_policy_follows_the_convolution_path():
    """XLA convolutions in a CPU loop are fully unrolled (jax#12868); Winograd loops roll for T > 16."""
    assert recurrence.default_scan_unroll(32) is True  # the tests run on CPU
    assert recurrence.default_scan_unroll(33) == 1  # long loops roll on CPU too: compile time stays bounded
    assert recurrence.default_scan_unroll(16, xla_conv_in_loop=False) is True
    assert recurrence.default_scan_unroll(64, xla_conv_in_loop=False) == 1


@pytest.mark.parametrize("tile", winograd.TILES)
def test_winograd_forward_mode_and_hessian_vector_products_equal_the_direct_convolution(tile):
    """float64: jvp, jacfwd and both HVP orders of the custom JVP equal those of lax.conv."""
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(1), (1, 8, 8, 2), jnp.float64)
        w = jax.random.normal(jax.random.key(2), (3, 3, 2, 3), jnp.float64)
        dx, dw = (
            jax.random.normal(jax.random.key(3), x.shape, x.dtype),
            jax.random.normal(jax.random.key(4), w.shape, w.dtype),
        )

        def ours(x, w):
            return jnp.tanh(winograd.conv3x3(x, w, tile=tile))

        def ref(x, w):
            return jnp.tanh(
                jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            )

        np.testing.assert_allclose(jax.jvp(ours, (x, w), (dx, dw))[1], jax.jvp(ref, (x, w), (dx, dw))[1], atol=1e-11)
        hvp = {
            name: jax.jvp(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 3), argnums=(0, 1)), (x, w), (dx, dw))[1]
            for name, f in (("ours", ours), ("ref", ref))
        }
        for a, b in zip(hvp["ours"], hvp["ref"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
        small = x[:1, :4, :4]
        np.testing.assert_allclose(
            jax.jacfwd(ours, argnums=1)(small, w), jax.jacrev(ours, argnums=1)(small, w), atol=1e-12
        )
