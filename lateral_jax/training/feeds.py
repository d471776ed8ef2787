"""Where a run's batches come from: the host (a grain pipeline) or the device (the whole split).

Both feeds have the same interface: :meth:`advance` runs ``steps_per_advance`` train steps and
returns ``(state, metrics)``; :meth:`get_state` / :meth:`set_state` are the data position saved
in a checkpoint.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lateral_jax.training import device_epochs, train
from lateral_jax.training.config import RunConfig
from lateral_jax.training.data import pipeline
from lateral_jax.training.datasets import Data
from lateral_jax.training.sharding import shard_batch


def augmentation_of(config: RunConfig, input_shape: tuple[int, ...]):
    """The host pipeline's training augmentation of ``config.data`` (``None`` without ``augment``)."""
    d = config.data
    if not d.augment:
        return None
    if d.crop == "random_resized":
        return pipeline.RandomResizedCrop(size=input_shape[0])
    return pipeline.Augmentation()


class HostFeed:
    """One train step per :meth:`advance`, on the next batch of a grain pipeline (each process
    reads only the examples of its own part of every global batch)."""

    def __init__(self, config: RunConfig, data: Data, step_fn, mesh):
        self.steps_per_advance = 1
        self.step_fn, self.mesh = step_fn, mesh
        self.iterator = iter(
            pipeline.train_dataset(
                data.train,
                global_batch_size=config.batch_size,
                seed=config.seed,
                normalisation=data.normalisation,
                augmentation=augmentation_of(config, data.input_shape),
                crop_size=config.data.crop_size,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )

    shard = staticmethod(shard_batch)

    def advance(self, state: train.TrainState):
        return self.step_fn(state, self.shard(next(self.iterator), self.mesh))

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, data_state: dict) -> None:
        self.iterator.set_state(data_state)


class DeviceFeed:
    """One epoch per :meth:`advance`, on the training split held on the devices, each device its
    1/D share (:mod:`lateral_jax.training.device_epochs`); each process decodes only its devices'
    shares."""

    def __init__(self, config: RunConfig, data: Data, epoch_fn, mesh):
        """``epoch_fn``: :func:`lateral_jax.training.device_epochs.make_device_epoch` of the run's model."""
        pipeline.check_batch_fits(config.batch_size, len(data.train))
        blocks = device_epochs.device_blocks(len(data.train), mesh.size, seed=config.seed + 2000)
        self.images, self.labels = device_epochs.put_blocks(
            blocks,
            lambda indices: pipeline.to_arrays(
                data.train, data.normalisation, crop_size=config.data.crop_size, indices=indices
            ),
            mesh,
        )
        self.steps_per_advance = blocks.shape[1] // (config.batch_size // mesh.size)
        self.epoch_fn = epoch_fn
        self.key = jax.random.key(config.seed + 1000)
        self.epoch = 0

    def advance(self, state: train.TrainState):
        state, history = self.epoch_fn(state, self.images, self.labels, jax.random.fold_in(self.key, self.epoch))
        self.epoch += 1
        return state, jax.tree_util.tree_map(jnp.mean, history)

    def get_state(self) -> dict:
        return {"epoch": self.epoch}

    def set_state(self, data_state: dict) -> None:
        self.epoch = int(data_state["epoch"])
