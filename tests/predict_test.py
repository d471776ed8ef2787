"""``predict``: a trained run's probabilities for new image files, with the run's own preprocessing."""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lateral_jax.core.config import LateralConfig
from lateral_jax.training import predict, run
from lateral_jax.training.data import sources
from lateral_jax.training.optimizer import OptimizerConfig

ROOT = Path(__file__).resolve().parents[1]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small LC-CNN trained 2 epochs on an archive of two noisy classes (dark and bright, 20×20
    RGB images resized to 16×16), checkpoints after each epoch."""
    tmp = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)
    files = {}
    for cls, level in (("bright", 150), ("dark", 90)):
        for i in range(48):
            noise = rng.normal(level, 40, (20, 20, 3)).clip(0, 255).astype(np.uint8)
            files[f"train/{cls}/{cls}{i:03d}.png"] = _png(noise)
    archive = _tar(tmp / "images.tar.gz", files)
    config = run.RunConfig(
        data=run.DataConfig(
            dataset="image_folder",
            archive=str(archive),
            image_size=16,
            validation_fraction=0.25,
            data_dir=str(tmp / "tfds"),
        ),
        model=run.ModelConfig(kind="lccnn", widths=(8,), num_steps=1, lateral=LateralConfig.stable(num_groups=4)),
        optimizer=OptimizerConfig(name="adam", learning_rate=1e-2),
        batch_size=16,
        num_epochs=2.0,
        progress=False,
        spectral_images=0,
    )
    final = run.train_and_evaluate(config, tmp / "run")
    return tmp, tmp / "run", final


def _validation_archive(tmp: Path, workdir: Path) -> tuple[Path, dict[str, int]]:
    """The run's validation images as PNG files (lossless: the same uint8 pixels) in nested folders."""
    config = run.load_run_config(workdir)
    data = run.build_data(config.data, config.seed)
    files, labels = {}, {}
    for i in range(len(data.validation)):
        example = data.validation[i]
        files[f"val/part{i % 3}/v{i}.png"] = _png(np.asarray(example["image"]))
        labels[f"v{i}"] = int(example["label"])
    return _tar(tmp / "validation.tar.gz", files), labels


def test_predictions_on_the_validation_images_give_the_runs_validation_accuracy(trained):
    tmp, workdir, final = trained
    archive, labels = _validation_archive(tmp, workdir)
    result = predict.predict(workdir, archive, batch_size=5)  # 5 per batch: padded to 8 over the 8 devices
    assert result.class_names == ["bright", "dark"] and result.step == final["steps"]
    assert sorted(result.ids, key=predict.natural_key) == result.ids and set(result.ids) == set(labels)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, rtol=1e-5)
    accuracy = np.mean([labels[i] == label for i, label in zip(result.ids, result.labels, strict=True)])
    assert accuracy == pytest.approx(final["validation_accuracy"], abs=1e-9)
    assert 0.5 < accuracy  # the classes are separable: the model learned something


def test_the_cli_writes_id_label_class_and_probabilities_for_an_older_step(trained, tmp_path):
    tmp, workdir, final = trained
    archive, labels = _validation_archive(tmp, workdir)
    older = final["steps"] // 2
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.predict", "--run", str(workdir), "--images", str(archive)]
        + ["--out", str(out), "--step", str(older), "--no_progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{len(labels)} images, checkpoint step {older} -> {out}" in proc.stdout
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert list(rows[0]) == ["id", "label", "class", "p_bright", "p_dark"]
    assert {r["id"] for r in rows} == set(labels)
    library = predict.predict(workdir, archive, step=older)
    for r, probs in zip(rows, library.probabilities, strict=True):
        assert r["class"] == ["bright", "dark"][int(r["label"])]
        np.testing.assert_allclose([float(r["p_bright"]), float(r["p_dark"])], probs, atol=1e-6)


def test_a_corrupt_image_is_named_and_skipped_on_request(trained, tmp_path):
    _, workdir, _ = trained
    good = _png(np.full((16, 16, 3), 120, np.uint8))
    archive = _tar(tmp_path / "imgs.tar", {"a/1.png": good, "a/2.png": good[:30], "b/3.png": good})
    with pytest.raises(sources.BadImageError, match=r"image 'a/2.png' cannot be decoded .*bad_images='skip'"):
        predict.predict(workdir, archive)
    result = predict.predict(workdir, archive, bad_images="skip")
    assert result.ids == ["1", "3"] and result.skipped == ["a/2.png"]


def test_grey_images_for_a_colour_run_are_refused_or_converted(trained, tmp_path):
    _, workdir, _ = trained
    grey = _png(np.full((16, 16, 1), 200, np.uint8))
    folder = tmp_path / "imgs"
    (folder / "x").mkdir(parents=True)
    (folder / "x" / "g.png").write_bytes(grey)
    with pytest.raises(predict.ChannelMismatchError, match=r"'x/g.png' is grey-level .* trained on 3-channel"):
        predict.predict(workdir, folder)
    colour = _png(np.full((16, 16, 3), 200, np.uint8))
    (folder / "x" / "c.png").write_bytes(colour)
    result = predict.predict(workdir, folder, channels="convert")
    np.testing.assert_allclose(result.probabilities[0], result.probabilities[1], atol=1e-6)  # same pixels


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_checkpoints", r"checkpoints holds no checkpoint: .* train it first"),
        ("duplicate_ids", r"have the same id '7'"),
        ("missing_step", r"step=99999 has no checkpoint"),
    ],
)
def test_the_cli_refuses_bad_input_with_one_line_and_exit_2(trained, tmp_path, case, match):
    _, workdir, _ = trained
    good = _png(np.full((16, 16, 3), 120, np.uint8))
    archive = _tar(tmp_path / "imgs.tar", {"a/7.png": good, "b/7.jpg" if case == "duplicate_ids" else "b/8.png": good})
    run_dir, extra = workdir, []
    if case == "no_checkpoints":
        run_dir = tmp_path / "untrained"
        run_dir.mkdir()
        (run_dir / "config.json").write_text((workdir / "config.json").read_text())
    if case == "missing_step":
        extra = ["--step", "99999"]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.predict", "--run", str(run_dir), "--images", str(archive)]
        + ["--out", str(tmp_path / "p.csv"), "--no_progress", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "p.csv").exists()


def test_ids_are_file_stems_in_natural_order_and_modes_map_to_channels():
    assert sorted(["img10", "img9", "img100"], key=predict.natural_key) == ["img9", "img10", "img100"]
    assert predict.image_id("a/b/0042.jpeg") == "0042"
    assert (predict.colour_channels("LA"), predict.colour_channels("P"), predict.colour_channels("RGBA")) == (1, 3, 3)
