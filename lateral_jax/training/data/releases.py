"""Where the official release files of MNIST, Fashion-MNIST and CIFAR-10 are, and how they are fetched.

:data:`RELEASES` lists each release's files with their published address, size and SHA-256.  The
files are looked for in a folder (``raw_dir``; default ``<data_dir>/raw/<dataset>``); a missing one
is downloaded when the machine is online and kept only when its size and SHA-256 are the published
ones (:func:`fetch`); offline, :func:`ensure_release` says which files to put where.  Reading them
is :mod:`lateral_jax.training.data.official`'s job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from pathlib import Path

from lateral_jax.training.data import sources


class CorruptFileError(ValueError):
    """A release file is truncated, corrupt or not in its format; the message names it."""


@dataclasses.dataclass(frozen=True)
class ReleaseFile:
    """One file of an official release: where it is published, its size in bytes and its SHA-256."""

    name: str
    url: str
    size: int
    sha256: str


_MNIST = "https://storage.googleapis.com/cvdf-datasets/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def _idx_release(base: str, sizes_and_hashes: dict[str, tuple[int, str]]) -> tuple[ReleaseFile, ...]:
    return tuple(ReleaseFile(name, base + name, size, digest) for name, (size, digest) in sizes_and_hashes.items())


# Sizes and SHA-256 of the published files (the values the releases' mirrors are verified with).
RELEASES: dict[str, tuple[ReleaseFile, ...]] = {
    "mnist": _idx_release(
        _MNIST,
        {
            "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
            "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
            "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
            "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
        },
    ),
    "fashion_mnist": _idx_release(
        _FASHION,
        {
            "train-images-idx3-ubyte.gz": (
                26421880,
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            ),
            "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
            "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
            "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
        },
    ),
    "cifar10": (
        ReleaseFile(
            "cifar-10-binary.tar.gz",
            "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
            170052171,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
        ),
    ),
}
DATASETS = tuple(RELEASES)
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "t-shirt/top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
IMAGE_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
# Any one of these, as an archive or extracted, is a complete CIFAR-10 release.
CIFAR10_FORMS = ("cifar-10-binary.tar.gz", "cifar-10-python.tar.gz", "cifar-10-batches-bin", "cifar-10-batches-py")


def data_root(data_dir: str | None = None) -> Path:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def default_raw_dir(dataset: str, data_dir: str | None = None) -> Path:
    """``<data_root>/raw/<dataset>`` (:func:`data_root`)."""
    return data_root(data_dir) / "raw" / dataset


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Finding and fetching the files
# --------------------------------------------------------------------------------------------


def release_files(dataset: str, folder: Path) -> list[Path]:
    """The release files of ``dataset`` present in ``folder`` (CIFAR-10: the first complete form
    of :data:`CIFAR10_FORMS`); ``[]`` when one is missing."""
    if dataset == "cifar10":
        return next(([folder / form] for form in CIFAR10_FORMS if (folder / form).exists()), [])
    paths = [folder / f.name for f in RELEASES[dataset]]
    return paths if all(p.is_file() for p in paths) else []


def _host(url: str) -> str:
    return urllib.parse.urlparse(url).hostname or "localhost"


def fetch(file: ReleaseFile, folder: Path, *, timeout: float = 60.0) -> Path:
    """Downloads ``file`` into ``folder``; keeps it only when its size and SHA-256 are the published ones.

    The download goes to ``.<name>.part`` and is renamed when verified; on any failure the partial
    file is removed and the error names the address.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target, part = folder / file.name, folder / f".{file.name}.part"
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(file.url, timeout=timeout) as response, part.open("wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                size += len(block)
                out.write(block)
        if size != file.size or digest.hexdigest() != file.sha256:
            raise CorruptFileError(
                f"the download of {file.url} is {size} bytes with SHA-256 {digest.hexdigest()}; the release is "
                f"{file.size} bytes with SHA-256 {file.sha256}. It was not kept; try again later, or download it "
                f"yourself into {folder}."
            )
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return target


def ensure_release(
    dataset: str, folder: Path, *, download: bool = True, online: Callable[[str], bool] | None = None
) -> list[Path]:
    """The release files of ``dataset`` in ``folder``, downloading the missing ones when allowed.

    Raises ``FileNotFoundError`` saying which files to put where when they are missing and cannot
    be downloaded (``download=False`` or no connection to the release's host).
    """
    present = release_files(dataset, folder)
    if present:
        return present
    reachable = online or (lambda host: sources.internet_available(host))
    missing = [f for f in RELEASES[dataset] if not (folder / f.name).is_file()]
    if download and all(reachable(_host(f.url)) for f in missing):
        for f in missing:
            fetch(f, folder)
        return release_files(dataset, folder)
    listing = "; ".join(f"{f.name} from {f.url} (sha256 {f.sha256})" for f in missing)
    also = f" (or any one of {', '.join(CIFAR10_FORMS)})" if dataset == "cifar10" else ""
    why = "download=False" if not download else "this machine cannot reach the release's host"
    raise FileNotFoundError(
        f"{dataset}: the official release files are not in {folder} and {why}. Put {listing}{also} into {folder}, "
        "or point --config.data.raw_dir at the folder that holds them."
    )


def check_official(paths: list[Path], dataset: str) -> None:
    """Warns when a file named like a release file is not the published one (another SHA-256)."""
    published = {f.name: f.sha256 for f in RELEASES[dataset]}
    for path in paths:
        if path.name in published and path.is_file() and sha256_of(path) != published[path.name]:
            warnings.warn(
                f"{path} is not the published {path.name} (SHA-256 differs from {published[path.name]}); results on "
                "it are not comparable with results on the official release.",
                UserWarning,
                stacklevel=3,
            )


def files_fingerprint(paths: list[Path]) -> str:
    """A short hash of the release files' bytes (of a folder's files, for an extracted release)."""
    digest = hashlib.blake2b(digest_size=8)
    for path in paths:
        digest.update(sources.archive_fingerprint(path).encode())
    return digest.hexdigest()
