# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # Tutorial: a lateral layer in your own Flax model
#
# A jupytext script (``jupytext --to notebook docs/tutorial.py`` makes it a notebook; ``python
# docs/tutorial.py`` runs it).  It puts a lateral layer into a small Linen CNN, trains it with
# optax on the library's synthetic contour task for T = 0 and T = 4 loops, differentiates the loss
# with respect to T-dependent quantities in forward and reverse mode, and looks at the states over
# the loops and at the loop's spectral radius.  ``LATERAL_JAX_TUTORIAL_STEPS`` sets the training
# steps (the tests run it with a few).

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lateral_jax.core import dynamics, layers, recurrence
from lateral_jax.core.config import LateralConfig
from lateral_jax.training.data import synthetic

STEPS = int(os.environ.get("LATERAL_JAX_TUTORIAL_STEPS", "150"))
data = synthetic.contour_images(512, seed=0, spec=synthetic.ContourSpec(image_size=32))
images, labels = jnp.asarray(data["image"]), jnp.asarray(data["label"])
print(images.shape, labels.shape)


# %% [markdown]
# ## 1. Your model, with one layer swapped
#
# ``MyCNN`` is an ordinary Linen model; its first convolution is replaced by ``layers.LateralConv``,
# a convolution whose output runs ``num_steps`` lateral loops
# ``a(t) = f(N(d + W_lat * a(t-1)))``.  With ``num_steps=0`` it is the plain convolution + norm +
# ReLU, so the same class gives the feed-forward baseline.


# %%
class MyCNN(nn.Module):
    num_steps: int

    @nn.compact
    def __call__(self, x):
        out = layers.LateralConv(16, num_steps=self.num_steps, config=LateralConfig.stable(num_groups=4))(x)
        h = nn.max_pool(out.final, (2, 2), strides=(2, 2))
        h = nn.relu(nn.Conv(32, (3, 3))(h))
        return nn.Dense(2)(h.mean(axis=(1, 2)))


def loss_fn(params, model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": params}, x), y).mean()


def train(num_steps, steps=STEPS, batch=64):
    model = MyCNN(num_steps)
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, model, x, y)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for i in range(steps):
        start = (i * batch) % (len(images) - batch)
        params, opt_state, loss = step(params, opt_state, images[start : start + batch], labels[start : start + batch])
    accuracy = jnp.mean(jnp.argmax(model.apply({"params": params}, images), -1) == labels)
    return model, params, float(loss), float(accuracy)


# %% [markdown]
# ## 2. T = 0 against T = 4

# %%
results = {t: train(t) for t in (0, 4)}
for t, (_, _, loss, accuracy) in results.items():
    print(f"T = {t}: final training loss {loss:.3f}, accuracy on the 512 images {accuracy:.3f}")
model, params, _, _ = results[4]

# %% [markdown]
# ## 3. Derivatives with respect to T-dependent quantities
#
# The loss depends on the lateral kernel only through the loops.  Reverse mode gives its gradient;
# forward mode (``jax.jvp``) gives the directional derivative along any direction in one pass, and
# the two agree.  A Hessian-vector product composes both.

# %%
x, y = images[:32], labels[:32]
w_lat = params["LateralConv_0"]["w_lat"]


def loss_of_w_lat(w):
    p = {**params, "LateralConv_0": {**params["LateralConv_0"], "w_lat": w}}
    return loss_fn(p, model, x, y)


direction = jax.random.normal(jax.random.key(1), w_lat.shape)
_, forward = jax.jvp(loss_of_w_lat, (w_lat,), (direction,))
reverse = jnp.vdot(jax.grad(loss_of_w_lat)(w_lat), direction)
hvp = jax.jvp(jax.grad(loss_of_w_lat), (w_lat,), (direction,))[1]
print(f"dL/dW_lat · v: forward {float(forward):.5f}, reverse {float(reverse):.5f}")
print(f"|H v| = {float(jnp.linalg.norm(hvp)):.4f}")
assert np.isclose(forward, reverse, rtol=1e-3, atol=1e-6)

# %% [markdown]
# ## 4. States over the loops and the loop's spectral radius
#
# ``record_states`` style: the pure core returns every loop's state.  ``dynamics.spectral_radius``
# power-iterates the Jacobian of one loop at ``a(T)``: below 1, a perturbation of the final state
# shrinks loop by loop.

# %%
layer = layers.module_params(params["LateralConv_0"])
config = LateralConfig.stable(num_groups=4)
out = recurrence.unroll(layer, x, num_steps=4, config=config)
changes = [float(recurrence.relative_change(out.states[t + 1], out.states[t])) for t in range(4)]
print("relative change per loop:", " ".join(f"{c:.4f}" for c in changes))
drive = recurrence.afferent_drive(layer, x, config)
rho = dynamics.spectral_radius(layer, drive, out.final, config=config)
print(f"spectral radius of the loop Jacobian at a(T): median {float(jnp.median(rho)):.3f} over {len(rho)} images")
