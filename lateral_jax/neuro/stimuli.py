"""Visual stimuli for in-silico neurophysiology (pure JAX, batched, NHWC).

Every stimulus is first made as a *contrast pattern* in [-1, 1] on a grey (0) background and then
mapped into a model's input space by :func:`to_model_input`: for models trained on the synthetic
tasks (inputs already in [-1, 1]) the pattern is the input; for models trained on natural images
the pattern becomes the pixel value ``0.5 + 0.5 · pattern`` in [0, 1], normalised per channel with
the training set's mean and std.

Angles are radians; an orientation θ is that of the grating's bars (the luminance varies along
``(-sin θ, cos θ)``); spatial frequency is in cycles per pixel; positions in pixels from the top
left, with the image centre at ``(size / 2, size / 2)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lateral_jax.training.data import synthetic
from lateral_jax.training.data.pipeline import Normalisation


def _coords(size: int, centre: tuple[float, float] | None = None) -> tuple[jax.Array, jax.Array]:
    c = (size / 2.0, size / 2.0) if centre is None else centre
    y, x = jnp.meshgrid(
        jnp.arange(size, dtype=jnp.float32) + 0.5, jnp.arange(size, dtype=jnp.float32) + 0.5, indexing="ij"
    )
    return x - c[0], y - c[1]


def grating(
    size: int,
    orientation: float | jax.Array,
    frequency: float | jax.Array,
    phase: float | jax.Array = 0.0,
    contrast: float | jax.Array = 1.0,
) -> jax.Array:
    """A full-field sinusoidal grating ``contrast · cos(2π f · n·(x, y) + φ)``, ``[size, size]``."""
    x, y = _coords(size)
    across = -x * jnp.sin(orientation) + y * jnp.cos(orientation)
    return contrast * jnp.cos(2 * jnp.pi * frequency * across + phase)


def grating_bank(
    size: int,
    orientations: Sequence[float],
    frequencies: Sequence[float],
    phases: Sequence[float],
    contrast: float = 1.0,
) -> jax.Array:
    """Every (orientation, frequency, phase) combination: ``[n_θ, n_f, n_φ, size, size]``."""
    o, f, p = (jnp.asarray(v, jnp.float32) for v in (orientations, frequencies, phases))
    fn = jax.vmap(
        jax.vmap(jax.vmap(lambda a, b, c: grating(size, a, b, c, contrast), (None, None, 0)), (None, 0, None)),
        (0, None, None),
    )
    return fn(o, f, p)


def disc_mask(
    size: int, radius: float | jax.Array, *, inner: float | jax.Array | None = None, edge: float = 0.5
) -> jax.Array:
    """A soft-edged disc (or annulus ``inner ≤ r ≤ radius``) mask in [0, 1], centred."""
    x, y = _coords(size)
    r = jnp.sqrt(x**2 + y**2)
    outer = jax.nn.sigmoid((radius - r) / edge)
    return outer * jax.nn.sigmoid((r - inner) / edge) if inner is not None else outer


def size_tuning_stimuli(
    size: int, radii: Sequence[float], orientation: float, frequency: float, phases: Sequence[float]
) -> jax.Array:
    """Centred grating discs of growing radius: ``[n_r, n_φ, size, size]``."""
    radii = jnp.asarray(radii, jnp.float32)
    phases = jnp.asarray(phases, jnp.float32)
    return jax.vmap(
        lambda r: jax.vmap(lambda p: grating(size, orientation, frequency, p) * disc_mask(size, r))(phases)
    )(radii)


def centre_surround_stimuli(
    size: int,
    *,
    centre_radius: float,
    gap: float,
    orientation: float,
    frequency: float,
    phases: Sequence[float],
) -> dict[str, jax.Array]:
    """Centre alone, centre + iso-oriented annulus, centre + orthogonal annulus; each ``[n_φ, size, size]``.

    The annulus extends from ``centre_radius + gap`` to the image border.
    """
    phases = jnp.asarray(phases, jnp.float32)
    centre_mask = disc_mask(size, centre_radius)
    ring = disc_mask(size, 2.0 * size, inner=centre_radius + gap)

    def make(surround_orientation):
        def one(p):
            centre = grating(size, orientation, frequency, p) * centre_mask
            if surround_orientation is None:
                return centre
            return centre + grating(size, surround_orientation, frequency, p) * ring

        return jax.vmap(one)(phases)

    return {"centre": make(None), "iso": make(orientation), "ortho": make(orientation + jnp.pi / 2)}


@functools.partial(jax.jit, static_argnames=("size",))
def size_tuning_bank(
    size: int, radii: jax.Array, orientations: jax.Array, frequencies: jax.Array, phases: jax.Array
) -> jax.Array:
    """:func:`size_tuning_stimuli` for every frequency and orientation: ``[n_f, n_θ, n_r, n_φ, size, size]``."""
    return jax.vmap(lambda f: jax.vmap(lambda o: size_tuning_stimuli(size, radii, o, f, phases))(orientations))(
        frequencies
    )


@functools.partial(jax.jit, static_argnames=("size",))
def centre_surround_bank(
    size: int, centre_radius: float, gap: float, orientations: jax.Array, frequencies: jax.Array, phases: jax.Array
) -> dict[str, jax.Array]:
    """:func:`centre_surround_stimuli` for every frequency and orientation: each kind
    ``[n_f, n_θ, n_φ, size, size]``."""

    def one(f, o):
        return centre_surround_stimuli(
            size, centre_radius=centre_radius, gap=gap, orientation=o, frequency=f, phases=phases
        )

    return jax.vmap(lambda f: jax.vmap(lambda o: one(f, o))(orientations))(frequencies)


def gabor_contours(num_examples: int, *, seed: int, **spec) -> tuple[jax.Array, jax.Array]:
    """Contour-task images (Gabor-element paths among clutter) as contrast patterns and labels."""
    data = synthetic.contour_images(num_examples, seed=seed, spec=synthetic.ContourSpec(**spec))
    return jnp.asarray(data["image"][..., 0]), jnp.asarray(data["label"])


def to_model_input(pattern: jax.Array, normalisation: Normalisation, channels: int) -> jax.Array:
    """Contrast patterns ``[..., H, W]`` → model inputs ``[..., H, W, C]`` in the model's normalisation."""
    x = jnp.repeat(pattern[..., None], channels, axis=-1)
    identity = (
        normalisation.scale == 1.0
        and all(m == 0.0 for m in normalisation.mean)
        and all(s == 1.0 for s in normalisation.std)
    )
    if identity:
        return x
    shape = (1,) * (x.ndim - 1) + (channels,)
    mean = jnp.asarray(np.broadcast_to(np.asarray(normalisation.mean, np.float32), (channels,)).reshape(shape))
    std = jnp.asarray(np.broadcast_to(np.asarray(normalisation.std, np.float32), (channels,)).reshape(shape))
    return ((0.5 + 0.5 * x) - mean) / std
