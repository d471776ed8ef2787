"""The paper's datasets from their official release files, prepared without TensorFlow.

* MNIST and Fashion-MNIST: the four gzipped IDX files of each release
  (``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
  ``t10k-labels-idx1-ubyte.gz``).
* CIFAR-10: the python-pickle archive (``cifar-10-python.tar.gz``, folder ``cifar-10-batches-py/``)
  or the binary one (``cifar-10-binary.tar.gz``, folder ``cifar-10-batches-bin/``), as archives or
  extracted.
* Kaggle's Natural Images (``natural_images/<class>/<image>``, zip or folder) has no official split
  and needs a Kaggle login to download; it is read by the image-folder builder
  (:func:`lateral_jax.training.data.sources.image_folder_source`).

The files come from :mod:`lateral_jax.training.data.releases` (found in ``raw_dir``, or downloaded
and checked against the published size and SHA-256).  The readers check each file's format
(IDX magic numbers and sizes, the pickle's keys and shapes, the binary record length), so a
truncated or corrupt file raises :class:`CorruptFileError` naming it, and nothing half-written is
left behind.  :func:`official_sources` writes the official ``train`` and ``test`` splits once as
array_record (a tfds builder; tfds's own builders of these datasets import TensorFlow to prepare
them, this one does not) and returns random-access sources, the same form the pipeline reads for
every other dataset.  The prepared folder's name includes a hash of the release files, so other
files never share prepared data.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lateral_jax.training.data import sources
from lateral_jax.training.data.releases import (
    CLASS_NAMES,
    DATASETS,
    IMAGE_SHAPES,
    RELEASES,
    CorruptFileError,
    check_official,
    data_root,
    default_raw_dir,
    ensure_release,
    files_fingerprint,
    release_files,
)

# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8}


def read_idx(data: bytes, *, name: str) -> np.ndarray:
    """An IDX array (``magic = 0x0000 <dtype> <ndim>``, big-endian ``int32`` dims, then the values).

    ``data`` may be gzipped.  Raises :class:`CorruptFileError` naming ``name`` when the header is
    not IDX, the dtype is not ``uint8``, or the values are fewer or more than the dims say.
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise CorruptFileError(f"{name!r} is not a readable gzip file ({e}); it is truncated or corrupt.") from e
    if len(data) < 4 or data[:2] != b"\x00\x00":
        raise CorruptFileError(f"{name!r} is not an IDX file (its first bytes are {data[:4]!r}).")
    dtype, ndim = data[2], data[3]
    if dtype not in _IDX_DTYPES or not 1 <= ndim <= 4:
        raise CorruptFileError(f"{name!r}: IDX type 0x{dtype:02x} with {ndim} dims is not an image/label file.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptFileError(f"{name!r} is truncated inside its IDX header.")
    dims = tuple(int(d) for d in np.frombuffer(data, ">i4", ndim, 4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise CorruptFileError(
            f"{name!r} holds {len(data) - header} values after its header but its dims {dims} need {expected}; "
            "the file is truncated or corrupt: delete it and download it again."
        )
    return np.frombuffer(data, _IDX_DTYPES[dtype], expected, header).reshape(dims)


def read_idx_release(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images u8[N, 28, 28, 1], labels i64[N])`` of ``<prefix>-images-idx3-ubyte.gz`` and its labels."""
    image_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    label_file = folder / f"{prefix}-labels-idx1-ubyte.gz"
    images = read_idx(image_file.read_bytes(), name=str(image_file))
    labels = read_idx(label_file.read_bytes(), name=str(label_file))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CorruptFileError(
            f"{image_file} holds an array of shape {images.shape} and {label_file} one of {labels.shape}; expected "
            "[N, H, W] images and [N] labels of one N."
        )
    if labels.max(initial=0) > 9:
        raise CorruptFileError(f"{label_file} holds label {int(labels.max())}; these datasets have labels 0..9.")
    return images[..., None], labels.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, strings, numbers and NumPy arrays (the CIFAR batches need no more)."""

    _ALLOWED = {
        ("_codecs", "encode"),  # how protocol-2 pickles store bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def _cifar_pickle_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        images = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int64)
    except Exception as e:  # noqa: BLE001 - a damaged pickle raises many types
        raise CorruptFileError(
            f"{name!r} is not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); it is truncated or corrupt."
        ) from e
    if images.ndim != 2 or images.shape[1] != 3072 or len(images) != len(labels):
        raise CorruptFileError(
            f"{name!r}: data of shape {images.shape} with {len(labels)} labels; expected [N, 3072] and N labels."
        )
    return images, labels


def _cifar_binary_batch(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    if len(data) == 0 or len(data) % 3073:
        raise CorruptFileError(
            f"{name!r} is {len(data)} bytes, not a whole number of 3073-byte records (1 label + 32×32×3 pixels); "
            "it is truncated or corrupt."
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, 3073)
    return records[:, 1:], records[:, 0].astype(np.int64)


_CIFAR_BATCHES = {
    "py": ({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, _cifar_pickle_batch),
    "bin": ({"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}, _cifar_binary_batch),
}


def _cifar_members(path: Path) -> tuple[str, Callable[[str], bytes]]:
    """``(form, read(member name) -> bytes)`` of a CIFAR-10 release archive or extracted folder."""
    if path.is_dir():
        form = "py" if path.name.endswith("-py") else "bin"
        return form, lambda member: (path / member).read_bytes()
    form = "py" if "python" in path.name else "bin"
    prefix = f"cifar-10-batches-{form}/"
    try:
        with tarfile.open(path) as tf:
            contents = {m.name.removeprefix("./"): tf.extractfile(m).read() for m in tf if m.isfile()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise CorruptFileError(
            f"{str(path)!r} is not a readable .tar.gz archive ({e}); it is truncated or corrupt."
        ) from e
    return form, lambda member: contents[prefix + member]


def read_cifar10(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (u8[50000, 32, 32, 3], labels), "test": (u8[10000, 32, 32, 3], labels)}`` of a release.

    ``path``: ``cifar-10-binary.tar.gz``, ``cifar-10-python.tar.gz`` or one of the extracted folders
    ``cifar-10-batches-bin`` / ``cifar-10-batches-py``.
    """
    path = Path(path)
    form, read = _cifar_members(path)
    names, parse = _CIFAR_BATCHES[form]
    out = {}
    for split, members in names.items():
        parts = []
        for member in members:
            try:
                data = read(member)
            except (KeyError, FileNotFoundError):
                raise CorruptFileError(
                    f"{str(path)!r} has no {member!r}: a CIFAR-10 release holds {', '.join(sum(names.values(), []))}."
                ) from None
            parts.append(parse(data, f"{path}:{member}"))
        pixels = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.max(initial=0) > 9:
            raise CorruptFileError(f"{path}: label {int(labels.max())} in the {split} batches; CIFAR-10 has 0..9.")
        out[split] = (pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
    return out


def read_release(dataset: str, folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The official ``train`` and ``test`` splits of ``dataset`` from the release files in ``folder``."""
    if dataset == "cifar10":
        return read_cifar10(release_files(dataset, folder)[0])
    return {"train": read_idx_release(folder, "train"), "test": read_idx_release(folder, "t10k")}


# --------------------------------------------------------------------------------------------
# The array_record builder
# --------------------------------------------------------------------------------------------


def _make_builder_class():
    tfds = sources.import_tfds()

    class OfficialRelease(tfds.core.GeneratorBasedBuilder):
        """The official train/test splits of MNIST, Fashion-MNIST or CIFAR-10 from their release files.

        Prepared under ``data_dir/official_release/<dataset>_<hash>/`` (``hash``: of the files).
        """

        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, dataset: str, folder: Path, files: list[Path], **kwargs):
            self._dataset, self._folder = dataset, folder
            name = f"{dataset}_{files_fingerprint(files)}"
            config = tfds.core.BuilderConfig(name=name, description=f"{dataset} from {folder}")
            super().__init__(config=config, **kwargs)

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=IMAGE_SHAPES[self._dataset], dtype=np.uint8),
                        "label": tfds.features.ClassLabel(names=CLASS_NAMES[self._dataset]),
                    }
                ),
                supervised_keys=("image", "label"),
                disable_shuffling=True,  # example i of a split is example i of the release
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            splits = read_release(self._dataset, self._folder)
            return {split: self._generate_examples(*arrays) for split, arrays in splits.items()}

        def _generate_examples(self, images, labels):
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield i, {"image": image, "label": int(label)}

    return OfficialRelease


_BUILDER_CLASS = None


def official_sources(
    dataset: str,
    *,
    raw_dir: str | None = None,
    data_dir: str | None = None,
    download: bool = True,
    online: Callable[[str], bool] | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """``({"train": source, "test": source}, class names)``: the official splits, random access.

    The release files come from ``raw_dir`` (default :func:`default_raw_dir`), fetched when
    missing (:func:`ensure_release`); they are prepared once as array_record under ``data_dir``.
    """
    global _BUILDER_CLASS
    if dataset not in RELEASES:
        raise ValueError(f"dataset {dataset!r} has no official release reader; choose one of {DATASETS}.")
    folder = Path(raw_dir) if raw_dir else default_raw_dir(dataset, data_dir)
    files = ensure_release(dataset, folder, download=download, online=online)
    check_official(files, dataset)
    if _BUILDER_CLASS is None:
        _BUILDER_CLASS = _make_builder_class()
    builder = _BUILDER_CLASS(
        dataset=dataset, folder=folder, files=files, data_dir=str(data_root(data_dir)), file_format="array_record"
    )
    if not builder.is_prepared():
        sources.prepare(builder)
    return {split: builder.as_data_source(split=split) for split in ("train", "test")}, CLASS_NAMES[dataset]
