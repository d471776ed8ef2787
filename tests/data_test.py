"""Tests of the data layer: synthetic tasks, tfds sources, the local archive builder, grain pipelines."""

import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lateral_jax.training.data import pipeline, sources, synthetic

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg-train.tar.gz"


# ------------------------------------------------------------------------------------------
# Synthetic tasks
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["contour", "pathfinder"])
def test_synthetic_tasks_are_deterministic_and_balanced(name):
    a = synthetic.make_task(name, 64, seed=3)
    b = synthetic.make_task(name, 64, seed=3)
    c = synthetic.make_task(name, 64, seed=4)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])
    assert a["image"].shape == (64, 32, 32, 1) and a["image"].dtype == np.float32
    assert a["label"].sum() == 32  # exactly balanced
    assert a["image"].min() >= -1.0 and a["image"].max() <= 1.0


def test_contour_positives_and_negatives_differ_only_in_path_alignment():
    """Same generator state: identical positions, amplitudes, phases and background; only the path's
    orientations differ (aligned to the path tangent for positives, random for negatives)."""
    spec = synthetic.ContourSpec()
    pos = synthetic.contour_elements(np.random.default_rng(0), np.ones(16, np.int32), spec)
    neg = synthetic.contour_elements(np.random.default_rng(0), np.zeros(16, np.int32), spec)
    for name, p, n in zip(
        ("x", "y", "amplitude", "phase"),
        (pos[0], pos[1], pos[3], pos[4]),
        (neg[0], neg[1], neg[3], neg[4]),
        strict=True,
    ):
        np.testing.assert_array_equal(p, n, err_msg=name)
    length = spec.path_length
    np.testing.assert_array_equal(pos[2][:, length:], neg[2][:, length:])  # background orientations
    assert np.all(pos[2][:, :length] != neg[2][:, :length])
    # positives: each path element is oriented along the segment to its neighbour (within the turn)
    x, y, theta = pos[0][:, :length], pos[1][:, :length], pos[2][:, :length]
    seg = np.arctan2(np.diff(y, axis=1), np.diff(x, axis=1))
    diff = np.abs(np.angle(np.exp(2j * (theta[:, :-1] - seg)))) / 2  # orientation difference mod π
    assert np.degrees(diff).max() < spec.path_angle + 15
    # the element count (amplitude-weighted) has the same distribution: here identical
    assert pos[3].sum() == neg[3].sum()


def test_pathfinder_classes_have_the_same_curves_and_two_markers():
    spec = synthetic.PathfinderSpec()
    data = synthetic.pathfinder_images(256, seed=0, spec=spec)
    bright = (data["image"][..., 0] > 0.9).reshape(256, -1).sum(axis=1)
    by_label = [bright[data["label"] == k].mean() for k in (0, 1)]
    assert abs(by_label[0] - by_label[1]) / max(by_label) < 0.15  # the same amount of marker ink


def test_synthetic_spec_errors():
    with pytest.raises(ValueError, match="path_length=1 must be >= 2"):
        synthetic.ContourSpec(path_length=1)
    with pytest.raises(ValueError, match="num_curves=1 must be >= 2"):
        synthetic.PathfinderSpec(num_curves=1)
    with pytest.raises(ValueError, match="synthetic task 'mazes' is unknown"):
        synthetic.make_task("mazes", 4, seed=0)


def test_generators_outpace_training():
    t0 = time.perf_counter()
    synthetic.make_task("contour", 1024, seed=0)
    rate = 1024 / (time.perf_counter() - t0)
    print(f"contour generation: {rate:.0f} images/s")
    assert rate > 0


# ------------------------------------------------------------------------------------------
# Sources and splits
# ------------------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_disjoint():
    labels = np.repeat(np.arange(4), 25)
    tr, va = sources.train_validation_split(labels, validation_fraction=0.2, seed=1)
    tr2, va2 = sources.train_validation_split(labels, validation_fraction=0.2, seed=1)
    np.testing.assert_array_equal(va, va2)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 100
    np.testing.assert_array_equal(np.bincount(labels[va]), [5, 5, 5, 5])
    with pytest.raises(ValueError, match="validation_fraction=1.5 must lie in"):
        sources.train_validation_split(labels, validation_fraction=1.5, seed=0)


def test_tfds_mock_data_source_through_the_pipeline():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
        src = sources.Subset(sources.tfds_source("mnist", "train", download=False, online=lambda: False))
        assert len(src) == 40
        norm = pipeline.channel_stats(src)
        ds = pipeline.train_dataset(src, global_batch_size=8, seed=0, normalisation=norm)
        batch = next(iter(ds))
    assert batch["image"].shape == (8, 28, 28, 1) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].min() >= 0
    assert abs(float(batch["image"].mean())) < 1.0


def test_absent_registered_dataset_fails_fast_offline(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="cannot reach the internet"):
        sources.tfds_source("cifar10", "train", data_dir=str(tmp_path), download=True, online=lambda: False)
    with pytest.raises(FileNotFoundError, match="download=False"):
        sources.tfds_source("cifar10", "train", data_dir=str(tmp_path), download=False)
    assert time.perf_counter() - t0 < 10


def _png(color, size=8):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), color, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_local_archive_builder_on_a_generated_tar(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    files = {
        f"train/{c}/{i}.png": _png(40 * k + i, size=10) for k, c in enumerate(["cat", "dog", "emu"]) for i in range(4)
    }
    files.update({f"test/{c}/{i}.png": _png(200, size=10) for c in ["cat", "dog", "emu"] for i in range(2)})
    archive = tmp_path / "tiny.tar.gz"
    _write_tar(archive, files)
    src, names = sources.image_folder_source(str(archive), "train", image_size=8, data_dir=str(tmp_path / "tfds"))
    assert names == ["cat", "dog", "emu"] and len(src) == 12
    labels = sorted(int(src[i]["label"]) for i in range(12))
    assert labels == [0] * 4 + [1] * 4 + [2] * 4
    for i in range(12):
        ex = src[i]
        assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.uint8
        # each image is one flat colour 40·class + index: the label can be read back from the pixels
        assert int(ex["image"][0, 0, 0]) // 40 == int(ex["label"])
    test_src, _ = sources.image_folder_source(str(archive), "test", image_size=8, data_dir=str(tmp_path / "tfds"))
    assert len(test_src) == 6
    with pytest.raises(ValueError, match="split 'validation' is not in"):
        sources.image_folder_source(str(archive), "validation", image_size=8, data_dir=str(tmp_path / "tfds"))


def test_natural_images_layout_in_a_zip_has_a_single_train_split(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    archive = tmp_path / "natural-images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for c in ["airplane", "car", "flower"]:
            for i in range(3):
                zf.writestr(f"natural_images/{c}/{c}_{i:04d}.jpg", _png(60, size=20))
    assert sources.split_and_class("natural_images/car/car_0001.jpg") == ("train", "car")
    src, names = sources.image_folder_source(str(archive), "train", image_size=16, data_dir=str(tmp_path / "tfds"))
    assert names == ["airplane", "car", "flower"] and len(src) == 9
    assert src[0]["image"].shape == (16, 16, 3)


def test_missing_archive_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist; check archive="):
        sources.list_image_names(tmp_path / "nope.tar.gz")


def test_real_cifar10_archive_layout():
    """The shared CIFAR-10 JPEG archive: 50,000 images, 10 classes × 5,000, decodable 32×32 RGB."""
    if not SHARED_ARCHIVE.exists():
        print(f"SKIP REASON: {SHARED_ARCHIVE} is absent (it lives in ../shared/data beside the checkout)")
        pytest.skip(f"{SHARED_ARCHIVE} is absent")
    names = sources.list_image_names(SHARED_ARCHIVE)
    assert len(names) == 50_000
    pairs = [sources.split_and_class(n) for n in names]
    assert {s for s, _ in pairs} == {"train"}
    classes, counts = np.unique([c for _, c in pairs], return_counts=True)
    assert list(classes) == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert set(counts) == {5000}
    for i, (_, data) in enumerate(sources.iter_image_files(SHARED_ARCHIVE)):
        img = sources.decode_image(data, None)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        if i == 20:
            break


# ------------------------------------------------------------------------------------------
# Pipelines
# ------------------------------------------------------------------------------------------


def _toy_source(n=40):
    return sources.ArraySource(
        {
            "image": np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((n, 4, 4, 1), np.float32),
            "label": np.arange(n, dtype=np.int32) % 2,
        }
    )


def test_iterator_state_restores_the_exact_stream():
    src = _toy_source()
    it = iter(pipeline.train_dataset(src, global_batch_size=4, seed=5))
    for _ in range(7):
        next(it)
    state = it.get_state()
    expected = [next(it)["image"] for _ in range(15)]  # crosses an epoch boundary (10 batches/epoch)
    it2 = iter(pipeline.train_dataset(src, global_batch_size=4, seed=5))
    it2.set_state(state)
    for e in expected:
        np.testing.assert_array_equal(next(it2)["image"], e)


def test_epochs_are_reshuffled_and_cover_every_example():
    src = _toy_source(12)
    it = iter(pipeline.train_dataset(src, global_batch_size=4, seed=0))
    epochs = [np.concatenate([next(it)["image"][:, 0, 0, 0] for _ in range(3)]) for _ in range(2)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(12))
    assert not np.array_equal(epochs[0], epochs[1])


def test_process_shards_union_to_the_global_batch():
    src = _toy_source()
    global_batch = next(iter(pipeline.train_dataset(src, global_batch_size=8, seed=1)))["image"][:, 0, 0, 0]
    parts = [
        next(iter(pipeline.train_dataset(src, global_batch_size=8, seed=1, process_index=p, process_count=2)))["image"][
            :, 0, 0, 0
        ]
        for p in range(2)
    ]
    assert sorted(np.concatenate(parts).tolist()) == sorted(global_batch.tolist())


def test_augmentation_crops_and_flips_deterministically():
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    aug = pipeline.Augmentation(crop_padding=1, flip=True)
    outs = [aug({"image": image, "label": 0}, np.random.default_rng(s))["image"] for s in range(20)]
    assert all(o.shape == (4, 4, 1) for o in outs)
    assert any(np.array_equal(o, image[:, ::-1]) for o in outs)  # a pure flip occurs
    assert len({o.tobytes() for o in outs}) > 5
    np.testing.assert_array_equal(aug({"image": image}, np.random.default_rng(3))["image"], outs[3])


def test_eval_batches_pad_with_negative_labels():
    src = _toy_source(10)
    batches = list(pipeline.eval_batches(src, global_batch_size=4))
    assert len(batches) == 3
    labels = np.concatenate([b["label"] for b in batches])
    assert (labels >= 0).sum() == 10 and (labels[-2:] == -1).all()


def test_pipeline_throughput_is_measured():
    src = sources.ArraySource(synthetic.make_task("pathfinder", 512, seed=0))
    rate = pipeline.measure_throughput(
        iter(pipeline.train_dataset(src, global_batch_size=64, seed=0, augmentation=pipeline.Augmentation())),
        num_batches=10,
    )
    print(f"pipeline throughput: {rate:.0f} images/s")
    assert rate > 0


def test_pipeline_errors():
    with pytest.raises(ValueError, match="batch_size=64 exceeds the 40 training examples"):
        pipeline.train_dataset(_toy_source(), global_batch_size=64, seed=0)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        pipeline.train_dataset(_toy_source(), global_batch_size=8, seed=0, process_count=3)
