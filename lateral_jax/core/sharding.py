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


def _varying(x: jax.Array, axis_name: str) -> jax.Array:
    """``x`` marked as varying along ``axis_name`` inside ``jax.shard_map`` (unchanged if it already is)."""
    manual = getattr(jax.typeof(x), "manual_axis_type", None)
    varying = getattr(manual, "varying", None) if manual is not None else getattr(jax.typeof(x), "vma", ())
    return x if axis_name in (varying or ()) else jax.lax.pcast(x, axis_name, to="varying")


def data_parallel_value_and_grad(loss_fn: Callable, axis_name: str = DATA_AXIS, *, has_aux: bool = False) -> Callable:
    """``jax.value_and_grad(loss_fn)`` for a user's own step inside ``jax.shard_map``, where the
    parameters are replicated (``P()``) and each device's batch is a shard: returns the mean over
    devices of the per-device losses and **the gradient of that mean**.

    The pitfall it removes: differentiating a replicated parameter inside ``shard_map`` transposes
    its implicit broadcast into a ``psum``, so a naive ``jax.grad`` of each device's mean loss
    returns the *sum* of the per-device gradients — the device count times the gradient of the
    global mean loss.  Here the parameters are first marked varying (``jax.lax.pcast(...,
    to="varying")``), so each device differentiates its own loss, and the gradients and the loss
    are then averaged with ``jax.lax.pmean``.  ``loss_fn(params, *args)`` returns a scalar (or
    ``(scalar, aux)`` with ``has_aux``; ``aux`` is returned per device).
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def wrapped(params, *args, **kwargs):
        params = jax.tree.map(lambda p: _varying(p, axis_name), params)
        value, grads = grad_fn(params, *args, **kwargs)
        grads = jax.lax.pmean(grads, axis_name)
        if has_aux:
            loss, aux = value
            return (jax.lax.pmean(loss, axis_name), aux), grads
        return jax.lax.pmean(value, axis_name), grads

    return wrapped
