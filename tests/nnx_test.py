"""The Flax NNX twins (lateral_jax/core/nnx_models.py): the same parameters give the same logits,
states, residuals, E/I penalty and gradients as the Linen models; an nnx.Optimizer loop trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lateral_jax import nnx as lnnx
from lateral_jax.core import ei, models, nnx_models
from lateral_jax.core.config import LateralConfig, LoopOptions

SMALL = LateralConfig.stable(num_groups=2)
CASES = {
    "fcnn": ("fcnn", {}),
    "lccnn": ("lccnn", {}),
    "lceicnn": ("lceicnn", {}),
    "unshared": ("unshared", {}),
    "lccnn-parametrise": ("lccnn", {"ei_mode": "parametrise"}),
    "lccnn-two-population": ("lccnn", {"lateral": LateralConfig.stable(num_groups=2, inhibitory_size=5)}),
    "lccnn-implicit": ("lccnn", {"loop": LoopOptions(grad_mode="implicit")}),
    "lateral_resnet": ("lateral_resnet", {"stage_sizes": (1, 1), "lateral_stages": (1,), "num_groups": 2}),
}


def _twins(case):
    kind, extra = CASES[case]
    kw = {"widths": (4, 8), "num_classes": 3, "lateral": SMALL, **extra}
    if kind != "fcnn":
        kw["num_steps"] = 2
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
    linen = models.MODELS[kind](**kw)
    params = linen.init(jax.random.key(0), x)["params"]
    twin = lnnx.MODELS[kind](3, **kw, rngs=nnx.Rngs(7))
    assert jax.tree.structure(nnx_models.params_dict(twin)) == jax.tree.structure(params)
    nnx_models.load_params(twin, params)
    return linen, params, twin, x


@pytest.mark.parametrize("case", list(CASES))
def test_same_params_give_the_same_outputs_and_gradients(case):
    linen, params, twin, x = _twins(case)
    record = "loop" not in CASES[case][1]  # implicit mode keeps no per-loop states
    want, got = linen.apply({"params": params}, x, record=record), twin(x, record=record)
    np.testing.assert_array_equal(got.logits, want.logits)
    assert sorted(got.states) == sorted(want.states) and sorted(got.residuals) == sorted(want.residuals)
    for name in want.states:
        np.testing.assert_array_equal(got.states[name], want.states[name])
    np.testing.assert_array_equal(twin.ei_penalty(), linen.ei_penalty(params))

    def linen_loss(p):
        return jnp.sum(jax.nn.log_softmax(linen.apply({"params": p}, x).logits)[:, 0]) + linen.ei_penalty(p)

    def nnx_loss(model):
        return jnp.sum(jax.nn.log_softmax(model(x).logits)[:, 0]) + model.ei_penalty()

    want_grads = jax.grad(linen_loss)(params)
    got_grads = nnx.to_pure_dict(nnx.grad(nnx_loss)(twin))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got_grads, want_grads)


def test_ei_diagnostics_read_the_nnx_parameters():
    _, params, twin, _ = _twins("lceicnn")
    got = ei.diagnostics(nnx_models.params_dict(twin))
    want = ei.diagnostics(params)
    assert sorted(got) == sorted(want) and got
    for name in want:
        for k in want[name]:
            np.testing.assert_array_equal(got[name][k], want[name][k])


def test_nnx_optimizer_trains_and_wrong_input_is_refused():
    model = nnx_models.LCEICNN(1, widths=(4, 8), num_classes=2, num_steps=2, lateral=SMALL, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 16)
    images = (rng.standard_normal((16, 8, 8, 1)) + 2.0 * labels[:, None, None, None]).astype(np.float32)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + model.ei_penalty()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, images, labels)) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    with pytest.raises(ValueError, match="channels"):
        model(jnp.zeros((1, 8, 8, 3)))


def test_nnx_layers_give_their_params_and_spectral_radii_as_the_linen_analysis():
    from lateral_jax.core import dynamics, models, nnx_models
    from lateral_jax.core.config import LateralConfig

    cfg = LateralConfig.stable(num_groups=2, lateral_init_scale=0.5)
    linen = models.LCCNN(widths=(4,), num_steps=2, lateral=cfg)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = linen.init(jax.random.key(1), x)
    want = dynamics.layer_spectral_radii(linen, variables, x, num_iters=20)["lateral_0"]
    twin = nnx_models.LCCNN(in_features=3, widths=(4,), num_steps=2, lateral=cfg, rngs=nnx.Rngs(0))
    nnx_models.load_params(twin, variables["params"])
    layer = twin.lateral_0 if hasattr(twin, "lateral_0") else twin.layers[0]
    np.testing.assert_allclose(layer.spectral_radius(x, num_iters=20), want, rtol=1e-4)
    recurrence_layer = nnx_models.LateralRecurrence(4, num_steps=2, config=cfg, rngs=nnx.Rngs(0))
    drive = jax.random.normal(jax.random.key(2), (2, 8, 8, 4))
    p = recurrence_layer.layer_params()
    assert p.w_ff is None and p.w_lat.shape == (3, 3, 4, 4)
    state = recurrence_layer(drive).final
    np.testing.assert_allclose(
        recurrence_layer.spectral_radius(drive, num_iters=20),
        dynamics.spectral_radius(p, drive, state, config=cfg, num_iters=20),
        rtol=1e-6,
    )


def test_the_two_flax_faces_name_the_same_layers_and_models():
    """``lateral_jax.linen`` and ``lateral_jax.nnx`` hold the same layer and model names, each the
    class of its Flax API; the top-level names are the Linen ones."""
    import flax.linen
    from flax import nnx as flax_nnx

    import lateral_jax
    from lateral_jax import linen, nnx

    shared = set(linen.__all__) - {"ModelOutput"}
    assert shared <= set(nnx.__all__)
    for name in shared:
        assert issubclass(getattr(linen, name), flax.linen.Module), name
        assert issubclass(getattr(nnx, name), flax_nnx.Module), name
    assert lateral_jax.LateralConv is linen.LateralConv and lateral_jax.LCCNN is linen.LCCNN


def test_every_nnx_class_documents_each_constructor_argument():
    """Each NNX layer and model of ``lateral_jax.nnx`` has an ``Args:`` section naming every
    argument of its ``__init__`` (a subclass may inherit its parent's)."""
    import inspect

    from flax import nnx as flax_nnx

    from lateral_jax import nnx

    undocumented = {}
    for name in nnx.__all__:
        cls = getattr(nnx, name)
        if not (inspect.isclass(cls) and issubclass(cls, flax_nnx.Module)):
            continue
        doc = next(c.__doc__ for c in cls.__mro__ if c.__doc__ and "Args:" in c.__doc__)
        args = doc.split("Args:", 1)[1]
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        missing = [p for p in params if p not in args]
        if missing:
            undocumented[name] = missing
    assert undocumented == {}
