"""Inference with a trained run: class probabilities of new images, with the run's own preprocessing.

:func:`predict` reads every image of a folder or ``.tar`` / ``.tar.gz`` / ``.zip`` archive (any
nesting), prepares it exactly as the run's data pipeline prepared its images — decoded to the
run's channel count, resized to ``DataConfig.image_size`` (bilinear, as the image-folder builder
stores them), centre-cropped to ``crop_size`` when the run has one, normalised with the run's
per-channel statistics — and returns the softmax probabilities of the run's model at a saved step
(the newest readable checkpoint by default).  Batches are split over every device (data parallel,
the last batch padded).  An image's id is its file name without the extension.

Refusals name the file and the fix: a run folder without checkpoints, an image that cannot be
decoded (``bad_images="skip"`` leaves it out), an image with another channel count than the run's
(``channels="convert"`` converts it, as the training pipeline would), two images with one id.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import checkpoint, train
from lateral_jax.training.data import pipeline, sources
from lateral_jax.training.datasets import build_data
from lateral_jax.training.optimizer import make_optimizer
from lateral_jax.training.programs import build_model
from lateral_jax.training.run import load_run_config
from lateral_jax.training.rundir import atomic_write_text
from lateral_jax.training.sharding import batch_sharding, replicate, replicated

BadImages = Literal["error", "skip"]
Channels = Literal["error", "convert"]
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "F"})


class ChannelMismatchError(ValueError):
    """An image has another number of colour channels than the run was trained on."""


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What :func:`predict` returns: ``probabilities[i]`` is the softmax of image ``ids[i]``."""

    ids: list[str]
    probabilities: np.ndarray
    class_names: list[str]
    step: int
    skipped: list[str]

    @property
    def labels(self) -> np.ndarray:
        """The predicted class index of each image (classes in the run's order: sorted folder names)."""
        return self.probabilities.argmax(axis=1)

    def csv(self) -> str:
        """``id,label,class,p_<class>...``: one row per image, probabilities to 6 decimals."""
        header = ["id", "label", "class", *(f"p_{name}" for name in self.class_names)]
        rows = [",".join(header)]
        for image_id, label, probs in zip(self.ids, self.labels, self.probabilities, strict=True):
            rows.append(",".join([image_id, str(int(label)), self.class_names[label], *(f"{p:.6f}" for p in probs)]))
        return "\n".join(rows) + "\n"

    def write_csv(self, path: str | Path) -> None:
        """Writes :meth:`csv` to ``path`` atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.csv())


def natural_key(text: str) -> list[Any]:
    """``"img10"`` after ``"img9"``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def image_id(relative_path: str) -> str:
    """The id of an image: its file name without the extension (``a/b/0042.jpg`` → ``0042``)."""
    return Path(relative_path).stem


def colour_channels(mode: str) -> int:
    """Colour channels of a PIL image mode: 1 for grey levels (alpha aside), 3 otherwise."""
    return 1 if mode in _GREY_MODES else 3


def prepare_image(
    data: bytes,
    name: str,
    *,
    image_size: int | None,
    channels: int,
    normalisation: pipeline.Normalisation,
    crop_size: int | None,
    on_channels: Channels = "error",
) -> np.ndarray:
    """One image file as the run's model input, float32 ``[H, W, C]`` (see the module docstring)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as probe:
            mode = probe.mode
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a damaged file
        raise sources.BadImageError(f"image {name!r} cannot be decoded ({type(e).__name__}: {e})") from e
    if colour_channels(mode) != channels and on_channels == "error":
        kind = {1: "grey-level", 3: "colour"}
        raise ChannelMismatchError(
            f"image {name!r} is {kind[colour_channels(mode)]} (PIL mode {mode}) but the run was trained on "
            f"{channels}-channel images; convert the images, or pass channels='convert' "
            f"(--channels=convert) to convert them to {kind[channels]} as the training pipeline does."
        )
    image = sources.decode_image(data, image_size, channels, name=name)
    if crop_size is not None:
        image = pipeline.center_crop(image, crop_size)
    return normalisation.apply(image)


def read_images(
    path: str | Path,
    prepare: Callable[[bytes, str], np.ndarray],
    *,
    bad_images: BadImages = "error",
    progress: bool = False,
) -> tuple[list[str], np.ndarray, list[str]]:
    """``(ids, images [N, H, W, C], skipped names)`` of every image under ``path``, in natural id order."""
    if bad_images not in ("error", "skip"):
        raise ValueError(f"bad_images={bad_images!r} must be 'error' or 'skip'.")
    names = sources.list_image_names(path)
    if not names:
        raise ValueError(f"no images found in {str(path)!r} (looked for {', '.join(sources.IMAGE_SUFFIXES)} files).")
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(image_id(name), name)
        if other != name:
            raise ValueError(
                f"images {other!r} and {name!r} have the same id {image_id(name)!r} (the file name without its "
                "extension); rename one of them."
            )
    ids, images, skipped = [], [], []
    for name, data in _with_progress(sources.iter_image_files(path), len(names), progress):
        try:
            images.append(prepare(data, name))
        except sources.BadImageError as e:
            if bad_images == "error":
                raise sources.BadImageError(f"{e}; pass bad_images='skip' (--bad_images=skip) to leave it out.") from e
            skipped.append(name)
            continue
        ids.append(image_id(name))
    if not ids:
        raise ValueError(f"none of the {len(names)} images in {str(path)!r} could be decoded.")
    order = sorted(range(len(ids)), key=lambda i: natural_key(ids[i]))
    return [ids[i] for i in order], np.stack([images[i] for i in order]), skipped


def _with_progress(items: Iterator, total: int, progress: bool) -> Iterator:
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="decoding", unit="img")


def _progress_bar(total: int, progress: bool) -> Any:
    """A bar counting images (``None`` without ``progress``)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="images", unit="img")


def restore_params(
    workdir: Path, model: Any, tx: Any, input_shape: tuple[int, ...], step: int | None
) -> tuple[int, Any]:
    """``(step, params)`` of the run's newest readable checkpoint, or of ``step``."""
    directory = workdir / "checkpoints"
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise FileNotFoundError(
            f"{directory} holds no checkpoint: {workdir} has not been trained (or was trained with "
            "keep_checkpoints=0); train it first or pass the folder of a trained run."
        )
    mesh = make_mesh()
    target = replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, *input_shape))), mesh)
    ckpt = checkpoint.Checkpointer(directory)
    try:
        restored = ckpt.restore(target, step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {directory} is readable; retrain the run.")
    return restored[0], restored[1].params


def probabilities(
    model: Any, params: Any, images: np.ndarray, *, batch_size: int, progress: bool = False
) -> np.ndarray:
    """Softmax outputs of ``model`` for ``images`` in batches split over every device (the last padded)."""
    mesh = make_mesh()
    batch_size = -(-batch_size // mesh.size) * mesh.size
    params = replicate(params, mesh)
    forward = jax.jit(
        lambda p, x: jax.nn.softmax(model.apply({"params": p}, x).logits.astype(jnp.float32), axis=-1),
        in_shardings=(replicated(mesh), batch_sharding(mesh)),
        out_shardings=batch_sharding(mesh),
    )
    out = []
    bar = _progress_bar(len(images), progress)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(jax.device_get(forward(params, padded)))[: len(chunk)])
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return np.concatenate(out)


def predict(
    workdir: str | Path,
    images: str | Path,
    *,
    step: int | None = None,
    batch_size: int = 256,
    bad_images: BadImages = "error",
    channels: Channels = "error",
    progress: bool = False,
) -> Predictions:
    """Class probabilities of the run in ``workdir`` for every image under ``images``.

    ``step``: the checkpoint to use (default: the newest readable one).  ``bad_images="skip"``
    leaves out images that cannot be decoded (listed in ``Predictions.skipped``);
    ``channels="convert"`` converts grey-level images for a colour run and back, as the training
    pipeline does, instead of refusing them.
    """
    if channels not in ("error", "convert"):
        raise ValueError(f"channels={channels!r} must be 'error' or 'convert'.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")
    workdir = Path(workdir)
    config = load_run_config(workdir)
    data = build_data(config.data, config.seed)
    model = build_model(config.model, data.num_classes, data.input_shape)
    tx = make_optimizer(config.optimizer, ei_mode=config.model.ei_mode)
    if data.normalisation.scale != 255.0:
        raise ValueError(
            f"the run in {workdir} trained on float arrays (dataset={config.data.dataset!r}), not on image files; "
            "predict reads image files, so use it with a run trained on images (image_folder, tfds, mnist, ...)."
        )
    used_step, params = restore_params(workdir, model, tx, data.input_shape, step)

    def prepare(raw: bytes, name: str) -> np.ndarray:
        return prepare_image(
            raw,
            name,
            image_size=config.data.image_size if config.data.crop_size else data.input_shape[0],
            channels=data.input_shape[-1],
            normalisation=data.normalisation,
            crop_size=config.data.crop_size,
            on_channels=channels,
        )

    ids, arrays, skipped = read_images(images, prepare, bad_images=bad_images, progress=progress)
    probs = probabilities(model, params, arrays, batch_size=batch_size, progress=progress)
    return Predictions(ids, probs, list(data.class_names), used_step, skipped)
