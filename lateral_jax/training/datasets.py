"""The examples of a run: build the training, validation and test sources a ``DataConfig`` names.

Every dataset gets a validation split that is not its test split: the dataset's own validation
split (an image folder's ``val/``), else a seeded, class-stratified ``validation_fraction`` of the
training split.  A dataset's own ``test`` split (the official MNIST, Fashion-MNIST and CIFAR-10
test sets, an image folder's ``test/``) is kept apart as ``Data.test`` and evaluated once, at the
end of a run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from lateral_jax.training.config import SYNTHETIC, DataConfig
from lateral_jax.training.data import official, pipeline, sources, synthetic


@dataclasses.dataclass
class Data:
    """The splits of a run (random-access sources) and what the model needs to know about them."""

    train: Any
    validation: Any
    normalisation: pipeline.Normalisation
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]
    test: Any | None = None


class Resized:
    """``source`` with each image resized to ``size`` × ``size`` (bilinear; as the image-folder
    builder stores images), for sources whose images differ in size (tfds's ``imagenet2012``)."""

    def __init__(self, source: Any, size: int):
        self.source, self.size = source, int(size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from PIL import Image

        example = dict(self.source[index])
        image = np.asarray(example["image"])
        if image.shape[:2] != (self.size, self.size):
            squeezed = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
            resized = np.asarray(Image.fromarray(squeezed).resize((self.size, self.size), Image.BILINEAR))
            image = resized.reshape(self.size, self.size, *image.shape[2:])
        example["image"] = image
        return example


@functools.lru_cache(maxsize=8)
def _generated(name: str, num_examples: int, seed: int, task: tuple[tuple[str, Any], ...]) -> dict[str, np.ndarray]:
    """The generated examples of a synthetic task, made once per process (several seeds of a study
    or of the main job share them); the arrays are read-only."""
    arrays = synthetic.make_task(name, num_examples, seed=seed, **dict(task))
    for array in arrays.values():
        array.flags.writeable = False
    return arrays


def _subset(source: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(source):
        return source
    labels = sources.labels_of(source)
    _, keep = sources.train_validation_split(labels, validation_fraction=size / len(source), seed=seed + 7)
    return sources.Subset(source, keep)


def build_data(config: DataConfig, seed: int) -> Data:
    """The training and validation sources of ``config`` (``config.seed``, or else ``seed``, seeds
    the generated examples and the splits)."""
    seed = seed if config.seed is None else config.seed
    if config.dataset in SYNTHETIC:
        train_arrays = _generated(config.dataset, config.num_train, seed, config.task)
        val_arrays = _generated(config.dataset, config.num_validation, seed + 10_000, config.task)
        tr, va = sources.ArraySource(train_arrays), sources.ArraySource(val_arrays)
        tr = _subset(tr, config.train_subset, seed)
        return Data(tr, va, pipeline.IDENTITY, 2, tr[0]["image"].shape, ["absent", "present"])
    test = None
    if config.dataset == "image_folder":
        splits, names = sources.image_folder_sources(
            config.archive, image_size=config.image_size, data_dir=config.data_dir, bad_images=config.bad_images
        )
        if len(names) < 2:
            raise sources.DataError(
                f"archive={config.archive!r} holds {len(names)} class(es) {list(names)}; a classifier needs at "
                "least two <class>/<image> folders."
            )
        if "train" not in splits:
            raise ValueError(f"archive={config.archive!r} has no training images; it has the splits {list(splits)}.")
        full, own_validation, test = splits["train"], splits.get("validation"), splits.get("test")
    elif config.dataset == "tfds":  # images of any size, resized to image_size as they are read

        def split_of(name: str) -> Any:
            source = sources.tfds_source(config.tfds_name, name, data_dir=config.data_dir, download=config.download)
            return Resized(source, config.image_size)

        full, own_validation = split_of("train"), split_of("validation")
        names = sources.tfds_class_names(full.source)
    else:
        kwargs = dict(raw_dir=config.raw_dir, data_dir=config.data_dir, download=config.download)
        splits, names = official.official_sources(config.dataset, **kwargs)
        full, own_validation, test = splits["train"], None, splits["test"]
    if own_validation is None:
        train_idx, val_idx = sources.train_validation_split(
            sources.labels_of(full), validation_fraction=config.validation_fraction, seed=seed
        )
        tr, va = sources.Subset(full, train_idx), sources.Subset(full, val_idx)
    else:
        tr, va = sources.Subset(full), sources.Subset(own_validation)
    test = None if test is None else sources.Subset(test)
    tr = _subset(tr, config.train_subset, seed)
    norm = pipeline.channel_stats(tr, seed=seed)
    image = np.asarray(tr[0]["image"])
    shape = image.shape if image.ndim == 3 else (*image.shape, 1)
    if config.crop_size is not None:
        shape = (config.crop_size, config.crop_size, shape[-1])
    return Data(tr, va, norm, len(names), tuple(shape), list(names), test)
