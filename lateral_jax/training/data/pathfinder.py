"""Pathfinder by the published procedure (Linsley et al., NeurIPS 2018; the LRA's Pathfinder uses
the same generator), written from its description, deterministic and random-access.

An image shows two *target* paths and several shorter *distractor* paths, each a chain of
paddles (short dashes of ``paddle_length`` × ``paddle_thickness`` px, consecutive paddles
``paddle_margin`` px apart), and two round markers.  Label 1: the markers sit on the two ends of
the same target path; label 0: on one end of each.  Difficulty is the number of paddles of a
target path, ``contour_length`` (6 / 9 / 14 in the paper).

The procedure, as published: the two target paths start ``seed_distance`` px apart (so the two
marked start points of a negative are as close as a positive's); each path grows paddle by paddle,
the next direction drawn with weight ``cos(min(continuity · |Δθ|, π/2))²`` among the directions
whose paddle stays in the image and keeps clear of everything drawn; a path that cannot grow is
drawn again.  Distractors (``num_distractors`` paths of ``distractor_length`` paddles) are added
while they fit (like the published generator, a distractor that finds no room after
``max_retries`` draws is dropped; the count drawn is in :func:`example`'s metadata).  Every draw
is made before the label is used: the label only decides which two of the four target ends
carry the markers, so nothing but connectivity tells the classes apart.

Choices that are ours: the geometry is continuous (paddles are segments, clearances exact
distances) and rendered with analytic anti-aliasing instead of drawing at a multiple and
downsampling; different paths keep ``clearance`` px apart (centre lines), a path keeps
``paddle_margin + paddle_thickness`` px from its own non-adjacent paddles; the sizes of
:meth:`PathfinderConfig.published` are the published 300-px values scaled to the image with
floors of 1–2 px (at 32 px a paddle is 2 px long, 1 px thick, 1 px apart).

Example ``i`` of a ``(config, seed)`` is drawn from its own generator seeded by
``(seed, contour_length, image_size, i)``: any process draws the same image for the same index,
with no state (:class:`PathfinderSource`); :func:`generate` makes many in parallel
(:func:`lateral_jax.training.data.synthetic.cached_generate` once per configuration, on disk).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

# The published wrapper's values at a 300-px window.
_PUBLISHED_WINDOW = 300.0
_PUBLISHED = {"paddle_length": 5.0, "paddle_thickness": 2.0, "paddle_margin": 3.0, "marker_radius": 5.0}
_PUBLISHED_SEED_DISTANCE = 27.0
_PUBLISHED_DISTRACTOR_PADDLES = 30
_NUM_HEADINGS = 72
GENERATOR_VERSION = 1  # bump when a change alters any generated example (invalidates caches)
_DISTRACTOR_RETRIES = 4  # the published generator's max_distractor_contour_retrial


@dataclasses.dataclass(frozen=True)
class PathfinderConfig:
    """Geometry of one Pathfinder difficulty, in pixels of the rendered image.

    Attributes:
      image_size: side of the square image (32 to 150 and beyond).
      contour_length: paddles per target path (6, 9, 14 published).
      paddle_length, paddle_thickness: a paddle's size.
      paddle_margin: gap between consecutive paddles of a path.
      continuity: turn weighting; the next paddle's direction has weight
        ``cos(min(continuity · |Δθ|, π/2))²`` (larger: straighter paths; published 1.8).
      distractor_length: paddles per distractor path.
      num_distractors: distractor paths drawn (those that do not fit are dropped).
      marker_radius: radius of the two end markers.
      seed_distance: distance between the start points of the two target paths.
      clearance: least distance between the centre lines of different paths (and from a marker's
        edge to a path of the other target or a distractor).
      border: least distance from a paddle to the image edge.
      max_retries: draws of a path (and of the target pair) before giving up.
    """

    image_size: int = 32
    contour_length: int = 6
    paddle_length: float = 2.0
    paddle_thickness: float = 1.0
    paddle_margin: float = 1.0
    continuity: float = 1.8
    distractor_length: int = 2
    num_distractors: int = 15
    marker_radius: float = 1.5
    seed_distance: float = 7.0
    clearance: float = 3.0
    border: float = 1.0
    max_retries: int = 50

    def __post_init__(self) -> None:
        ints = {"image_size": 8, "contour_length": 1, "distractor_length": 1, "num_distractors": 0, "max_retries": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name}={value!r} must be an int >= {low}.")
        for name in ("paddle_length", "paddle_thickness", "paddle_margin", "marker_radius", "seed_distance"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0 (pixels).")
        if not self.continuity >= 0 or not self.border >= 0:
            raise ValueError("continuity and border must be >= 0.")
        if not self.clearance >= self.paddle_margin + self.paddle_thickness:
            raise ValueError(
                f"clearance={self.clearance} must be >= paddle_margin + paddle_thickness = "
                f"{self.paddle_margin + self.paddle_thickness}: different paths must be further apart than the "
                "gaps inside a path, or connectivity is ambiguous."
            )
        if self.seed_distance < 2 * self.marker_radius + self.clearance:
            raise ValueError(
                f"seed_distance={self.seed_distance} must be >= 2 * marker_radius + clearance = "
                f"{2 * self.marker_radius + self.clearance} so a marker keeps clear of the other target path."
            )

    @classmethod
    def published(cls, contour_length: int, image_size: int = 32, **overrides: Any) -> PathfinderConfig:
        """The published wrapper's geometry (300-px window: paddle 5 × 2 px, 3 px apart, markers of
        radius 5, target starts 27 px apart, continuity 1.8, distractors of ``contour_length // 3``
        paddles, about 30 distractor paddles) scaled to ``image_size`` with floors of 1–2 px."""
        s = image_size / _PUBLISHED_WINDOW
        length = max(round(_PUBLISHED["paddle_length"] * s), 2)
        thickness = max(round(_PUBLISHED["paddle_thickness"] * s), 1)
        margin = max(round(_PUBLISHED["paddle_margin"] * s), 1)
        marker = max(_PUBLISHED["marker_radius"] * s, 1.5)
        clearance = float(margin + thickness + 1)
        distractor_length = max(contour_length // 3, 1)
        values = dict(
            image_size=image_size,
            contour_length=contour_length,
            paddle_length=float(length),
            paddle_thickness=float(thickness),
            paddle_margin=float(margin),
            distractor_length=distractor_length,
            num_distractors=max(_PUBLISHED_DISTRACTOR_PADDLES // distractor_length, 1),
            marker_radius=marker,
            seed_distance=max(_PUBLISHED_SEED_DISTANCE * s, 2 * marker + clearance + 1.0),
            clearance=clearance,
            border=max(1.0, 22.0 * s / 4),
        )
        return cls(**{**values, **overrides})


@dataclasses.dataclass
class _Canvas:
    """Segments drawn so far: endpoints ``[N, 2]`` each and the path each belongs to."""

    starts: list[np.ndarray] = dataclasses.field(default_factory=list)
    ends: list[np.ndarray] = dataclasses.field(default_factory=list)
    owners: list[int] = dataclasses.field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.starts:
            empty = np.zeros((0, 2))
            return empty, empty, np.zeros((0,), int)
        return np.array(self.starts), np.array(self.ends), np.array(self.owners)

    def add(self, path: list[tuple[np.ndarray, np.ndarray]], owner: int) -> None:
        for p, q in path:
            self.starts.append(p)
            self.ends.append(q)
            self.owners.append(owner)


def point_segment_distance(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances ``[..., N]`` from ``points [..., 2]`` to the segments ``a[N, 2] → b[N, 2]``."""
    px, py = points[..., 0, None], points[..., 1, None]
    ax, ay = a[:, 0], a[:, 1]
    dx, dy = b[:, 0] - ax, b[:, 1] - ay
    t = ((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-12)
    t = np.minimum(np.maximum(t, 0.0), 1.0)
    ex, ey = px - ax - t * dx, py - ay - t * dy
    return np.sqrt(ex * ex + ey * ey)


def segment_distance(p: np.ndarray, q: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least distances between candidate segments ``p[M, 2] → q[M, 2]`` and ``a[N, 2] → b[N, 2]``: ``[M, N]``."""
    if a.shape[0] == 0:
        return np.full((p.shape[0], 0), np.inf)
    d = np.minimum(point_segment_distance(p, a, b), point_segment_distance(q, a, b))
    d = np.minimum(d, point_segment_distance(a, p, q).T)
    d = np.minimum(d, point_segment_distance(b, p, q).T)

    def side(o, u, v):  # sign of the turn o → u → v
        return np.sign(
            (u[..., 0] - o[..., 0]) * (v[..., 1] - o[..., 1]) - (u[..., 1] - o[..., 1]) * (v[..., 0] - o[..., 0])
        )

    P, Q, A, B = p[:, None], q[:, None], a[None], b[None]
    crossing = (side(P, Q, A) * side(P, Q, B) < 0) & (side(A, B, P) * side(A, B, Q) < 0)
    return np.where(crossing, 0.0, d)


def _unit(theta: np.ndarray) -> np.ndarray:
    return np.stack([np.cos(theta), np.sin(theta)], axis=-1)


def _candidates(
    path: list[tuple[np.ndarray, np.ndarray, float]],
    start: np.ndarray,
    heading: float,
    canvas: tuple[np.ndarray, np.ndarray],
    config: PathfinderConfig,
    keep_clear: list[tuple[np.ndarray, float]],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The next paddle's candidates ``(starts, ends, headings, weights)``; weight 0 where it would
    leave the image or come too close to a path, to the path itself or to a marker's site."""
    a, b = canvas
    size, lo = float(config.image_size), config.border
    turns = np.linspace(-math.pi, math.pi, _NUM_HEADINGS, endpoint=False)
    if path:
        heading = path[-1][2]
        thetas = heading + turns
        weights = np.cos(np.minimum(config.continuity * np.abs(turns), math.pi / 2)) ** 2
        starts = path[-1][1] + config.paddle_margin * _unit(thetas)
    else:
        thetas = heading + turns
        weights = np.ones_like(thetas)
        starts = np.broadcast_to(start, (thetas.size, 2))
    ends = starts + config.paddle_length * _unit(thetas)
    inside = np.all((starts >= lo) & (starts <= size - lo) & (ends >= lo) & (ends <= size - lo), axis=1)
    weights = np.where(inside, weights, 0.0)
    live = weights > 0
    if not live.any():
        return starts, ends, thetas, weights
    # only segments within reach of this paddle's candidates can be too close to one
    centre = path[-1][1] if path else start
    reach = config.paddle_margin + config.paddle_length + config.clearance
    s_live, e_live = starts[live], ends[live]
    ok = np.ones(s_live.shape[0], bool)
    if a.shape[0]:
        near = point_segment_distance(centre, a, b) <= reach
        if near.any():
            ok &= segment_distance(s_live, e_live, a[near], b[near]).min(axis=1) >= config.clearance
    if len(path) > 1:
        own_a, own_b = np.array([p[0] for p in path[:-1]]), np.array([p[1] for p in path[:-1]])
        near = point_segment_distance(centre, own_a, own_b) <= reach
        if near.any():
            own_clear = config.paddle_margin + config.paddle_thickness
            ok &= segment_distance(s_live, e_live, own_a[near], own_b[near]).min(axis=1) >= own_clear
    for point, distance in keep_clear:
        ok &= point_segment_distance(point, s_live, e_live) >= distance
    weights[np.flatnonzero(live)[~ok]] = 0.0
    return starts, ends, thetas, weights


def _grow(
    rng: np.random.Generator,
    start: np.ndarray,
    num_paddles: int,
    canvas: _Canvas,
    config: PathfinderConfig,
    keep_clear: list[tuple[np.ndarray, float]],
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """One path of ``num_paddles`` paddles from the point ``start``, or ``None`` if it cannot grow.

    Each paddle is drawn from :func:`_candidates`' weights.  When no candidate is left the last
    paddle is withdrawn and redrawn among its remaining candidates (backtracking, at most
    ``2 · num_paddles`` times): a greedy walk of 14 paddles in a 32-px image runs into a wall
    or itself in most draws.  ``keep_clear``: (point, distance) pairs every paddle keeps clear of.
    """
    segments = canvas.arrays()[:2]
    heading = rng.uniform(-math.pi, math.pi)
    path: list[tuple[np.ndarray, np.ndarray, float]] = []
    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    backtracks = 2 * num_paddles
    while len(path) < num_paddles:
        if len(levels) == len(path):
            levels.append(_candidates(path, start, heading, segments, config, keep_clear))
        starts, ends, thetas, weights = levels[-1]
        total = weights.sum()
        if total <= 1e-9:
            levels.pop()
            if not path or backtracks == 0:
                return None
            backtracks -= 1
            path.pop()  # its candidate was zeroed in its own level when drawn
            continue
        pick = rng.choice(weights.size, p=weights / total)
        weights[pick] = 0.0
        path.append((starts[pick].copy(), ends[pick].copy(), float(thetas[pick])))
    return [(p, q) for p, q, _ in path]


def _target_pair(rng: np.random.Generator, config: PathfinderConfig) -> tuple[list, list] | None:
    """The two target paths, starting ``seed_distance`` apart, each tip clear of the other path."""
    size, lo = float(config.image_size), config.border
    first = rng.uniform(lo, size - lo, 2)
    angle = rng.uniform(-math.pi, math.pi)
    second = first + config.seed_distance * _unit(np.array(angle))
    if np.any(second < lo) or np.any(second > size - lo):
        return None
    marker_clear = config.marker_radius + config.clearance
    canvas = _Canvas()
    path_a = _grow(rng, first, config.contour_length, canvas, config, [(second, marker_clear)])
    if path_a is None:
        return None
    canvas.add(path_a, 0)
    path_b = _grow(
        rng, second, config.contour_length, canvas, config, [(first, marker_clear), (path_a[-1][1], marker_clear)]
    )
    if path_b is None:
        return None
    b_starts, b_ends = np.array([s for s, _ in path_b]), np.array([e for _, e in path_b])
    if point_segment_distance(path_a[-1][1], b_starts, b_ends).min() < marker_clear:
        return None
    return path_a, path_b


def _render(
    segments: tuple[np.ndarray, np.ndarray], markers: np.ndarray, config: PathfinderConfig, scale: int = 1
) -> np.ndarray:
    """Anti-aliased rendering, float32 in [0, 1]: paddles as rectangles ``paddle_length`` × ``paddle_thickness``
    (flat ends, so consecutive paddles are ``paddle_margin`` apart), markers as discs."""
    n = config.image_size * scale
    grid = (np.arange(n, dtype=np.float64) + 0.5) / scale
    pixels = np.stack(np.meshgrid(grid, grid, indexing="xy"), axis=-1).reshape(-1, 2)
    image = np.zeros(n * n)
    a, b = segments
    if a.shape[0]:  # coverage of each paddle's rectangle, box-filtered at the pixel's edges
        length = np.maximum(np.linalg.norm(b - a, axis=1), 1e-12)
        along_unit = (b - a) / length[:, None]
        rel = pixels[:, None, :] - a[None]
        along = rel[..., 0] * along_unit[:, 0] + rel[..., 1] * along_unit[:, 1]
        across = np.abs(rel[..., 0] * along_unit[:, 1] - rel[..., 1] * along_unit[:, 0])
        cover_along = np.clip(scale * np.minimum(along, length - along) + 0.5, 0.0, 1.0)
        cover_across = np.clip(scale * (config.paddle_thickness / 2 - across) + 0.5, 0.0, 1.0)
        image = (cover_along * cover_across).max(axis=1)
    for centre in markers:
        d = np.linalg.norm(pixels - centre, axis=1)
        image = np.maximum(image, np.clip(scale * (config.marker_radius - d) + 0.5, 0.0, 1.0))
    return image.reshape(n, n).astype(np.float32)


def example(config: PathfinderConfig, seed: int, index: int, *, render_scale: int = 1) -> dict[str, Any]:
    """Example ``index``: ``{"image": f32[S, S, 1] in [0, 1], "label": 0|1, "paths": [...],
    "markers": f[2, 2], "num_distractors": n}`` (``paths``: one ``[K, 2, 2]`` array of paddle
    endpoints (x, y) per path, the two targets first).  ``render_scale`` renders the same geometry
    at a multiple of the size (used by the tests' flood fill)."""
    rng = np.random.default_rng([seed, config.contour_length, config.image_size, index])
    for _ in range(config.max_retries):
        pair = _target_pair(rng, config)
        if pair is not None:
            break
    else:
        raise RuntimeError(
            f"no two target paths of contour_length={config.contour_length} fit a {config.image_size}-px image in "
            f"{config.max_retries} draws (example {index}); use a larger image_size or shorter paddles."
        )
    canvas = _Canvas()
    for owner, path in enumerate(pair):
        canvas.add(path, owner)
    tips = [pair[0][0][0], pair[0][-1][1], pair[1][0][0], pair[1][-1][1]]
    marker_clear = [(tip, config.marker_radius + config.clearance) for tip in tips]
    paths = list(pair)
    for _ in range(config.num_distractors):
        for _ in range(_DISTRACTOR_RETRIES):
            start = rng.uniform(config.border, config.image_size - config.border, 2)
            path = _grow(rng, start, config.distractor_length, canvas, config, marker_clear)
            if path is not None:
                canvas.add(path, len(paths))
                paths.append(path)
                break
    label = int(rng.integers(0, 2))
    which = int(rng.integers(0, 2))  # the target whose start is marked
    other = which if label == 1 else 1 - which
    markers = np.array([pair[which][0][0], pair[other][-1][1]])
    a, b, _ = canvas.arrays()
    image = _render((a, b), markers, config, render_scale)
    return {
        "image": image[..., None],
        "label": label,
        "paths": [np.array([[p, q] for p, q in path]) for path in paths],
        "markers": markers,
        "num_distractors": len(paths) - 2,
    }


def _batch(config: PathfinderConfig, seed: int, indices: range) -> tuple[np.ndarray, np.ndarray]:
    examples = [example(config, seed, i) for i in indices]
    return np.stack([e["image"] for e in examples]), np.array([e["label"] for e in examples], np.int32)


def generate(
    config: PathfinderConfig, num_examples: int, *, seed: int, workers: int | None = None, chunk: int = 256
) -> dict[str, np.ndarray]:
    """Examples ``0 .. num_examples-1`` as ``{"image": f32[N, S, S, 1] in [-1, 1], "label": i32[N]}``,
    made by ``workers`` processes (default: the CPU count; 1: in this process); equal to
    :class:`PathfinderSource`'s examples whatever the worker count."""
    chunks = [range(s, min(s + chunk, num_examples)) for s in range(0, num_examples, chunk)]
    workers = min(workers or os.cpu_count() or 1, max(len(chunks), 1))
    if workers <= 1:
        parts = [_batch(config, seed, c) for c in chunks]
    else:
        # spawn, not fork: the caller may hold JAX's threads, which a forked child must not inherit
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(functools.partial(_batch, config, seed), chunks))
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, config.image_size, config.image_size, 1))
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0,), np.int32)
    return {"image": (2.0 * images - 1.0).astype(np.float32), "label": labels.astype(np.int32)}


class PathfinderSource:
    """Random access to the examples of ``(config, seed)``: ``source[i] = {"image": f32[S, S, 1] in
    [-1, 1], "label": int32}``; stateless, so any process or worker draws the same example for
    ``i`` (a data source for grain or the library's pipeline)."""

    def __init__(self, config: PathfinderConfig, num_examples: int, *, seed: int):
        self.config, self.num_examples, self.seed = config, int(num_examples), int(seed)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} is outside [0, {self.num_examples}).")
        e = example(self.config, self.seed, int(index))
        return {"image": (2.0 * e["image"] - 1.0).astype(np.float32), "label": np.int32(e["label"])}


def export_image_folder(arrays: dict[str, np.ndarray], folder: str | os.PathLike, split: str = "train") -> int:
    """Writes ``arrays`` (from :func:`generate`) as ``folder/<split>/<label>/<nnnnnn>.png`` (the
    image-folder layout ``dataset="image_folder"`` reads; classes ``0`` and ``1``); returns the count."""
    from PIL import Image

    root = Path(folder) / split
    for label in (0, 1):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
    pixels = np.round((arrays["image"][..., 0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    for i, (image, label) in enumerate(zip(pixels, arrays["label"], strict=True)):
        Image.fromarray(image).save(root / str(int(label)) / f"{i:06d}.png")
    return len(pixels)
