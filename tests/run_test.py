"""End-to-end tests of training runs: resume after kill -9, corrupted checkpoints, NaN, validation,
determinism, and the main job's smoke config (lateral_jax/run.py, experiments/main.py)."""

import collections
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from lateral_jax.core.recurrence import LateralConfig
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import checkpoint, run, sharding, train
from lateral_jax.training.optimizer import OptimizerConfig, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> run.RunConfig:
    base = run.RunConfig(
        data=run.DataConfig(dataset="pathfinder", num_train=128, num_validation=64),
        model=run.ModelConfig(
            kind="lceicnn",
            widths=(8,),
            num_steps=2,
            lateral=LateralConfig.stable(num_groups=4),
            ei_mode="mixed_sign",
            ei_weight=1e-3,
        ),
        optimizer=OptimizerConfig(name="adam", learning_rate=1e-2),
        batch_size=32,
        num_epochs=3.0,
        log_every=2,
        checkpoint_every=3,
        progress=False,
        spectral_images=0,  # on in test_same_seed_same_parameters and the main job's smoke config
    )
    return dataclasses.replace(base, **overrides)


def final_params(workdir: Path, config: run.RunConfig):
    """The parameters of the newest checkpoint of a run, restored through the library."""
    data = run.build_data(config.data, config.seed)
    model = run.build_model(config.model, data.num_classes, data.input_shape)
    tx = make_optimizer(config.optimizer)
    mesh = make_mesh()
    target = sharding.replicate(
        train.init_state(model, tx, jax.random.key(99), np.zeros((1, *data.input_shape), np.float32)), mesh
    )
    step, state, data_state = checkpoint.Checkpointer(workdir / "checkpoints").restore(target)
    return step, jax.device_get(state.params), data_state


def test_same_seed_same_parameters(tmp_path):
    config = tiny_config(spectral_images=4)
    a = run.train_and_evaluate(config, tmp_path / "a")
    b = run.train_and_evaluate(config, tmp_path / "b")
    assert a["validation_accuracy"] == b["validation_accuracy"]
    chex.assert_trees_all_equal(final_params(tmp_path / "a", config)[1], final_params(tmp_path / "b", config)[1])
    # load_trained restores into an abstract target (no initialisation run): the same parameters
    chex.assert_trees_all_equal(run.load_trained(tmp_path / "a").params, final_params(tmp_path / "a", config)[1])
    data = run.build_data(config.data, config.seed)
    concrete, abstract = run.assemble(config, data).initial, run.assemble(config, data, abstract=True).initial
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(abstract))
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(concrete)
    signature = lambda t: [(x.shape, x.dtype, x.sharding) for x in jax.tree_util.tree_leaves(t)]  # noqa: E731
    assert signature(abstract) == signature(concrete)
    assert (tmp_path / "a" / "final.json").exists() and (tmp_path / "a" / "metrics.jsonl").exists()
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    # Every evaluation logs the spectral radius of each lateral layer's loop Jacobian at a(T).
    radii = [v for r in records if r["kind"] == "eval" for k, v in r.items() if k.startswith("loop/spectral_radius/")]
    assert radii and all(0.0 < v < 10.0 for v in radii)


KILL_SCRIPT = """
import sys, dataclasses
sys.path.insert(0, {root!r})
from tests.run_test import tiny_config
from lateral_jax.training import run
config = dataclasses.replace(tiny_config(), num_epochs=12.0, checkpoint_every=4)
run.train_and_evaluate(config, sys.argv[1])
"""


def test_kill_minus_nine_then_resume_equals_an_uninterrupted_run(tmp_path):
    """SIGKILL a training process after its first checkpoint, rerun: final params equal (bitwise on CPU)
    those of an uninterrupted run — the state and the data iterator's position are restored."""
    script = tmp_path / "train_script.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed_dir)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    ckpt_dir = killed_dir / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        steps = [p for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
        if steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the training process finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = sorted(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit())
    assert first and first[-1] < 48, f"killed after step {first}; the run has 48 steps"
    assert (killed_dir / "config.json").exists() and not (killed_dir / "final.json").exists()
    outs = [  # resume the killed run; run a clean one
        subprocess.run([sys.executable, str(script), str(d)], env=env, check=True, capture_output=True, text=True)
        for d in (killed_dir, clean_dir)
    ]
    resumed = re.findall(r"resumed from the checkpoint at step (\d+) of 48", outs[0].stdout)
    assert len(resumed) == 1 and int(resumed[0]) in first and "resumed" not in outs[1].stdout
    config = dataclasses.replace(tiny_config(), num_epochs=12.0)
    step_k, params_k, data_k = final_params(killed_dir, config)
    step_c, params_c, data_c = final_params(clean_dir, config)
    assert step_k == step_c == 48
    assert json.loads((killed_dir / "final.json").read_text())["steps"] == run.load_trained(killed_dir).step == 48
    assert data_k == data_c
    chex.assert_trees_all_equal(params_k, params_c)


def test_nan_stops_with_an_error_naming_the_step_and_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    """The batch of step 7 is NaN: the update is skipped, the run stops naming step 7, and the
    newest checkpoint (step 6) holds finite parameters."""
    config = tiny_config()
    shard_batch, calls = sharding.shard_batch, collections.Counter()

    def nan_at_step_7(batch, mesh):
        calls["train"] += 1
        if calls["train"] == 8:
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return shard_batch(batch, mesh)

    monkeypatch.setattr(run.HostFeed, "shard", staticmethod(nan_at_step_7))
    with pytest.raises(
        train.NonFiniteLossError, match=r"non-finite loss or gradient at step 7 .* last good checkpoint is kept: step 6"
    ):
        run.train_and_evaluate(config, tmp_path)
    step, params, _ = final_params(tmp_path, config)
    assert step == 6
    chex.assert_tree_all_finite(params)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"data": run.DataConfig(dataset="imagenet21k")}, "dataset='imagenet21k' is unknown"),
        ({"model": run.ModelConfig(kind="vit")}, "model kind='vit' is unknown"),
        ({"model": run.ModelConfig(ei_weight=-0.1)}, "ei_weight=-0.1 must be a finite number >= 0"),
        ({"data": run.DataConfig(dataset="image_folder")}, "needs archive="),
        (
            {"data": run.DataConfig(dataset="image_folder", archive="/no/such/archive.tar.gz")},
            "archive='/no/such/archive.tar.gz' does not exist",
        ),
        ({"model": run.ModelConfig(excitatory_fraction=1.2)}, "excitatory_fraction=1.2 is outside"),
        ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
        ({"keep_checkpoints": 0}, r"keep_checkpoints=0 must be a whole number >= 1 \(a run keeps at least"),
        ({"checkpoint_every": -1}, r"checkpoint_every=-1 must be a whole number >= 0"),
        ({"spectral_images": -1}, r"spectral_images=-1 must be a whole number >= 0"),
        ({"num_epochs": float("nan")}, r"num_epochs=nan must be a finite number > 0"),
        ({"num_epochs": float("inf")}, r"num_epochs=inf must be a finite number > 0"),
        ({"model": run.ModelConfig(widths=8)}, r"widths=8 must be a non-empty tuple of channel counts"),
        ({"model": run.ModelConfig(widths=())}, r"widths=\(\) must be a non-empty tuple"),
        ({"model": run.ModelConfig(num_steps=-1)}, r"num_steps=-1 must be a whole number >= 0"),
        (
            {"model": run.ModelConfig(widths=(12,), lateral=LateralConfig.stable(num_groups=8))},
            r"num_groups=8 does not divide width\(s\) \[12\] of widths=\(12,\)",
        ),
    ],
)
def test_config_validation(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run.train_and_evaluate(tiny_config(**overrides), tmp_path)


def test_main_job_smoke_config_end_to_end(tmp_path):
    """The README's main job, on its smoke config, in a subprocess: files a person can read."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.main",
            "--config",
            "experiments/configs/contour.py:smoke",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "report:" in out.stdout
    report = (tmp_path / "report.md").read_text()
    for model in ("fcnn", "lccnn", "lceicnn"):
        final = json.loads((tmp_path / model / "final.json").read_text())
        assert 0.0 <= final["validation_accuracy"] <= 1.0
        assert f"| {model} |" in report
        assert (tmp_path / model / "metrics.jsonl").stat().st_size > 0
        assert any((tmp_path / model / "checkpoints").iterdir())
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert "step/s" in out.stderr  # the progress bar
    # the neurophysiology analysis ran on the three checkpoints and the report links it
    assert "analysis/analysis.md" in report
    result = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert set(result["summary"]) == {"fcnn", "lccnn", "lceicnn"}
    lc = result["results"]["lccnn"]["layers"]["lateral_0"]
    assert set(lc) == {"activation", "orientation", "size_tuning", "surround", "connection", "loop_spectral_radius"}
    assert 0.0 < lc["loop_spectral_radius"]["median"] <= lc["loop_spectral_radius"]["max"] < 10.0
    assert "loop_spectral_radius" not in result["results"]["fcnn"]["layers"]["lateral_0"]  # F-CNN: no loop
    assert "loop ρ(J) at a(T)" in (tmp_path / "analysis" / "analysis.md").read_text()
    assert len(lc["activation"]) == 3  # loops t = 0, 1, 2 of the smoke config (T = 2)
    assert len(lc["orientation"]["osi"]) == 8 and all(0 <= v <= 1 for v in lc["orientation"]["osi"] if v == v)
    assert {"purity_mean", "fraction_excitatory", "balance", "radial_profile", "like_to_like"} <= set(lc["connection"])
    assert "connection" not in result["results"]["fcnn"]["layers"]["lateral_0"]
    for png in (
        "metric_vs_loop",
        "osi_hist",
        "suppression_hist",
        "tuning_curves",
        "response_ccdf",
        "lateral_kernels",
        "purity_hist",
        "like_to_like",
        "radial_profiles",
    ):
        assert (tmp_path / "analysis" / f"{png}.png").stat().st_size > 1000, png
    md = (tmp_path / "analysis" / "analysis.md").read_text()
    assert "| lceicnn | lateral_1 |" in md and "Does each property hold?" in md


@pytest.mark.filterwarnings("ignore:.*is not the published:UserWarning")
@pytest.mark.parametrize("config_file", ["pathfinder", "mnist", "fashion_mnist"])
def test_other_configs_smoke(tmp_path, config_file):
    """Every dataset config's smoke variant trains (mnist/fashion_mnist on generated files in the
    releases' IDX format); the official test split is reported apart from the validation split."""
    from experiments.configs import base, fashion_mnist, mnist, pathfinder
    from tests.official_test import write_idx_release

    cfg = {"pathfinder": pathfinder, "mnist": mnist, "fashion_mnist": fashion_mnist}[config_file].get_config("smoke")
    if config_file != "pathfinder":
        write_idx_release(tmp_path / "raw", sizes=(("train", 300), ("t10k", 50)))
        cfg.data.raw_dir = str(tmp_path / "raw")
        cfg.data.data_dir = str(tmp_path / "tfds")
    run_config = dataclasses.replace(base.to_run_config(cfg, "lceicnn"), progress=False)
    result = run.train_and_evaluate(run_config, tmp_path / "run")
    assert result["steps"] > 0 and 0 <= result["validation_accuracy"] <= 1
    if config_file != "pathfinder":
        assert result["validation_examples"] == 30 and result["test_examples"] == 50
        assert 0 <= result["test_accuracy"] <= 1 and "test_loss" in result


def test_natural_images_smoke_on_a_generated_archive(tmp_path):
    """The Natural Images config (Kaggle layout natural_images/<class>/<image>) on a generated zip."""
    import io
    import zipfile

    from PIL import Image

    from experiments.configs import base, natural_images

    archive = tmp_path / "natural-images.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(archive, "w") as zf:
        for c in ["airplane", "car", "cat", "dog"]:
            for i in range(20):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
                zf.writestr(f"natural_images/{c}/{c}_{i:04d}.jpg", buf.getvalue())
    cfg = natural_images.get_config("smoke")
    cfg.data.archive = str(archive)
    cfg.data.data_dir = str(tmp_path / "tfds")
    run_config = dataclasses.replace(base.to_run_config(cfg, "lccnn"), progress=False)
    result = run.train_and_evaluate(run_config, tmp_path / "run")
    assert result["steps"] == 64 // 16 and 0 <= result["validation_accuracy"] <= 1


def test_cifar10_smoke_on_the_shared_archive(tmp_path):
    from experiments.configs import base, cifar10

    if not Path(cifar10.ARCHIVE).exists():
        print(f"SKIP REASON: {cifar10.ARCHIVE} is absent (../shared/data beside the checkout)")
        pytest.skip(f"{cifar10.ARCHIVE} is absent")
    # The real JPEGs and layout (train/<class>/<nnnn>.jpg) of the shared archive, but only its first
    # 100 images per class: preparing the tfds dataset of all 50,000 took 45 s of the suite's budget.
    excerpt = tmp_path / "cifar10-excerpt.tar.gz"
    kept = collections.Counter()
    with tarfile.open(cifar10.ARCHIVE) as src, tarfile.open(excerpt, "w:gz") as dst:
        for member in src:
            label = Path(member.name).parent.name
            if member.isfile() and kept[label] < 100:
                kept[label] += 1
                dst.addfile(member, src.extractfile(member))
    assert len(kept) == 10 and set(kept.values()) == {100}
    cfg = cifar10.get_config("smoke")
    cfg.data.archive = str(excerpt)
    cfg.data.data_dir = str(tmp_path / "tfds")
    run_config = dataclasses.replace(base.to_run_config(cfg, "lceicnn"), progress=False)
    result = run.train_and_evaluate(run_config, tmp_path / "run")
    # 900 training images after the 10 % validation split; 512 requested; the stratified subset keeps 51 per class
    assert result["steps"] == 510 // 64
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["dataset"] == "image_folder" and 0 <= final["validation_accuracy"] <= 1


def test_a_second_seed_reuses_the_compiled_programs_and_gets_what_a_fresh_process_gets(tmp_path):
    """programs() is keyed by what the programs depend on: seed 1 after seed 0 in one process hits
    the cache, and its result is the one seed 1 gets with nothing cached."""
    from lateral_jax.training import programs

    config = tiny_config(num_epochs=1.0, device_data=True)
    programs.programs.cache_clear()
    alone = run.train_and_evaluate(dataclasses.replace(config, seed=1), tmp_path / "alone")
    programs.programs.cache_clear()
    run.train_and_evaluate(config, tmp_path / "seed0")
    hits = programs.programs.cache_info().hits
    after = run.train_and_evaluate(dataclasses.replace(config, seed=1), tmp_path / "seed1")
    assert programs.programs.cache_info().hits == hits + 1
    assert after["validation_loss"] == alone["validation_loss"]
    assert after["train"]["loss"] == alone["train"]["loss"]
    wider = run.train_and_evaluate(
        dataclasses.replace(config, model=dataclasses.replace(config.model, widths=(16,))), tmp_path / "w"
    )
    assert programs.programs.cache_info().hits == hits + 1 and wider["num_params"] > after["num_params"]


def test_the_report_gives_each_models_mean_and_std_over_its_seeds(tmp_path):
    from experiments import report

    for name, acc in (("fcnn_seed0", 0.60), ("fcnn_seed1", 0.70), ("lccnn_seed0", 0.90), ("lccnn_seed1", 0.80)):
        (tmp_path / name).mkdir()
        final = {"num_params": 10, "steps": 4, "validation_accuracy": acc, "train": {"images_per_s": 5.0}, "ei": {}}
        (tmp_path / name / "final.json").write_text(json.dumps(final))
        curve = [acc - 0.1, acc - 0.02, acc - 0.01, acc] if name != "fcnn_seed1" else [acc]
        records = [{"step": 10 * (i + 1), "kind": "eval", "accuracy": a, "loss": 1.0} for i, a in enumerate(curve)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    groups = {"fcnn": ["fcnn_seed0", "fcnn_seed1"], "lccnn": ["lccnn_seed0", "lccnn_seed1", "lccnn_seed2"]}
    text = report.write_report(tmp_path, groups).read_text()
    assert "mean ± sample std over 2 seed(s)" in text
    assert "| fcnn | **0.6500 ± 0.0707** | 2 | 0.6000 / 0.7000 |" in text
    assert "| lccnn | **0.8500 ± 0.0707** | 2 | 0.9000 / 0.8000 |" in text
    assert "**Best (mean):** `lccnn` with 0.8500 (F-CNN: 0.6500, difference +0.2000)." in text
    assert "| lccnn_seed2 | not finished |" in text
    # the last minus the third-last evaluation: +2.0 points for the runs with 4 evaluations, "–" with one
    assert "**Plateau:** averaged over the 3 runs, validation accuracy rose +2.0 points" in text
    assert text.count("| 5 | +2.0 |") == 3 and "| 5 | – |" in text
    assert report._parse_groups(["fcnn=a,b", "lccnn"]) == {"fcnn": ["a", "b"], "lccnn": ["lccnn"]}


def test_the_entry_points_compilation_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    import jax

    from lateral_jax.training import programs

    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv(programs.COMPILATION_CACHE_ENV, "off")
        assert programs.enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir == before
        monkeypatch.setenv(programs.COMPILATION_CACHE_ENV, str(tmp_path / "env"))
        assert programs.enable_compilation_cache() == str(tmp_path / "env")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "env")
        monkeypatch.delenv(programs.COMPILATION_CACHE_ENV)
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
        assert programs.enable_compilation_cache() == str(tmp_path / "jax")
        assert programs.enable_compilation_cache(tmp_path / "arg") == str(tmp_path / "arg")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
