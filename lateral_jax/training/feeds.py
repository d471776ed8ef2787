"""Where a run's batches come from: the host (a grain pipeline) or the device (the whole split).

Both feeds have the same interface: :meth:`advance` runs ``steps_per_advance`` train steps and
returns ``(state, metrics)``; :meth:`get_state` / :meth:`set_state` are the data position saved
in a checkpoint.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lateral_jax.training import device_epochs, train
from lateral_jax.training.config import RunConfig
from lateral_jax.training.data import pipeline
from lateral_jax.training.datasets import Data


class HostFeed:
    """One train step per :meth:`advance`, on the next batch of a grain pipeline."""

    def __init__(self, config: RunConfig, data: Data, step_fn, mesh):
        self.steps_per_advance = 1
        self.step_fn, self.mesh = step_fn, mesh
        self.iterator = iter(
            pipeline.train_dataset(
                data.train,
                global_batch_size=config.batch_size,
                seed=config.seed,
                normalisation=data.normalisation,
                augmentation=pipeline.Augmentation() if config.data.augment else None,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            )
        )

    shard = staticmethod(train.shard_batch)

    def advance(self, state: train.TrainState):
        return self.step_fn(state, self.shard(next(self.iterator), self.mesh))

    def get_state(self) -> dict:
        return self.iterator.get_state()

    def set_state(self, data_state: dict) -> None:
        self.iterator.set_state(data_state)


class DeviceFeed:
    """One epoch per :meth:`advance`, on the training split held on the device(s)."""

    def __init__(self, config: RunConfig, data: Data, model: Any, tx, mesh):
        pipeline.check_batch_fits(config.batch_size, len(data.train))
        images, labels = pipeline.to_arrays(data.train, data.normalisation)
        self.images, self.labels = train.replicate(images, mesh), train.replicate(labels, mesh)
        self.steps_per_advance = len(labels) // config.batch_size
        self.epoch_fn = device_epochs.make_device_epoch(
            model, tx, mesh, batch_size=config.batch_size, augment=config.data.augment
        )
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
