"""Device-resident epochs: the whole dataset on the device(s), no host round-trip inside an epoch.

:func:`make_device_epoch` runs the same :func:`lateral_jax.training.train.train_step` as the
host-fed loop, on batches gathered by a seeded permutation and augmented in JAX;
:func:`make_device_eval` evaluates device-resident data.  The run loop
(:func:`lateral_jax.training.run.train_and_evaluate`) uses them when ``RunConfig.device_data`` is set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lateral_jax.core.sharding import in_mesh
from lateral_jax.training.train import batch_sharding, eval_step, replicated, train_step


def augment_on_device(key: jax.Array, images: jax.Array, *, crop_padding: int = 4, flip: bool = True) -> jax.Array:
    """Random crop of the zero-padded images and random horizontal flip, per example, in JAX."""
    b, h, w, _ = images.shape
    k_crop, k_flip = jax.random.split(key)
    if crop_padding:
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        offsets = jax.random.randint(k_crop, (b, 2), 0, 2 * p + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
            padded, offsets
        )
    if flip:
        do_flip = jax.random.bernoulli(k_flip, 0.5, (b,))
        images = jnp.where(do_flip[:, None, None, None], images[:, :, ::-1], images)
    return images


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """A seeded permutation cut into ``[steps, batch]`` index blocks (the remainder is dropped)."""
    steps = num_examples // batch_size
    return jax.random.permutation(key, num_examples)[: steps * batch_size].reshape(steps, batch_size)


def make_device_epoch(
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    batch_size: int,
    augment: bool = True,
    crop_padding: int = 4,
    scan: bool | None = None,
) -> Callable:
    """``epoch(state, images, labels, key) -> (state, metrics[steps])`` with the whole dataset on the
    device(s).

    Each step gathers its batch by a seeded permutation, augments it in JAX and constrains it to
    the mesh's data axis, then runs the same :func:`train_step` as the host-fed loop.  With
    ``scan=True`` the epoch is one jitted ``lax.scan`` (nothing returns to the host until the epoch
    ends); with ``scan=False`` a Python loop calls the jitted step, because XLA:CPU runs convolution
    gradients inside a rolled loop pathologically slowly (jax-ml/jax#12868).  ``None`` picks
    ``scan`` everywhere but on CPU.  Both give the same result.
    """
    data = batch_sharding(mesh)
    rep = replicated(mesh)

    @functools.partial(in_mesh, mesh=mesh)
    def body_step(state, images, labels, idx, key):
        x = images[idx]
        if augment:
            x = augment_on_device(key, x, crop_padding=crop_padding)
        batch = {
            "image": jax.lax.with_sharding_constraint(x, data),
            "label": jax.lax.with_sharding_constraint(labels[idx], data),
        }
        return train_step(state, batch, model=model, tx=tx)

    def schedule(images, key):
        perm_key, aug_key = jax.random.split(key)
        blocks = epoch_batches(perm_key, images.shape[0], batch_size)
        return blocks, jax.random.split(aug_key, blocks.shape[0])

    def epoch_scan(state, images, labels, key):
        blocks, keys = schedule(images, key)
        return jax.lax.scan(lambda s, xs: body_step(s, images, labels, *xs), state, (blocks, keys))

    if scan is None:
        scan = jax.default_backend() != "cpu"
    if scan:
        return jax.jit(epoch_scan, in_shardings=(rep, rep, rep, rep), out_shardings=(rep, rep), donate_argnums=0)

    step = jax.jit(body_step, donate_argnums=0)

    def epoch_loop(state, images, labels, key):
        blocks, keys = schedule(images, key)
        history = []
        for i in range(blocks.shape[0]):
            state, metrics = step(state, images, labels, blocks[i], keys[i])
            history.append(metrics)
        return state, jax.tree_util.tree_map(lambda *m: jnp.stack(m), *history)

    return epoch_loop


def make_device_eval(model: Any, mesh: Mesh, *, batch_size: int) -> Callable:
    """``evaluate(params, images, labels) -> accuracy`` over device-resident data (padded batches)."""
    rep = replicated(mesh)

    @functools.partial(in_mesh, mesh=mesh)
    def run(params, images, labels):
        n = images.shape[0]
        steps = -(-n // batch_size)
        pad = steps * batch_size - n
        images = jnp.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
        labels = jnp.pad(labels, (0, pad), constant_values=-1)

        def body(total, i):
            sl = lambda a: jax.lax.dynamic_slice_in_dim(a, i * batch_size, batch_size)  # noqa: E731
            out = eval_step(params, {"image": sl(images), "label": sl(labels)}, model=model)
            return jax.tree_util.tree_map(jnp.add, total, out), None

        zero = {"correct": jnp.zeros((), jnp.int32), "loss_sum": jnp.zeros(()), "count": jnp.zeros((), jnp.int32)}
        total, _ = jax.lax.scan(body, zero, jnp.arange(steps))
        return total["correct"] / jnp.maximum(total["count"], 1), total["loss_sum"] / jnp.maximum(total["count"], 1)

    return jax.jit(run, in_shardings=(rep, rep, rep), out_shardings=(rep, rep))
