"""Nothing lost, nothing silently wrong: run folders, checkpoints, metrics, exit statuses, config
overrides, image caches, divergence and implicit-mode convergence (docs/training.md, "Guarantees")."""

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from run_test import ROOT, tiny_config

from experiments import main as main_cli
from lateral_jax.core import implicit, plan, recurrence
from lateral_jax.core.config import LateralConfig
from lateral_jax.core.params import init_params
from lateral_jax.training import checkpoint, run, train
from lateral_jax.training.config import to_dict
from lateral_jax.training.data import sources
from lateral_jax.training.divergence import DivergenceConfig, DivergenceError, DivergenceMonitor
from lateral_jax.training.metrics import read_metrics
from lateral_jax.training.optimizer import OptimizerConfig
from lateral_jax.training.rundir import RunFolder, RunFolderError

SHORT = dict(num_epochs=2.0, checkpoint_every=2)  # 8 steps, checkpoints at 2, 4, 6, 8 (3 kept)


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit())


def assert_consistent(workdir: Path, config: run.RunConfig) -> None:
    """config.json is ``config``; final.json, the newest readable checkpoint and load_trained agree."""
    assert json.loads((workdir / "config.json").read_text()) == json.loads(json.dumps(to_dict(config)))
    final = json.loads((workdir / "final.json").read_text())
    trained = run.load_trained(workdir)
    assert final["steps"] == trained.step == checkpoint_steps(workdir)[-1]
    keys = [(r["step"], r["kind"]) for r in read_metrics(workdir / "metrics.jsonl")]
    assert len(keys) == len(set(keys)), f"duplicate metric records: {keys}"


# ---------------------------------------------------------------------------------------------
# Checkpoints always reflect the run
# ---------------------------------------------------------------------------------------------


def test_after_a_corrupt_newest_checkpoint_the_retrained_steps_are_saved(tmp_path):
    config = tiny_config(**SHORT)
    run.train_and_evaluate(config, tmp_path)
    assert checkpoint_steps(tmp_path) == [4, 6, 8]
    for f in (tmp_path / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00corrupt")
    with pytest.warns(RuntimeWarning, match=r"final.json reports the run finished at step 8, but the newest readable"):
        assert run.load_trained(tmp_path).step == 6  # and says it is not final.json's step
    with pytest.warns(RuntimeWarning, match=r"step 8 .* is unreadable .* moved to .*checkpoints.unreadable/8"):
        result = run.train_and_evaluate(config, tmp_path)
    assert result["steps"] == 8 and checkpoint_steps(tmp_path)[-1] == 8
    assert (tmp_path / "checkpoints.unreadable" / "8").is_dir()
    assert_consistent(tmp_path, config)
    with warnings.catch_warnings():  # and the next rerun restores step 8 without a word
        warnings.simplefilter("error")
        assert run.train_and_evaluate(config, tmp_path)["steps"] == 8


def test_a_rerun_with_another_config_is_refused_naming_the_fields_and_loses_nothing(tmp_path):
    config = tiny_config(**SHORT)
    run.train_and_evaluate(config, tmp_path)
    changed = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, widths=(16,)),
        optimizer=OptimizerConfig(learning_rate=1e-3),
    )
    with pytest.raises(run.ConfigMismatchError) as error:
        run.train_and_evaluate(changed, tmp_path)
    message = str(error.value)
    assert "model.widths: (8,) (in the folder) → (16,) (this run)" in message
    assert "optimizer.learning_rate: 0.01 (in the folder) → 0.001 (this run)" in message
    assert "on_config_change='move_aside'" in message
    assert set(error.value.differences) == {"model.widths", "optimizer.learning_rate", "optimizer.name"}
    assert_consistent(tmp_path, config)  # config.json untouched, the run still loads
    stored = json.loads((tmp_path / "config.json").read_text())
    del stored["divergence"], stored["data"]["bad_images"]  # as written by a version without these fields
    (tmp_path / "config.json").write_text(json.dumps(stored))
    # what is only shown, logged or kept may change between resumptions
    assert run.train_and_evaluate(dataclasses.replace(config, log_every=4, keep_checkpoints=2), tmp_path)["steps"] == 8


def test_move_aside_starts_afresh_and_keeps_the_old_run_beside_it(tmp_path):
    config = tiny_config(**SHORT)
    workdir = tmp_path / "run"
    run.train_and_evaluate(config, workdir)
    changed = dataclasses.replace(config, model=dataclasses.replace(config.model, widths=(16,)))
    with pytest.warns(UserWarning, match=r"moved to .*run\.superseded-"):
        result = run.train_and_evaluate(changed, workdir, on_config_change="move_aside")
    assert result["widths"] == [16] and result["steps"] == 8
    assert_consistent(workdir, changed)
    (old,) = tmp_path.glob("run.superseded-*")
    assert_consistent(old, config)


def test_a_checkpoint_of_another_model_is_a_shape_mismatch_not_corruption(tmp_path):
    config = tiny_config(**SHORT)
    run.train_and_evaluate(config, tmp_path)
    (tmp_path / "config.json").write_text(  # as if the folder's config had been edited by hand
        json.dumps(to_dict(dataclasses.replace(config, model=dataclasses.replace(config.model, widths=(16,)))))
    )
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"saved from a different model: params/.*saved \(8,"):
        run.load_trained(tmp_path)
    assert checkpoint_steps(tmp_path) == [4, 6, 8]  # nothing moved, nothing deleted


# ---------------------------------------------------------------------------------------------
# One writer per folder; metrics keyed by step; exit statuses
# ---------------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys, time
from lateral_jax.training.rundir import RunFolder
with RunFolder(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_writer_per_folder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"is in use by pid {holder.pid} on host .*one run writes"):
            run.train_and_evaluate(tiny_config(**SHORT), tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == holder.pid  # the dead holder's record stays
    with RunFolder(tmp_path):  # but its lock went with it
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_metrics_are_keyed_by_step_across_resumptions(tmp_path):
    config = tiny_config(**SHORT)
    run.train_and_evaluate(config, tmp_path)
    first = read_metrics(tmp_path / "metrics.jsonl")
    for step in (6, 8):  # lose the last two checkpoints: the rerun resumes from step 4
        os.system(f"rm -rf {tmp_path / 'checkpoints' / str(step)}")
    run.train_and_evaluate(config, tmp_path)
    run.train_and_evaluate(config, tmp_path)  # finished: re-evaluates, replaces the step-8 eval record
    again = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["kind"]) for r in again] == [(r["step"], r["kind"]) for r in first]
    assert_consistent(tmp_path, config)


def test_unusable_workdirs_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match=r"workdir '.*file' is a file, not a folder"):
        run.train_and_evaluate(tiny_config(), tmp_path / "file")
    with pytest.raises(RunFolderError, match=r"cannot create workdir '.*file/run' \(.*\); pass a folder you can write"):
        run.train_and_evaluate(tiny_config(), tmp_path / "file" / "run")


def test_sigterm_saves_and_exits_with_the_preempted_status(tmp_path):
    """experiments.main under SIGTERM: a checkpoint, "rerun to resume", exit status 75 (not 0)."""
    cmd = [sys.executable, "-m", "experiments.main", "--config", "experiments/configs/contour.py:smoke"]
    cmd += ["--only", "lccnn", "--workdir", str(tmp_path), "--config.num_epochs=400", "--noanalyze", "--no_report"]
    cmd += ["--config.progress=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "lccnn" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == run.EXIT_PREEMPTED == 75, err[-2000:]
    assert "rerun the same command to resume" in out
    (step,) = checkpoint_steps(tmp_path / "lccnn")
    assert 0 < step < 3200 and not (tmp_path / "lccnn" / "final.json").exists()


@pytest.mark.parametrize("entry_point", ["main", "study"])
@pytest.mark.parametrize("after_s", [0.3, 3.0])
def test_sigterm_while_starting_up_exits_with_the_preempted_status(tmp_path, after_s, entry_point):
    """SIGTERM during the imports (0.3 s) or while the data and programs are built (3 s): 75, not 143
    (or 0), so a scheduler that requeues on 75 requeues the job; nothing was trained, nothing is lost."""
    if entry_point == "main":
        cmd = [sys.executable, "-m", "experiments.main", "--config", "experiments/configs/contour.py:smoke"]
        cmd += ["--only", "lccnn", "--workdir", str(tmp_path), "--noanalyze", "--no_report", "--config.progress=false"]
    else:
        cmd = [sys.executable, "-m", "experiments.study", "--protocol", "smoke", "--datasets", "contour"]
        cmd += ["--variants", "lccnn_T1", "--out", str(tmp_path / "study.jsonl")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    assert proc.poll() is None, "the run finished before the signal"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == run.EXIT_PREEMPTED, (proc.returncode, err[-2000:])
    assert "preempted (SIGTERM) outside training" in err or "rerun" in err
    assert not (tmp_path / "lccnn" / "final.json").exists() and not (tmp_path / "study.jsonl").exists()


def test_bad_command_lines_exit_2_with_one_line_naming_the_fix():
    cmd = [sys.executable, "-m", "experiments.main", "--config.model.nonexistent=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == run.EXIT_REFUSED == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --config.model.nonexistent: config.model has no field 'nonexistent'; its fields are block, "
        "contractor_threshold, contractor_weight, dtype, ei_mode, ei_weight, excitatory_fraction, hgru, kind, "
        "lateral, lateral_stages, loop, num_steps, small_inputs, stage_sizes, widths."
    ]


@pytest.mark.parametrize("case", ["batch_larger_than_data", "empty_archive", "one_class_archive"])
def test_data_that_cannot_serve_the_run_exits_2_with_one_line(tmp_path, case):
    """Found only once the data is read, and refused like a bad flag: exit 2, one line, no traceback."""
    archive = tmp_path / "imgs.tar"
    with tarfile.open(archive, "w") as tar:
        for i in range(0 if case == "empty_archive" else 12):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(buffer, format="PNG")
            info = tarfile.TarInfo(f"cat/{i}.png")
            info.size = len(buffer.getvalue())
            tar.addfile(info, io.BytesIO(buffer.getvalue()))
    cmd = [sys.executable, "-m", "experiments.main", "--only", "lccnn", "--workdir", str(tmp_path / "run")]
    cmd += ["--noanalyze", "--no_report"]
    if case == "batch_larger_than_data":
        cmd += ["--config", "experiments/configs/contour.py:smoke", "--config.batch_size=4096"]
        want = r"batch_size=4096 exceeds the \d+ training examples; pass a smaller batch_size"
    else:
        cmd += ["--config", "experiments/configs/natural_images.py:smoke", f"--config.data.archive={archive}"]
        cmd += [f"--config.data.data_dir={tmp_path / 'tfds'}"]
        want = "no images found in" if case == "empty_archive" else r"holds 1 class\(es\) \['cat'\]"
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == run.EXIT_REFUSED, proc.stderr[-2000:]
    # the whole of stderr is that line: no library log lines, progress bars or traceback
    assert len(lines) == 1 and lines[0].startswith("error:") and re.search(want, lines[0]), proc.stderr[-2000:]
    if case == "one_class_archive":  # --verbose: the libraries' logs and the traceback, then the same line
        verbose = subprocess.run([*cmd, "--verbose"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert verbose.returncode == run.EXIT_REFUSED and "Traceback" in verbose.stderr
        assert verbose.stderr.strip().splitlines()[-1] == lines[0]


# ---------------------------------------------------------------------------------------------
# Configs say what runs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--config=experiments/configs/contour.py:nope"], "config variant 'nope' is unknown; use one of 'smoke'"),
        (["--config=nofile.py"], "--config='nofile.py': no such config file"),
        (
            ["--config.optimizer.lr=3"],
            "config.optimizer has no field 'lr'; its fields are accumulate_steps, ema_decay, grad_clip_norm, "
            "learning_rate",
        ),
        (["--config.nonexistent.x=1"], "config has no field 'nonexistent'; its fields are batch_size"),
        (["--config.model.widths.x=1"], "config.model.widths is a value, not a group"),
        (["--config.model.num_steps=abc"], "invalid literal for int"),
        (["--only=lccnx"], "variant 'lccnx' is not a valid name"),
        (["--config.model.kind=lccnn"], "choose models with --only \\(e.g. --only lccnn\\), not --config.model.kind"),
        (["--config", "nofile.py"], "--config='nofile.py': no such config file"),
        (["--config.model.widths=8"], r"config.model.widths is a tuple; write it out, e.g. .*widths='\(8,\)'"),
        (["--config.model.num_steps=-1"], r"num_steps=-1 must be a whole number >= 0"),
        (["--config.keep_checkpoints=0"], r"keep_checkpoints=0 must be a whole number >= 1"),
        (["--config.num_epochs=nan"], r"num_epochs=nan must be a finite number > 0"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(argv, match):
    with pytest.raises(main_cli.UsageError, match=match):
        main_cli.parse(["main", *argv])


def test_command_line_overrides_win_over_variant_defaults():
    plan = main_cli.parse(["main", "--config.model.ei_mode=project", "--config.model.ei_weight=0"])
    assert {v: (c.model.kind, c.model.ei_mode, c.model.ei_weight) for v, c in plan.run_configs.items()} == {
        f"{kind}_seed{seed}": (kind, "project", 0.0) for kind in ("fcnn", "lccnn", "lceicnn") for seed in (0, 1, 2)
    }
    plan = main_cli.parse(["main", "--only=lceicnn_T2,lccnn", "--config.model.num_steps=8", "--config.seeds=(0,)"])
    assert [c.model.num_steps for c in plan.run_configs.values()] == [8, 8]
    plan = main_cli.parse(["main", "--only=lceicnn_T2", "--config.seeds=(0,)"])  # the variant's own value holds
    assert plan.run_configs["lceicnn_T2"].model.num_steps == 2
    # a variant's lateral kernel size, unless the command line sets it; the rest of the preset kept
    plan = main_cli.parse(["main", "--only=lccnn_T4_k5", "--config.seeds=(0,)"])
    lateral = plan.run_configs["lccnn_T4_k5"].model.lateral
    assert (lateral.lateral_size, lateral.loop_norm, lateral.num_groups) == (5, "group", 8)
    plan = main_cli.parse(
        ["main", "--only=lccnn_T4_k5", "--config.seeds=(0,)", "--config.model.lateral.lateral_size=7"]
    )
    assert plan.run_configs["lccnn_T4_k5"].model.lateral.lateral_size == 7


def test_a_config_with_seeds_trains_one_run_per_seed_and_refuses_a_lone_seed_flag():
    plan = main_cli.parse(["main", "--only=fcnn,lccnn"])
    assert plan.variants == {
        "fcnn": ["fcnn_seed0", "fcnn_seed1", "fcnn_seed2"],
        "lccnn": ["lccnn_seed0", "lccnn_seed1", "lccnn_seed2"],
    }
    assert [c.seed for c in plan.run_configs.values()] == [0, 1, 2, 0, 1, 2]
    # the generated examples are the same for every seed: seeds differ in initialisation and batch order
    assert {c.data.seed for c in plan.run_configs.values()} == {0}
    assert main_cli.analysed_runs(plan) == ["fcnn_seed0", "lccnn_seed0"]
    plan = main_cli.parse(["main", "--only=fcnn", "--config.seeds=(3, 4)"])
    assert plan.variants == {"fcnn": ["fcnn_seed3", "fcnn_seed4"]}
    with pytest.raises(main_cli.UsageError, match=r"--config.seed=5 would be ignored.*--config.seeds='\(5,\)'"):
        main_cli.parse(["main", "--config.seed=5"])
    with pytest.raises(main_cli.UsageError, match="give distinct integer seeds"):
        main_cli.parse(["main", "--config.seeds=(1, 1)"])
    plan = main_cli.parse(["main", "--config", "experiments/configs/cifar10.py"])  # one seed: folders named as models
    assert plan.variants == {"fcnn": ["fcnn"], "lccnn": ["lccnn"], "lceicnn": ["lceicnn"]}
    assert all(c.device_data for c in plan.run_configs.values())  # JPEGs decoded once, augmented in JAX


def _documented_commands() -> list[str]:
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))]
    texts += [p.read_text() for p in sorted((ROOT / "experiments" / "configs").glob("*.py"))]
    commands = []
    for text in texts:
        for line in text.replace("\\\n", " ").splitlines():
            match = re.search(r"python3? -m experiments\.main(.*)", line)
            if match and "<" not in match[1] and "..." not in match[1]:
                commands.append(match[1].split("#")[0].strip())
    return commands


def test_every_documented_command_line_resolves_with_its_overrides_applied(tmp_path):
    commands = _documented_commands()
    assert len(commands) >= 8
    archive = _image_tar(tmp_path / "natural-images.tar", {"cat": 10, "dog": 200})
    for command in commands:  # a placeholder archive path stands for a real one
        command = re.sub(r"(--config\.data\.archive=)/path/to/\S+", rf"\g<1>{archive}", command)
        argv = ["main", *command.split()]
        argv = [a for a in argv if not a.startswith("--distributed")]
        plan = main_cli.parse(argv)
        overrides = dict(re.findall(r"--config\.([\w.]+)=(\S+)", command))
        for config in plan.run_configs.values():
            for field, text in overrides.items():
                value = to_dict(config)
                for part in field.split("."):
                    value = value[part]
                assert str(value).lower() == text.lower() or float(value) == float(text), (command, field, value)


# ---------------------------------------------------------------------------------------------
# Data cannot be mistaken
# ---------------------------------------------------------------------------------------------


def _image_tar(path: Path, classes: dict[str, int], *, corrupt: str | None = None, fmt: str = "png") -> Path:
    """A tar of ``<class>/<i>.<fmt>`` images, each filled with its class's grey level (+ i)."""
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, level in classes.items():
            for i in range(3):
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), level + i, np.uint8)).save(buffer, format=fmt.upper())
                data = buffer.getvalue()
                member = f"{name}/{i}.{fmt}"
                if member == corrupt:
                    data = data[:20]
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_two_archives_of_one_name_and_size_never_share_prepared_data(tmp_path):
    a = _image_tar(tmp_path / "a" / "imgs.tar", {"cat": 10, "dog": 200})
    b = _image_tar(tmp_path / "b" / "imgs.tar", {"ant": 90, "bee": 50})
    assert a.stat().st_size == b.stat().st_size
    data_dir = str(tmp_path / "tfds")
    source_a, names_a = sources.image_folder_source(str(a), "train", image_size=8, data_dir=data_dir)
    source_b, names_b = sources.image_folder_source(str(b), "train", image_size=8, data_dir=data_dir)
    assert (names_a, names_b) == (["cat", "dog"], ["ant", "bee"])
    assert sorted(int(source_b[i]["image"][0, 0, 0]) for i in range(6)) == [50, 51, 52, 90, 91, 92]


def test_a_run_does_not_resume_on_an_archive_replaced_in_place(tmp_path):
    """The run folder keeps the archive's content fingerprint (data.json): the same path with other
    images is another run, refused naming the fingerprints, or moved aside on request."""
    archive = tmp_path / "imgs.tar"
    config = dataclasses.replace(
        tiny_config(
            data=run.DataConfig(
                dataset="image_folder", archive=str(archive), image_size=8, data_dir=str(tmp_path / "t")
            )
        ),
        model=run.ModelConfig(kind="lccnn", widths=(4,), num_steps=1, lateral=LateralConfig.stable(num_groups=4)),
        batch_size=8,
        num_epochs=1.0,
    )

    def write_archive(levels):
        with tarfile.open(archive, "w") as tar:
            for cls, level in levels.items():
                for i in range(16):
                    buffer = io.BytesIO()
                    Image.fromarray(np.full((8, 8, 3), level + i, np.uint8)).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"{cls}/{i}.png")
                    info.size = len(buffer.getvalue())
                    tar.addfile(info, io.BytesIO(buffer.getvalue()))

    write_archive({"cat": 10, "dog": 200})
    run.train_and_evaluate(config, tmp_path / "run")
    first = json.loads((tmp_path / "run" / "data.json").read_text())["data.archive content"]
    assert first == sources.archive_fingerprint(archive)
    write_archive({"cat": 60, "dog": 120})  # same path, same classes, other images
    longer = dataclasses.replace(config, num_epochs=2.0)
    with pytest.raises(run.ConfigMismatchError) as e:
        run.train_and_evaluate(longer, tmp_path / "run")
    assert f"data.archive content: {first!r} (in the folder) → {sources.archive_fingerprint(archive)!r}" in str(e.value)
    with pytest.warns(UserWarning, match="moved to"):
        result = run.train_and_evaluate(longer, tmp_path / "run", on_config_change="move_aside")
    assert result["steps"] == 2 * (len(run.build_data(longer.data, 0).train) // 8)


def test_processes_preparing_one_archive_at_once_take_turns_and_read_the_same_data(tmp_path):
    """Two study shards start together on an unprepared archive: one prepares, the other waits for
    it and reads what it wrote (before the lock, the second crashed on the first's rename)."""
    archive = _image_tar(tmp_path / "imgs.tar", {"cat": 10, "dog": 200})
    code = (
        "import sys; from lateral_jax.training.data import sources; "
        "s, n = sources.image_folder_source(sys.argv[1], 'train', image_size=8, data_dir=sys.argv[2]); "
        "print(n, sorted(int(s[i]['image'][0, 0, 0]) for i in range(len(s))))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(archive), str(tmp_path / "tfds")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in outs]
    assert [out.strip().splitlines()[-1] for out, _ in outs] == ["['cat', 'dog'] [10, 11, 12, 200, 201, 202]"] * 2


def test_a_corrupt_image_is_named_and_leaves_no_half_prepared_cache(tmp_path):
    archive = _image_tar(tmp_path / "imgs.tar", {"cat": 10, "dog": 200}, corrupt="dog/1.jpeg", fmt="jpeg")
    data_dir = tmp_path / "tfds"
    with pytest.raises(
        sources.BadImageError,
        match=r"image 'dog/1.jpeg' cannot be decoded .*imgs.tar'. Remove or replace it, or pass .*bad_images='skip'",
    ):
        sources.image_folder_source(str(archive), "train", image_size=8, data_dir=str(data_dir))
    assert not any(p.is_file() for p in data_dir.rglob("*")), list(data_dir.rglob("*"))
    with pytest.warns(RuntimeWarning, match=r"left out 1 image\(s\) .* dog/1.jpeg"):
        source, _ = sources.image_folder_source(
            str(archive), "train", image_size=8, data_dir=str(data_dir), bad_images="skip"
        )
    assert len(source) == 5


# ---------------------------------------------------------------------------------------------
# Divergence and non-convergence are reported
# ---------------------------------------------------------------------------------------------


def test_divergence_monitor_flags_blow_ups_not_slow_starts():
    chance = float(np.log(2))
    stuck = DivergenceMonitor(DivergenceConfig(patience=2), num_classes=2)
    for step in range(50):  # at chance for a long time: slow, not diverged
        stuck.observe(step, chance + 0.01)
    grown = DivergenceMonitor(DivergenceConfig(), num_classes=2)
    grown.observe(1, 0.005)
    with pytest.raises(DivergenceError, match=r"grew from 0.005 to 0.9 .* at step 2") as error:
        grown.observe(2, 0.9)
    assert error.value.step == 2
    high = DivergenceMonitor(DivergenceConfig(patience=3, growth=1e9), num_classes=2)
    for step, loss in [(1, 5.0), (2, 0.3), (3, 5.0), (4, 6.0)]:
        high.observe(step, loss)  # a good record resets the count
    with pytest.raises(DivergenceError, match=r"for 3 records, from step 3 to step 5"):
        high.observe(5, 7.0)
    with pytest.raises(ValueError, match="divergence.action='halt' must be one of"):
        DivergenceConfig(action="halt")


def test_a_diverging_run_stops_naming_the_step_or_warns_when_asked(tmp_path):
    config = tiny_config(**SHORT, optimizer=OptimizerConfig(name="sgd", learning_rate=1e4))
    with pytest.raises(
        DivergenceError, match=r"training diverged: .* to step 4 .* Checkpoints up to step \d+ are kept"
    ):
        run.train_and_evaluate(config, tmp_path / "stop")
    with pytest.warns(RuntimeWarning, match="training diverged"):
        result = run.train_and_evaluate(
            dataclasses.replace(config, divergence=DivergenceConfig(action="warn")), tmp_path / "warn"
        )
    assert result["steps"] == 8


def test_implicit_mode_warns_when_the_fixed_point_is_not_reached(monkeypatch):
    monkeypatch.setattr(implicit, "_nonconverged_calls", 0)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))

    def solve(scale):
        config = LateralConfig(num_groups=4, lateral_init_scale=scale)
        params = init_params(jax.random.key(0), in_channels=3, out_channels=8, config=config)
        fn = jax.jit(
            lambda p: recurrence.unroll(p, x, num_steps=4, config=config, grad_mode="implicit", return_states=False)
        )
        return jax.block_until_ready(fn(params))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert float(solve(0.5).residual) < 1e-5  # contracting: converges, silent
    with pytest.warns(
        RuntimeWarning,
        match=r"after implicit_max_steps=100 with residual 0.56\d* > implicit_tol=1e-05 \(non-converged solve #1\)",
    ):
        assert float(solve(1.0).residual) > 0.1  # not contracting


def test_training_logs_the_largest_loop_residual():
    config = tiny_config().model
    model = run.build_model(config, 2, (16, 16, 1))
    batch = {"image": jnp.ones((2, 16, 16, 1)), "label": jnp.zeros((2,), jnp.int32)}
    params = model.init(jax.random.key(0), batch["image"])["params"]
    _, metrics = train.loss_and_metrics(model, params, batch)
    assert float(metrics["loop_residual_max"]) >= float(metrics["final_loop_change"]) > 0


def test_long_loops_roll_on_cpu_so_compile_time_stays_bounded():
    assert plan.default_scan_unroll(10_000) == 1
    config = LateralConfig.stable(num_groups=2)
    params = init_params(jax.random.key(0), in_channels=1, out_channels=2, config=config)
    x = jnp.ones((1, 4, 4, 1))

    def loss(p, num_steps):
        return jnp.sum(recurrence.unroll(p, x, num_steps=num_steps, config=config, return_states=False).final)

    jaxpr = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, 10_000)))(params))
    assert "length=10000" in jaxpr  # one rolled scan, not 10,000 traced steps
    rolled = jax.jit(jax.grad(lambda p: loss(p, 40)))(params)
    unrolled = jax.jit(
        jax.grad(
            lambda p: jnp.sum(
                recurrence.unroll(p, x, num_steps=40, config=config, return_states=False, scan_unroll=True).final
            )
        )
    )(params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), rolled, unrolled)


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The free space is checked before each checkpoint is written: a disk that fills up after the
    first checkpoint stops the run with one line naming the folder and the space to free, and the
    first checkpoint is intact (the rerun, with space, resumes from it)."""
    import shutil as real_shutil

    from lateral_jax.training import checkpoint

    config = tiny_config(num_epochs=2.0, checkpoint_every=4)
    saves = []
    real_usage = real_shutil.disk_usage

    def usage(path):
        total, used, free = real_usage(path)
        return type(real_usage(path))(total, used, free if len(saves) < 1 else 1024)

    original_save = checkpoint.Checkpointer.save

    def counting_save(self, step, *args, **kwargs):
        original_save(self, step, *args, **kwargs)
        saves.append(step)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", usage)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", counting_save)
    with pytest.raises(checkpoint.DiskFullError) as info:
        run.train_and_evaluate(config, tmp_path)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "checkpoints") in message
    assert re.search(r"needs about [\d.,]+ MB, the file system has 0\.0 MB free; free at least", message)
    assert f"the newest checkpoint, step {saves[0]}, is intact" in message
    monkeypatch.undo()
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    assert ckpt.all_steps() == [saves[0]]
    ckpt.close()
    result = run.train_and_evaluate(config, tmp_path)  # space again: resumes and finishes
    assert result["steps"] == 8 and np.isfinite(result["validation_loss"])
