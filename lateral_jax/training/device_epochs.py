"""Device-resident epochs: the training split lives on the devices, sharded; no host round-trip
inside an epoch.

The split is cut into one block per device (:func:`device_blocks`: a seeded permutation of the
examples, ``N // D`` per device, the remainder left out), and each device holds only its block:
a 1/D share, not a copy (:func:`put_blocks` builds the global array from the blocks this process's
devices hold, so each process reads only its share).  Each step, every device draws its
``B / D`` examples from its own block, by a seeded per-device permutation per epoch, and gathers
them locally (``jax.shard_map``: no data crosses devices); the global batch is the devices'
batches in mesh order.  :func:`make_device_epoch` runs the same
:func:`lateral_jax.training.train.train_step` as the host-fed loop on those batches, augmented in
JAX; :func:`make_device_eval` evaluates device-resident data.  The run loop
(:func:`lateral_jax.training.run.train_and_evaluate`) uses them when ``RunConfig.device_data`` is set.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lateral_jax.core.sharding import DATA_AXIS, in_mesh
from lateral_jax.training.sharding import batch_sharding, check_batch_size, replicated
from lateral_jax.training.train import eval_step, train_step


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


def device_blocks(num_examples: int, num_devices: int, *, seed: int) -> np.ndarray:
    """``[D, N // D]`` example indices: block ``d`` is what device ``d`` holds (a seeded permutation
    of the examples cut into equal blocks; the last ``N mod D`` of it are left out)."""
    per_device = num_examples // num_devices
    if per_device == 0:
        raise ValueError(f"{num_examples} training examples cannot be shared by {num_devices} devices.")
    order = np.random.default_rng(seed).permutation(num_examples)
    return order[: per_device * num_devices].reshape(num_devices, per_device)


def put_blocks(
    blocks: np.ndarray, load: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], mesh: Mesh
) -> tuple[jax.Array, jax.Array]:
    """``(images, labels)`` as global arrays ``[D * n, ...]`` sharded along the mesh's data axis, device
    ``d`` holding block ``d``.  ``load(indices) -> (images, labels)`` is called once for each block
    of this process's devices only."""
    num_devices, per_device = blocks.shape
    if num_devices != mesh.size:
        raise ValueError(f"{num_devices} blocks for the {mesh.size} devices of the mesh; make one per device.")
    sharding = batch_sharding(mesh)
    loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def block_of(index: tuple) -> tuple[np.ndarray, np.ndarray]:
        start = index[0].start or 0
        if start // per_device not in loaded:
            loaded[start // per_device] = load(blocks[start // per_device])
        return loaded[start // per_device]

    first_images, _ = load(blocks[0][:1])
    total = num_devices * per_device
    images = jax.make_array_from_callback((total, *first_images.shape[1:]), sharding, lambda index: block_of(index)[0])
    labels = jax.make_array_from_callback((total,), sharding, lambda index: block_of(index)[1])
    return images, labels


def epoch_batches(key: jax.Array, num_devices: int, per_device: int, batch_size: int) -> jax.Array:
    """``[steps, batch]`` indices *into each device's block*: entries ``d·b .. (d+1)·b - 1`` of a row
    (``b = batch / D``) are device ``d``'s draw, from its own seeded permutation of its block."""
    local = batch_size // num_devices
    steps = per_device // local
    keys = jax.random.split(key, num_devices)
    draws = jax.vmap(lambda k: jax.random.permutation(k, per_device)[: steps * local].reshape(steps, local))(keys)
    return draws.transpose(1, 0, 2).reshape(steps, batch_size)


def make_device_epoch(
    model: Any,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    batch_size: int,
    augment: bool = True,
    crop_padding: int = 4,
    scan: bool | None = None,
    label_smoothing: float = 0.0,
) -> Callable:
    """``epoch(state, images, labels, key) -> (state, metrics[steps])`` with the training split on the
    devices, ``images`` / ``labels`` sharded along the data axis (:func:`put_blocks`).

    Each step every device gathers its part of the batch from its own block (:func:`epoch_batches`,
    a local gather under ``jax.shard_map``), the batch is augmented in JAX, then the same
    :func:`train_step` as the host-fed loop runs.  With ``scan=True`` the epoch is one jitted
    ``lax.scan`` (nothing returns to the host until the epoch ends); with ``scan=False`` a Python
    loop calls the jitted step, because XLA:CPU runs convolution gradients inside a rolled loop
    pathologically slowly (jax-ml/jax#12868).  ``None`` picks ``scan`` everywhere but on CPU.
    Both give the same result.
    """
    data = batch_sharding(mesh)
    rep = replicated(mesh)
    check_batch_size(batch_size, mesh)
    gather = jax.shard_map(
        lambda im, lb, idx: (im[idx], lb[idx]),
        mesh=mesh,
        in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(P(DATA_AXIS), P(DATA_AXIS)),
    )

    @functools.partial(in_mesh, mesh=mesh)
    def body_step(state, images, labels, idx, key):
        x, y = gather(images, labels, jax.lax.with_sharding_constraint(idx, data))
        if augment:
            x = augment_on_device(key, x, crop_padding=crop_padding)
        batch = {"image": jax.lax.with_sharding_constraint(x, data), "label": y}
        return train_step(state, batch, model=model, tx=tx, label_smoothing=label_smoothing)

    def schedule(images, key):
        perm_key, aug_key = jax.random.split(key)
        blocks = epoch_batches(perm_key, mesh.size, images.shape[0] // mesh.size, batch_size)
        return blocks, jax.random.split(aug_key, blocks.shape[0])

    def epoch_scan(state, images, labels, key):
        blocks, keys = schedule(images, key)
        return jax.lax.scan(lambda s, xs: body_step(s, images, labels, *xs), state, (blocks, keys))

    if scan is None:
        scan = jax.default_backend() != "cpu"
    if scan:
        return jax.jit(epoch_scan, in_shardings=(rep, data, data, rep), out_shardings=(rep, rep), donate_argnums=0)

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
