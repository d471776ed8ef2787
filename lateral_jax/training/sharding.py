"""Data-parallel placement for training: the batch sharded along the mesh's data axis
(:data:`lateral_jax.core.sharding.DATA_AXIS`), parameters and optimiser state replicated, on every
device of every process."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lateral_jax.core.sharding import DATA_AXIS

Batch = dict[str, jax.Array]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    if global_batch_size % mesh.size:
        raise ValueError(
            f"batch_size={global_batch_size} is not divisible by the {mesh.size} devices of the mesh; "
            f"use a multiple of {mesh.size} (e.g. {mesh.size * max(1, global_batch_size // mesh.size)})."
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Places this process's part of the global batch on its devices as one global ``jax.Array``.

    Single process: ``batch`` is the global batch.  Multi-host: each process passes its own
    ``1/process_count`` of the global batch, in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicated_shapes(tree: Any, mesh: Mesh) -> Any:
    """``tree``'s leaves as ``jax.ShapeDtypeStruct`` replicated over ``mesh`` (e.g. a restore target)."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Puts a pytree (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), jax.device_get(tree)
    )
