"""The paper's datasets from small files in each official format, prepared without TensorFlow."""

import dataclasses
import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from lateral_jax.training.data import official, releases

pytestmark = pytest.mark.filterwarnings("ignore:.*is not the published:UserWarning")
ROOT = Path(__file__).resolve().parents[1]


def idx_bytes(array: np.ndarray) -> bytes:
    """An array in the IDX format of the MNIST releases, gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def write_idx_release(folder: Path, seed: int = 0, sizes=(("train", 30), ("t10k", 10))) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in sizes:
        images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, (n,))
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(idx_bytes(images))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(idx_bytes(labels))
        arrays["test" if prefix == "t10k" else "train"] = (images, labels)
    return arrays


def cifar_arrays(seed: int = 0, per_batch: int = 4):
    """Six batches of channel-major rows (5 train, 1 test), as the releases store them."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (per_batch, 3072)), rng.integers(0, 10, (per_batch,))) for _ in range(6)]


def write_cifar(path: Path, form: str, batches) -> None:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    files = {}
    for name, (rows, labels) in zip(names, batches, strict=True):
        if form == "py":
            payload = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": rows.astype(np.uint8)}
            files[f"cifar-10-batches-py/{name}"] = pickle.dumps(payload, protocol=2)
        else:
            records = np.concatenate([labels[:, None], rows], axis=1).astype(np.uint8)
            files[f"cifar-10-batches-bin/{name}.bin"] = records.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with tarfile.open(path, "w:gz") as tf:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    else:
        for name, data in files.items():
            (path.parent / name).parent.mkdir(parents=True, exist_ok=True)
            (path.parent / name).write_bytes(data)


def as_arrays(source):
    return np.stack([source[i]["image"] for i in range(len(source))]), np.asarray(
        [source[i]["label"] for i in range(len(source))]
    )


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist"])
def test_idx_release_gives_the_official_splits_pixel_for_pixel(tmp_path, dataset):
    written = write_idx_release(tmp_path / "raw")
    with pytest.warns(UserWarning, match="is not the published train-images-idx3-ubyte.gz"):
        splits, names = official.official_sources(
            dataset, raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "data"), download=False
        )
    assert names == official.CLASS_NAMES[dataset] and len(names) == 10
    for split, (images, labels) in written.items():
        got_images, got_labels = as_arrays(splits[split])
        assert got_images.shape == (len(labels), 28, 28, 1) and got_images.dtype == np.uint8
        np.testing.assert_array_equal(got_images[..., 0], images)
        np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.parametrize(
    "layout", ["cifar-10-python.tar.gz", "cifar-10-binary.tar.gz", "cifar-10-batches-py", "cifar-10-batches-bin"]
)
def test_cifar10_release_forms_give_the_same_images(tmp_path, layout):
    """Each of the four forms of the release: pixels are stored channel-major (R plane, G, B) per row."""
    batches = cifar_arrays()
    form = "py" if "py" in layout else "bin"
    write_cifar(tmp_path / "raw" / (layout if layout.endswith(".gz") else "any"), form, batches)
    splits = official.read_cifar10(tmp_path / "raw" / layout)
    train_rows = np.concatenate([b[0] for b in batches[:5]])
    assert splits["train"][0].shape == (20, 32, 32, 3) and splits["test"][0].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(
        splits["train"][0][3, 5, 7], train_rows[3, [5 * 32 + 7, 1024 + 5 * 32 + 7, 2048 + 5 * 32 + 7]]
    )
    np.testing.assert_array_equal(splits["test"][1], batches[5][1])
    np.testing.assert_array_equal(splits["train"][1], np.concatenate([b[1] for b in batches[:5]]))


def test_cifar10_source_prepares_train_and_test(tmp_path):
    write_cifar(tmp_path / "raw" / "cifar-10-binary.tar.gz", "bin", cifar_arrays())
    splits, names = official.official_sources(
        "cifar10", raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "data"), download=False
    )
    assert (len(splits["train"]), len(splits["test"])) == (20, 4) and names[0] == "airplane"
    assert splits["train"][0]["image"].shape == (32, 32, 3)


def test_corrupt_files_are_named_and_nothing_half_written_is_left(tmp_path):
    raw = tmp_path / "raw"
    write_idx_release(raw)
    good = (raw / "train-images-idx3-ubyte.gz").read_bytes()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(gzip.decompress(good)[:-100]))
    with pytest.raises(
        official.CorruptFileError, match=r"train-images-idx3-ubyte.gz' holds 23420 values .* need 23520"
    ):
        official.official_sources("mnist", raw_dir=str(raw), data_dir=str(tmp_path / "data"), download=False)
    assert not (tmp_path / "data" / "official_release").exists()
    (raw / "train-images-idx3-ubyte.gz").write_bytes(good[: len(good) // 2])  # a cut download
    with pytest.raises(official.CorruptFileError, match="not a readable gzip file"):
        official.read_idx_release(raw, "train")
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"<html>not found</html>")
    with pytest.raises(official.CorruptFileError, match="is not an IDX file"):
        official.read_idx_release(raw, "train")
    (tmp_path / "cifar").mkdir()
    write_cifar(tmp_path / "cifar" / "any", "bin", cifar_arrays())
    bad = tmp_path / "cifar" / "cifar-10-batches-bin" / "data_batch_2.bin"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(official.CorruptFileError, match=r"data_batch_2.bin' is 12287 bytes, not a whole number"):
        official.read_cifar10(tmp_path / "cifar" / "cifar-10-batches-bin")
    archive = tmp_path / "cifar" / "cifar-10-python.tar.gz"
    write_cifar(archive, "py", cifar_arrays())
    archive.write_bytes(archive.read_bytes()[:-300])
    with pytest.raises(official.CorruptFileError, match="cifar-10-python.tar.gz' is not a readable .tar.gz archive"):
        official.read_cifar10(archive)


def test_pickles_with_other_globals_are_refused(tmp_path):
    """A CIFAR batch is unpickled with only NumPy arrays allowed: a pickle that calls os.system is refused."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(tmp_path / "any", "py", cifar_arrays())
    (folder / "data_batch_1").write_bytes(pickle.dumps(os.system, protocol=2))
    with pytest.raises(official.CorruptFileError, match="global posix.system is not allowed"):
        official.read_cifar10(folder)


def test_offline_without_the_files_says_what_to_put_where(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        official.official_sources(
            "mnist", raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path), online=lambda h: False
        )
    message = str(info.value)
    assert f"not in {tmp_path / 'raw'}" in message and "cannot reach the release's host" in message
    assert "train-images-idx3-ubyte.gz from https://storage.googleapis.com/cvdf-datasets/mnist/" in message
    assert "--config.data.raw_dir" in message
    with pytest.raises(FileNotFoundError, match="cifar-10-binary.tar.gz from .* \\(or any one of cifar-10-binary"):
        releases.ensure_release("cifar10", tmp_path, download=False)


def test_download_keeps_only_files_with_the_published_checksum(tmp_path, monkeypatch):
    """Downloads go through urllib (here from file:// addresses); a size or SHA-256 mismatch keeps nothing."""
    served = tmp_path / "served"
    written = write_idx_release(served)
    files = []
    for path in sorted(served.iterdir()):
        files.append(releases.ReleaseFile(path.name, path.as_uri(), path.stat().st_size, releases.sha256_of(path)))
    monkeypatch.setitem(releases.RELEASES, "mnist", tuple(files))
    splits, _ = official.official_sources(
        "mnist", raw_dir=str(tmp_path / "raw"), data_dir=str(tmp_path / "data"), online=lambda h: True
    )
    np.testing.assert_array_equal(as_arrays(splits["test"])[1], written["test"][1])
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(f.name for f in files)
    tampered = dataclasses.replace(files[0], sha256="0" * 64)
    with pytest.raises(releases.CorruptFileError, match=r"SHA-256 .* the release is .* It was not kept"):
        releases.fetch(tampered, tmp_path / "again")
    assert list((tmp_path / "again").iterdir()) == []


def test_preparing_and_reading_never_imports_tensorflow(tmp_path):
    """A stand-in ``tensorflow`` package first on the path records any import of it; preparing MNIST
    and CIFAR-10 from their files and reading them must leave no record."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    record = tmp_path / "tensorflow_was_imported"
    (fake / "__init__.py").write_text(f"open({str(record)!r}, 'w').close()\nraise ImportError('stand-in')\n")
    write_idx_release(tmp_path / "mnist")
    write_cifar(tmp_path / "cifar" / "cifar-10-binary.tar.gz", "bin", cifar_arrays())
    script = textwrap.dedent(
        f"""
        import sys, warnings
        warnings.simplefilter("ignore")
        from lateral_jax.training.data import official
        for name, raw in (("mnist", {str(tmp_path / "mnist")!r}), ("cifar10", {str(tmp_path / "cifar")!r})):
            splits, _ = official.official_sources(
                name, raw_dir=raw, data_dir={str(tmp_path / "data")!r}, download=False
            )
            assert splits["train"][3]["image"].sum() > 0
        assert "tensorflow" not in sys.modules
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    assert not record.exists()
