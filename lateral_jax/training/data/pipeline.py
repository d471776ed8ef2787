"""Grain input pipelines: random-access source → shuffled, augmented, sharded NumPy batches.

The training stream is ``source → shuffle(seed) → repeat → decode/normalise → random crop + flip
→ [process shard] → batch``.  The shuffle is global and reshuffled every epoch; augmentation
draws from a per-element generator derived from the seed and the element's position, so the
stream is a pure function of ``seed`` and the step: the iterator state saved in a checkpoint
(``iterator.get_state()``) restores it exactly.  With several processes, process ``p`` takes the
elements ``p, p + P, p + 2P, ...`` of the stream, so the union of the processes' local batches
``k`` is the single-process global batch ``k``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from lateral_jax.training.data.sources import DataError


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Per-channel ``(x / scale - mean) / std``; ``scale`` is 255 for uint8 images, 1 for floats."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: float = 255.0

    def apply(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32) / self.scale
        return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


IDENTITY = Normalisation((0.0,), (1.0,), 1.0)


def channel_stats(source: Any, *, max_examples: int = 5000, seed: int = 0) -> Normalisation:
    """Per-channel mean and std of (up to ``max_examples`` random) images of ``source``."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(source), size=min(max_examples, len(source)), replace=False)
    first = np.asarray(source[int(idx[0])]["image"])
    scale = 255.0 if first.dtype == np.uint8 else 1.0
    imgs = np.stack([np.asarray(source[int(i)]["image"], np.float32) / scale for i in idx])
    mean = imgs.mean(axis=(0, 1, 2))
    std = np.maximum(imgs.std(axis=(0, 1, 2)), 1e-6)
    return Normalisation(tuple(map(float, mean)), tuple(map(float, std)), scale)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random crop of the zero-padded image (``crop_padding`` pixels) and horizontal flip."""

    crop_padding: int = 4
    flip: bool = True

    def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = example["image"]
        if self.crop_padding:
            p = self.crop_padding
            h, w = image.shape[:2]
            padded = np.pad(image, ((p, p), (p, p), (0, 0)))
            top, left = rng.integers(0, 2 * p + 1, 2)
            image = padded[top : top + h, left : left + w]
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {**example, "image": np.ascontiguousarray(image)}


@dataclasses.dataclass(frozen=True)
class RandomResizedCrop:
    """A random part of the image — area ``scale`` (a fraction of the image's), aspect ratio
    ``ratio`` (log-uniform) — resized to ``size`` × ``size`` (bilinear), then a horizontal flip with
    probability 1/2: the ImageNet training augmentation.  After 10 draws that do not fit, the
    central square is taken."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def window(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of the crop."""
        area = height * width
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = np.exp(rng.uniform(np.log(self.ratio[0]), np.log(self.ratio[1])))
            w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        side = min(height, width)
        return (height - side) // 2, (width - side) // 2, side, side

    def __call__(self, example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image = example["image"]
        top, left, h, w = self.window(image.shape[0], image.shape[1], rng)
        image = resize(image[top : top + h, left : left + w], self.size)
        if self.flip and rng.random() < 0.5:
            image = image[:, ::-1]
        return {**example, "image": np.ascontiguousarray(image)}


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` [H, W, C] (float32) resized to ``size`` × ``size`` by bilinear interpolation (half-pixel centres)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image

    def grid(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(x).astype(np.int64)
        return lo, np.minimum(lo + 1, n - 1), (x - lo).astype(np.float32)

    (y0, y1, fy), (x0, x1, fx) = grid(h), grid(w)
    rows = image[y0] * (1 - fy)[:, None, None] + image[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central ``size`` × ``size`` of ``image`` (the evaluation view of a ``RandomResizedCrop`` model)."""
    h, w = image.shape[:2]
    if size > min(h, w):
        raise ValueError(f"crop_size={size} exceeds the {h}×{w} images; use a crop_size of at most {min(h, w)}.")
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def _decode(normalisation: Normalisation, crop_size: int | None = None):
    """Example → ``{"image": normalised f32[H, W, C], "label": i32}``, centre-cropped to ``crop_size`` if given."""

    def decode(example: dict[str, Any]) -> dict[str, np.ndarray]:
        image = np.asarray(example["image"])
        if image.ndim == 2:
            image = image[..., None]
        if crop_size is not None:
            image = center_crop(image, crop_size)
        return {"image": normalisation.apply(image), "label": np.int32(example["label"])}

    return decode


def check_batch_fits(global_batch_size: int, num_examples: int) -> None:
    """Raises a ``ValueError`` when one batch needs more examples than the training split holds."""
    if global_batch_size > num_examples:
        raise DataError(
            f"batch_size={global_batch_size} exceeds the {num_examples} training examples; "
            "pass a smaller batch_size or more training data."
        )


def train_dataset(
    source: Any,
    *,
    global_batch_size: int,
    seed: int,
    normalisation: Normalisation = IDENTITY,
    augmentation: Augmentation | RandomResizedCrop | None = None,
    crop_size: int | None = None,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 4,
):
    """An infinite (or ``num_epochs``) grain ``IterDataset`` of this process's training batches.

    ``crop_size``: without a :class:`RandomResizedCrop` augmentation (which makes its own), the
    images are centre-cropped to it."""
    import grain

    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {process_count} processes.")
    check_batch_fits(global_batch_size, len(source))
    own_crop = isinstance(augmentation, RandomResizedCrop)
    decode = _decode(normalisation, None if own_crop else crop_size)
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs).map(decode)
    if augmentation is not None:
        ds = ds.random_map(augmentation, seed=seed + 1)
    if process_count > 1:
        ds = ds[process_index::process_count]
    ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))


def eval_batches(
    source: Any,
    *,
    global_batch_size: int,
    normalisation: Normalisation = IDENTITY,
    crop_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, in batches padded with ``label = -1`` (this process's part);
    images centre-cropped to ``crop_size`` when given."""
    local = global_batch_size // process_count
    decode = _decode(normalisation, crop_size)
    n = len(source)
    num_batches = -(-n // global_batch_size)
    template = decode(source[0])
    for b in range(num_batches):
        images = np.zeros((local, *template["image"].shape), np.float32)
        labels = np.full((local,), -1, np.int32)
        for j in range(local):
            i = b * global_batch_size + process_index + j * process_count
            if i < n:
                ex = decode(source[i])
                images[j], labels[j] = ex["image"], ex["label"]
        yield {"image": images, "label": labels}


def measure_throughput(iterator: Iterator, *, num_batches: int = 20, warmup: int = 2) -> float:
    """Images per second of ``iterator`` alone (no model)."""
    for _ in range(warmup):
        next(iterator)
    t0 = time.perf_counter()
    count = 0
    for _ in range(num_batches):
        count += len(next(iterator)["label"])
    return count / (time.perf_counter() - t0)


def to_arrays(
    source: Any,
    normalisation: Normalisation = IDENTITY,
    *,
    crop_size: int | None = None,
    indices: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The examples ``indices`` (default: all) of ``source``, decoded and normalised (centre-cropped
    to ``crop_size``): ``(images f32[N, H, W, C], labels i32[N])``."""
    decode = _decode(normalisation, crop_size)
    examples = [decode(source[int(i)]) for i in (range(len(source)) if indices is None else indices)]
    return np.stack([e["image"] for e in examples]), np.asarray([e["label"] for e in examples], np.int32)
