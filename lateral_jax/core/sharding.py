"""The data-parallel layout shared by the training system and the fused loop kernel.

One 1-D mesh over all devices of all processes, with the batch sharded along :data:`DATA_AXIS`
and everything else replicated.  Axes are ``AxisType.Auto`` (with Explicit axes,
``optax.softmax_cross_entropy_with_integer_labels`` fails under ``grad`` on JAX ≥ 0.11).  Code
that must know the layout while being traced (the fused Pallas kernel, which has no automatic
partitioning rule and so runs under ``jax.shard_map``) reads the mesh that :func:`in_mesh` puts
in context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh

DATA_AXIS = "data"


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D ``(DATA_AXIS,)`` mesh over ``devices`` (default: every device of every process), Auto axes."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def in_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """``fn`` traced with ``mesh`` as the abstract mesh in context (see :func:`data_parallel_mesh`)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


def data_parallel_mesh(batch: int, *, who: str):
    """The mesh in context when it shards a batch along :data:`DATA_AXIS` over more than one
    device, else ``None``.  Raises a ``ValueError`` (naming ``who``) when ``batch`` does not split
    evenly over that axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
        return None
    if batch % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"{who} runs per device: the batch of {batch} does not split over the "
            f"{mesh.shape[DATA_AXIS]} devices of the mesh's {DATA_AXIS!r} axis; use a multiple of it."
        )
    return mesh
