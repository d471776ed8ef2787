"""Random-access data sources without TensorFlow.

* :func:`tfds_source` — a dataset prepared by tfds (e.g. ``imagenet2012``) as a
  ``tfds.data_source`` (array_record).  Reading it needs no TensorFlow; preparing it is tfds's
  builder's job (many of tfds's builders import TensorFlow to prepare: MNIST, Fashion-MNIST and
  CIFAR-10 are prepared without it from their release files by
  :mod:`lateral_jax.training.data.official`).  Offline and absent, it fails at once (tfds would retry).
* :class:`ImageFolderArchive` — a tfds builder for images laid out ``[<split>/]<class>/<image>``
  in a ``.tar``/``.tar.gz``/``.zip`` archive or a folder (CIFAR-10 JPEG archive, Kaggle's Natural
  Images), written once as array_record and then read with random access.
* :class:`ArraySource` — in-memory arrays (the synthetic tasks).
* :func:`train_validation_split` — a deterministic, seeded, class-stratified split.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import socket
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_NAMES = {"train": "train", "test": "test", "validation": "validation", "val": "validation", "valid": "validation"}
BAD_IMAGE_POLICIES = ("error", "skip")


class ArraySource:
    """Random access into a dict of equal-length arrays: ``source[i] = {k: v[i]}``."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"arrays must have equal lengths; got {lengths}.")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[index] for k, v in self.arrays.items()}


class Subset:
    """The examples ``indices`` of ``source``, by ``__getitem__`` only.

    Reads one index at a time (``tfds.testing.mock_data``'s batched ``__getitems__`` is broken).
    """

    def __init__(self, source: Any, indices: Sequence[int] | None = None):
        self.source = source
        self.indices = np.arange(len(source)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[index])]


def labels_of(source: Any) -> np.ndarray:
    """All labels of a source (fast path for :class:`ArraySource`)."""
    if isinstance(source, ArraySource):
        return np.asarray(source.arrays["label"])
    if isinstance(source, Subset) and isinstance(source.source, ArraySource):
        return np.asarray(source.source.arrays["label"])[source.indices]
    return np.asarray([int(source[i]["label"]) for i in range(len(source))])


def train_validation_split(
    labels: np.ndarray, *, validation_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified split of ``range(len(labels))`` into (train, validation) indices."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction!r} must lie in (0, 1).")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = int(round(validation_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# --------------------------------------------------------------------------------------------
# Registered tfds datasets
# --------------------------------------------------------------------------------------------


TFDS_PROGRESS = {"show": True}  # tfds's progress bars while it prepares data (entry points: off)


def import_tfds():
    """``tensorflow_datasets`` (the data extra), or an ``ImportError`` saying how to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("tfds datasets need the data extra: pip install 'lateral_jax[data]'") from e
    tfds.display_progress_bar(TFDS_PROGRESS["show"])
    return tfds


def internet_available(host: str = "storage.googleapis.com", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether tfds's download host answers within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    download: bool = True,
    online: Callable[[], bool] = internet_available,
) -> Any:
    """A random-access ``tfds.data_source`` of a tfds dataset (array_record format).

    Raises ``FileNotFoundError`` at once when the dataset is not prepared in ``data_dir`` and it
    cannot be downloaded (``download=False`` or no internet).
    """
    tfds = import_tfds()
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return builder.as_data_source(split=split)
    can_download = download and online()
    if can_download:
        builder.download_and_prepare(file_format="array_record")
        return builder.as_data_source(split=split)
    try:  # data prepared elsewhere in tfds's search path (or tfds.testing.mock_data)
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # noqa: BLE001 - tfds raises several types for "absent"
        where = builder.data_dir
        if not download:
            raise FileNotFoundError(
                f"tfds dataset {name!r} is not prepared at {where} and download=False; prepare it on a machine "
                f"with internet (python -c \"import tensorflow_datasets as tfds; tfds.data_source('{name}')\") "
                "and copy the folder, or pass data_dir=... where it is."
            ) from e
        raise FileNotFoundError(
            f"tfds dataset {name!r} is not prepared at {where} and this machine cannot reach the internet to "
            "download it; copy a prepared tfds folder there (data_dir=...), or use an embedded synthetic task "
            "(dataset='contour' or 'pathfinder') or a local image archive (dataset='image_folder')."
        ) from e


# --------------------------------------------------------------------------------------------
# Local image folders / archives
# --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _archive_kind(path: Path) -> str:
    """``"dir"``, ``"zip"`` or ``"tar"``; raises a clear error for anything else."""
    if not path.exists():
        raise FileNotFoundError(
            f"image archive or folder {str(path)!r} does not exist; check archive=... in the config."
        )
    if path.is_dir():
        return "dir"
    if zipfile.is_zipfile(path):
        return "zip"
    if tarfile.is_tarfile(path):
        return "tar"
    raise ValueError(f"{str(path)!r} is neither a folder nor a .tar/.tar.gz/.zip archive.")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def iter_image_files(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Yields ``(relative path, bytes)`` of every image in a folder, ``.tar(.gz)`` or ``.zip``."""
    path = Path(path)
    kind = _archive_kind(path)
    if kind == "dir":
        for file in sorted(path.rglob("*")):
            if file.is_file() and _is_image(file.name):
                yield file.relative_to(path).as_posix(), file.read_bytes()
    elif kind == "zip":
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if _is_image(name):
                    yield name, zf.read(name)
    else:
        with tarfile.open(path) as tf:
            for member in tf:
                if member.isfile() and _is_image(member.name):
                    yield member.name, tf.extractfile(member).read()


def list_image_names(path: str | os.PathLike) -> list[str]:
    """Relative names of the images in a folder or archive, without reading the images."""
    path = Path(path)
    kind = _archive_kind(path)
    if kind == "dir":
        names = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    elif kind == "zip":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    else:
        with tarfile.open(path) as tf:
            names = [m.name for m in tf if m.isfile()]
    return sorted(n for n in names if _is_image(n))


def split_and_class(relative_path: str) -> tuple[str, str]:
    """``train/cat/0001.jpg`` → (``train``, ``cat``); ``natural_images/cat/x.jpg`` → (``train``, ``cat``).

    The split is the folder above the class folder when it is named train/test/val(idation);
    otherwise the image belongs to ``train``.
    """
    parts = relative_path.strip("/").split("/")
    if len(parts) < 2:
        raise ValueError(f"image {relative_path!r} is not inside a class folder (<class>/<image>).")
    split = SPLIT_NAMES.get(parts[-3].lower(), "train") if len(parts) >= 3 else "train"
    return split, parts[-2]


def archive_fingerprint(path: str | os.PathLike) -> str:
    """A short hash that changes when the images change: of the bytes of an archive file, or of
    the relative names, sizes and modification times of a folder's files."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=8)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    else:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


class DataError(ValueError):
    """The data cannot serve the run: an empty or one-class archive, an image that cannot be decoded,
    a batch larger than the training split.  Entry points refuse it with one line (exit 2)."""


class BadImageError(DataError):
    """An image in an archive cannot be decoded; the message names it."""


def decode_image(data: bytes, image_size: int | None, channels: int = 3, *, name: str = "<bytes>") -> np.ndarray:
    """The image ``data`` as uint8 ``[H, W, channels]``, resized to ``image_size``²; raises
    :class:`BadImageError` naming ``name`` when it cannot be decoded."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises several types for a damaged file
        raise BadImageError(f"image {name!r} cannot be decoded ({type(e).__name__}: {e})") from e
    img = img.convert("RGB" if channels == 3 else "L")
    if image_size is not None and img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(img, np.uint8)
    return arr if arr.ndim == 3 else arr[..., None]


def _make_builder_class():
    tfds = import_tfds()

    class ImageFolderArchive(tfds.core.GeneratorBasedBuilder):
        """Images laid out ``[<split>/]<class>/<image>`` in an archive or folder, as uint8 tensors.

        Classes are the sorted class-folder names.  Construct with ``archive=`` and ``image_size=``;
        the prepared data lives under ``data_dir/image_folder_archive/<name>_<size>_<channels>_<hash>/``
        where ``hash`` is :func:`archive_fingerprint` of the archive's content, so two archives of
        one name never share prepared data.  ``bad_images``: ``"error"`` (default) stops at the
        first image that cannot be decoded, naming it; ``"skip"`` leaves such images out (listed
        in ``skipped`` and warned about).
        """

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, archive: str, image_size: int, channels: int = 3, bad_images: str = "error", **kwargs):
            self._archive = str(archive)
            self._image_size = int(image_size)
            self._channels = int(channels)
            self._bad_images = bad_images
            self.skipped: list[str] = []
            fingerprint = archive_fingerprint(self._archive)
            name = _slug(f"{Path(self._archive).name}_{self._image_size}_{self._channels}_{fingerprint}")
            self._splits, self._classes = self._scan()
            config = tfds.core.BuilderConfig(name=name, description=f"{self._archive} at {self._image_size}px")
            super().__init__(config=config, **kwargs)

        def _scan(self) -> tuple[list[str], list[str]]:
            """(splits, classes) from the file names alone (no image is decoded)."""
            names = list_image_names(self._archive)
            if not names:
                raise DataError(f"no images found in {self._archive!r}; expected [<split>/]<class>/<image> files.")
            pairs = {split_and_class(n) for n in names}
            return sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs})

        def _info(self):
            s, c = self._image_size, self._channels
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(s, s, c), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=self._classes),
                    }
                ),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(split) for split in self._splits}

        def _generate_examples(self, split):
            lookup = {c: i for i, c in enumerate(self._classes)}
            for name, data in iter_image_files(self._archive):
                file_split, cls = split_and_class(name)
                if file_split != split:
                    continue
                try:
                    image = decode_image(data, self._image_size, self._channels, name=name)
                except BadImageError as e:
                    if self._bad_images == "skip":
                        self.skipped.append(name)
                        continue
                    raise BadImageError(
                        f"{e}; it is in {self._archive!r}. Remove or replace it, or pass "
                        "DataConfig.bad_images='skip' to leave out images that cannot be decoded."
                    ) from e
                yield name, {"image": image, "label": lookup[cls]}

    return ImageFolderArchive


_BUILDER_CLASS = None


def image_folder_builder(
    archive: str, *, image_size: int, channels: int = 3, data_dir: str | None = None, bad_images: str = "error"
):
    """The :class:`ImageFolderArchive` builder for ``archive``."""
    global _BUILDER_CLASS
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images={bad_images!r} must be one of {BAD_IMAGE_POLICIES}.")
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    return _BUILDER_CLASS(
        archive=archive,
        image_size=image_size,
        channels=channels,
        bad_images=bad_images,
        data_dir=data_dir,
        file_format="array_record",
    )


def prepare(builder: Any) -> None:
    """Prepares ``builder``'s data; on any failure removes what it wrote (no half-prepared cache).

    Processes of one machine that prepare the same data at once (the shards of a study) take turns
    on a lock file in the temporary folder, named by the data's path: the first prepares, the
    others then find the data prepared and read it.
    """
    import fcntl
    import tempfile

    config_dir = Path(builder.data_dir).parent
    name = hashlib.blake2b(str(config_dir.resolve()).encode(), digest_size=8).hexdigest()
    with open(Path(tempfile.gettempdir()) / f"lateral_jax-prepare-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if builder.is_prepared():  # another process prepared it while this one waited
            builder.info.read_from_directory(builder.data_dir)
            return
        existed = config_dir.exists()
        try:
            builder.download_and_prepare(file_format="array_record")
        except BaseException:
            if not existed:
                shutil.rmtree(config_dir, ignore_errors=True)
                if config_dir.parent.exists() and not any(config_dir.parent.iterdir()):
                    config_dir.parent.rmdir()
            raise
    skipped = getattr(builder, "skipped", [])
    if skipped:
        shown = ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"bad_images='skip': left out {len(skipped)} image(s) of {builder._archive!r} that cannot be "
            f"decoded: {shown}",
            RuntimeWarning,
            stacklevel=3,
        )


def image_folder_sources(
    archive: str,
    *,
    image_size: int,
    channels: int = 3,
    data_dir: str | None = None,
    bad_images: str = "error",
) -> tuple[dict[str, Any], list[str]]:
    """``({split: random-access source}, class names)`` of a local image archive (prepared on first use)."""
    builder = image_folder_builder(
        archive, image_size=image_size, channels=channels, data_dir=data_dir, bad_images=bad_images
    )
    if not builder.is_prepared():
        prepare(builder)
    splits = {split: builder.as_data_source(split=split) for split in builder.info.splits.keys()}
    return splits, builder.info.features["label"].names


def image_folder_source(
    archive: str,
    split: str,
    *,
    image_size: int,
    channels: int = 3,
    data_dir: str | None = None,
    bad_images: str = "error",
) -> Any:
    """``(random-access source, class names)`` of one split of a local image archive."""
    splits, names = image_folder_sources(
        archive, image_size=image_size, channels=channels, data_dir=data_dir, bad_images=bad_images
    )
    if split not in splits:
        raise ValueError(f"split {split!r} is not in {archive!r}; it has {list(splits)}.")
    return splits[split], names


def tfds_class_names(source: Any) -> list[str]:
    """The label names of a ``tfds.data_source`` (from its dataset info)."""
    return list(source.dataset_info.features["label"].names)
