"""Embedded synthetic tasks that need no download: contour integration and a Pathfinder-style task.

Both are binary tasks designed around what lateral connections are thought to do in V1: link
aligned local elements over distances larger than a feed-forward receptive field.

* :func:`contour_images` — in the style of Field, Hayes & Hess (1993): Gabor elements on a
  jittered grid; in a *positive* image a chain of ``path_length`` elements lies along a smooth path
  (successive directions differ by ±``path_angle``) and each is oriented along the path; in a
  *negative* image the very same element positions are used but the chain's elements are randomly
  oriented.  Element count, positions, spacing and contrast are identically distributed in both
  classes: only the alignment differs.
* :func:`pathfinder_images` — in the style of Linsley et al. (2018): ``num_curves`` smooth dashed
  curves and two markers; positive iff both markers sit on the ends of the same curve.  Both
  classes draw the same curves and two markers; only which ends carry the markers differs.

Images are float32 in [-1, 1] (grey background 0), NHWC with one channel; generation is
vectorised over the batch with NumPy and deterministic for a given ``seed``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lateral_jax.training.data import pathfinder


@dataclasses.dataclass(frozen=True)
class ContourSpec:
    """Difficulty knobs of the contour task.

    Attributes:
      image_size: side of the square image in pixels.
      grid: background elements lie on a ``grid × grid`` jittered grid (clutter).
      path_length: number of elements in the contour.
      path_angle: turn between successive path segments, degrees (larger = harder).
      spacing: distance between successive path elements in pixels.
      wavelength, sigma: Gabor carrier wavelength and envelope width in pixels.
      jitter: position jitter of background elements as a fraction of the cell size.
    """

    image_size: int = 32
    grid: int = 4
    path_length: int = 6
    path_angle: float = 10.0
    spacing: float = 5.0
    wavelength: float = 5.0
    sigma: float = 1.3
    jitter: float = 0.3

    def __post_init__(self) -> None:
        if self.path_length < 2:
            raise ValueError(f"path_length={self.path_length} must be >= 2 (a contour links elements).")
        if not 0 <= self.path_angle <= 90:
            raise ValueError(f"path_angle={self.path_angle} must lie in [0, 90] degrees.")
        if self.grid < 2 or self.image_size < 8:
            raise ValueError(f"grid={self.grid} must be >= 2 and image_size={self.image_size} >= 8.")


@dataclasses.dataclass(frozen=True)
class PathfinderSpec:
    """Difficulty knobs of the Pathfinder-style task.

    Attributes:
      image_size: side of the square image in pixels.
      num_curves: curves drawn (>= 2: one target, the rest distractors; more = more clutter).
      curve_length: length of each curve in pixels.
      max_turn: largest turn per pixel of curve, degrees (curvature).
      dash, gap: dash pattern along the curves in pixels.
    """

    image_size: int = 32
    num_curves: int = 2
    curve_length: float = 24.0
    max_turn: float = 8.0
    dash: float = 2.0
    gap: float = 1.0

    def __post_init__(self) -> None:
        if self.num_curves < 2:
            raise ValueError(f"num_curves={self.num_curves} must be >= 2 (a negative needs a second curve).")
        if self.curve_length <= 0 or self.dash <= 0 or self.gap < 0:
            raise ValueError("curve_length and dash must be > 0 and gap >= 0.")


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    return labels.astype(np.int32)


def _render_gabors(
    xs: np.ndarray, ys: np.ndarray, theta: np.ndarray, amp: np.ndarray, phase: np.ndarray, spec: ContourSpec
) -> np.ndarray:
    """Sum of Gabor elements ``[B, N]`` → images ``[B, S, S]``. ``theta`` is the bar orientation."""
    grid = np.arange(spec.image_size, dtype=np.float32) + 0.5
    dx = grid[None, None, None, :] - xs[..., None, None]
    dy = grid[None, None, :, None] - ys[..., None, None]
    # the carrier varies across the bar: along the normal (-sin θ, cos θ)
    across = -dx * np.sin(theta)[..., None, None] + dy * np.cos(theta)[..., None, None]
    envelope = np.exp(-(dx**2 + dy**2) / (2 * spec.sigma**2))
    carrier = np.cos(2 * np.pi * across / spec.wavelength + phase[..., None, None])
    return np.einsum("bn,bnhw->bhw", amp, (envelope * carrier).astype(np.float32))


def contour_images(num_examples: int, *, seed: int, spec: ContourSpec = ContourSpec()) -> dict[str, np.ndarray]:
    """``{"image": f32[N, S, S, 1], "label": i32[N]}`` of the contour task (labels balanced)."""
    rng = np.random.default_rng([seed, 0xC0])
    labels = _balanced_labels(rng, num_examples)
    out = np.empty((num_examples, spec.image_size, spec.image_size, 1), np.float32)
    for start in range(0, num_examples, 512):
        stop = min(start + 512, num_examples)
        out[start:stop, ..., 0] = _contour_chunk(rng, labels[start:stop], spec)
    return {"image": out, "label": labels}


def _contour_chunk(rng: np.random.Generator, labels: np.ndarray, spec: ContourSpec) -> np.ndarray:
    return np.clip(_render_gabors(*contour_elements(rng, labels, spec), spec), -1.0, 1.0)


def contour_elements(rng: np.random.Generator, labels: np.ndarray, spec: ContourSpec) -> tuple[np.ndarray, ...]:
    """Element parameters ``(x, y, orientation, amplitude, phase)``, each ``[B, path_length + grid²]``.

    The first ``path_length`` elements are the path.  Every draw is made for both classes, so with
    the same generator state a positive and a negative differ only in the path's orientations.
    """
    b, size, length = labels.shape[0], float(spec.image_size), spec.path_length
    # the path: a random walk with turns of ±path_angle, centred in the image
    turns = np.deg2rad(spec.path_angle) * rng.choice([-1.0, 1.0], (b, length - 1))
    turns += np.deg2rad(5.0) * rng.standard_normal((b, length - 1))
    heading0 = rng.uniform(0, 2 * np.pi, (b, 1))
    headings = heading0 + np.concatenate([np.zeros((b, 1)), np.cumsum(turns[:, :-1], axis=1)], axis=1)
    steps = spec.spacing * np.stack([np.cos(headings), np.sin(headings)], -1)
    path = np.concatenate([np.zeros((b, 1, 2)), np.cumsum(steps, axis=1)], axis=1)
    path -= path.mean(axis=1, keepdims=True)
    path += size / 2 + rng.uniform(-size / 8, size / 8, (b, 1, 2))
    # the tangent at each element: mean of the adjacent segment headings
    seg = np.concatenate([headings[:, :1], headings, headings[:, -1:]], axis=1)
    tangent = np.angle(np.exp(1j * seg[:, :-1]) + np.exp(1j * seg[:, 1:]))
    random_orientation = rng.uniform(0, np.pi, (b, length))
    path_theta = np.where(labels[:, None] == 1, tangent, random_orientation)
    # background: a jittered grid minus the cells too close to the path (same rule for both classes)
    cell = size / spec.grid
    gx, gy = np.meshgrid((np.arange(spec.grid) + 0.5) * cell, (np.arange(spec.grid) + 0.5) * cell)
    bg = np.stack([gx.ravel(), gy.ravel()], -1)[None] + spec.jitter * cell * rng.uniform(-1, 1, (b, spec.grid**2, 2))
    dist = np.linalg.norm(bg[:, :, None, :] - path[:, None, :, :], axis=-1).min(axis=2)
    bg_amp = (dist > 0.75 * spec.spacing).astype(np.float32)
    bg_theta = rng.uniform(0, np.pi, (b, spec.grid**2))
    xs = np.concatenate([path[..., 0], bg[..., 0]], axis=1).astype(np.float32)
    ys = np.concatenate([path[..., 1], bg[..., 1]], axis=1).astype(np.float32)
    theta = np.concatenate([path_theta, bg_theta], axis=1).astype(np.float32)
    amp = np.concatenate([np.ones((b, length), np.float32), bg_amp], axis=1)
    phase = rng.uniform(0, 2 * np.pi, theta.shape).astype(np.float32)
    return xs, ys, theta, amp, phase


def _curves(rng: np.random.Generator, b: int, spec: PathfinderSpec) -> np.ndarray:
    """Smooth random curves sampled every pixel: ``[B, K, P, 2]``."""
    k, p, size = spec.num_curves, int(spec.curve_length) + 1, float(spec.image_size)
    turn = np.deg2rad(spec.max_turn) * np.cumsum(rng.uniform(-1, 1, (b, k, p - 1)) * 0.5, axis=-1)
    turn = np.clip(turn, -np.deg2rad(spec.max_turn), np.deg2rad(spec.max_turn))
    heading = rng.uniform(0, 2 * np.pi, (b, k, 1)) + np.cumsum(turn, axis=-1)
    steps = np.stack([np.cos(heading), np.sin(heading)], -1)
    pts = np.concatenate([np.zeros((b, k, 1, 2)), np.cumsum(steps, axis=2)], axis=2)
    pts -= pts.mean(axis=2, keepdims=True)
    # place each curve at a random centre; keep it inside the image
    margin = 3.0
    lo, hi = pts.min(axis=2, keepdims=True), pts.max(axis=2, keepdims=True)
    room_lo, room_hi = margin - lo, size - margin - hi
    centre = room_lo + rng.uniform(0, 1, (b, k, 1, 2)) * np.maximum(room_hi - room_lo, 0.0)
    return pts + centre


def _render_points(points: np.ndarray, weights: np.ndarray, sigma: float, size: int) -> np.ndarray:
    """Sum of Gaussian dots: points ``[B, M, 2]``, weights ``[B, M]`` → ``[B, S, S]``."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    gx = np.exp(-((grid[None, None, :] - points[..., 0:1]) ** 2) / (2 * sigma**2)).astype(np.float32)
    gy = np.exp(-((grid[None, None, :] - points[..., 1:2]) ** 2) / (2 * sigma**2)).astype(np.float32)
    return np.einsum("bm,bmy,bmx->byx", weights.astype(np.float32), gy, gx)


def pathfinder_images(
    num_examples: int, *, seed: int, spec: PathfinderSpec = PathfinderSpec()
) -> dict[str, np.ndarray]:
    """``{"image": f32[N, S, S, 1], "label": i32[N]}`` of the Pathfinder-style task."""
    rng = np.random.default_rng([seed, 0xAF])
    labels = _balanced_labels(rng, num_examples)
    out = np.empty((num_examples, spec.image_size, spec.image_size, 1), np.float32)
    for start in range(0, num_examples, 512):
        stop = min(start + 512, num_examples)
        lab = labels[start:stop]
        b = lab.shape[0]
        curves = _curves(rng, b, spec)
        p = curves.shape[2]
        period = spec.dash + spec.gap
        on = ((np.arange(p) % period) < spec.dash).astype(np.float32)
        strokes = _render_points(curves.reshape(b, -1, 2), np.tile(on, (b, spec.num_curves)), 0.6, spec.image_size)
        first = curves[:, 0, 0]
        # positive: the other end of the same curve; negative: an end of the second curve
        end_same, end_other = curves[:, 0, -1], curves[np.arange(b), 1, rng.integers(0, 2, b) * (p - 1)]
        second = np.where(lab[:, None] == 1, end_same, end_other)
        markers = _render_points(np.stack([first, second], 1), np.ones((b, 2)), 1.1, spec.image_size)
        img = np.clip(strokes, 0, 1) * 0.8 + np.clip(markers * 1.5, 0, 1)
        out[start:stop, ..., 0] = np.clip(img, 0, 1.5) / 0.75 - 1.0
    return {"image": np.clip(out, -1.0, 1.0), "label": labels}


def cache_path(
    config: pathfinder.PathfinderConfig, num_examples: int, seed: int, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Where :func:`cached_generate` keeps the examples of ``(config, num_examples, seed)``:
    ``<cache_dir or $LATERAL_JAX_DATA or ~/.cache/lateral_jax/data>/pathfinder/<digest>.npz``."""
    root = Path(cache_dir or os.environ.get("LATERAL_JAX_DATA") or Path.home() / ".cache" / "lateral_jax" / "data")
    key = json.dumps([dataclasses.asdict(config), num_examples, seed, pathfinder.GENERATOR_VERSION], sort_keys=True)
    return root / "pathfinder" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"


def cached_generate(
    config: pathfinder.PathfinderConfig, num_examples: int, *, seed: int, cache_dir: str | os.PathLike | None = None
) -> dict[str, np.ndarray]:
    """:func:`~lateral_jax.training.data.pathfinder.generate` once per ``(config, num_examples, seed)``
    and generator version: later calls (other runs, other processes) read the ``.npz`` it wrote
    (atomically, by rename)."""
    path = cache_path(config, num_examples, seed, cache_dir)
    if path.exists():
        with np.load(path) as stored:
            return {"image": stored["image"], "label": stored["label"]}
    arrays = pathfinder.generate(config, num_examples, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)
    return arrays


def published_pathfinder_images(
    num_examples: int, *, seed: int, spec: pathfinder.PathfinderConfig = pathfinder.PathfinderConfig()
) -> dict[str, np.ndarray]:
    """``{"image": f32[N, S, S, 1], "label": i32[N]}`` of Pathfinder by the published procedure
    (:mod:`lateral_jax.training.data.pathfinder`), generated in parallel and cached on disk."""
    return cached_generate(spec, num_examples, seed=seed)


def _published_spec(contour_length: int = 6, image_size: int = 32, **overrides) -> pathfinder.PathfinderConfig:
    return pathfinder.PathfinderConfig.published(contour_length, image_size, **overrides)


TASKS = {
    "contour": (contour_images, ContourSpec),
    "pathfinder": (pathfinder_images, PathfinderSpec),
    "pathfinder_published": (published_pathfinder_images, _published_spec),
}


def make_task(name: str, num_examples: int, *, seed: int, **spec_overrides) -> dict[str, np.ndarray]:
    """Generates ``num_examples`` of task ``name`` ("contour" | "pathfinder" | "pathfinder_published")
    with spec overrides (for ``pathfinder_published``: ``contour_length``, ``image_size`` and any
    :class:`~lateral_jax.training.data.pathfinder.PathfinderConfig` field, on top of
    :meth:`~lateral_jax.training.data.pathfinder.PathfinderConfig.published`)."""
    if name not in TASKS:
        raise ValueError(f"synthetic task {name!r} is unknown; choose one of {sorted(TASKS)}.")
    generate, spec_cls = TASKS[name]
    return generate(num_examples, seed=seed, spec=spec_cls(**spec_overrides))
