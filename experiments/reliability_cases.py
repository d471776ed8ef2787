"""The reliability issue's user-facing cases, run as a user runs them: one process per command.

  python -m experiments.reliability_cases --out results/reliability/cases.jsonl
  python -m experiments.reliability_cases --only keep_checkpoints_0,kill_9_resume

Each case runs ``python -m experiments.main`` (the contour smoke config, or the Natural Images smoke
config on a generated archive) and checks what a user would see: the exit status, that a refusal is
one ``error:`` line on stderr naming the field and no traceback, that nothing is trained on a
refusal, and for the life-cycle cases (kill -9, SIGTERM, a changed config, two writers, a corrupt
newest checkpoint, an archive replaced in place) that the weights end equal to an uninterrupted
run's or are refused and kept. One JSON line per case with the command, status, stderr's last line
and ``ok``; the last line is the count of cases that lost weights, were silently accepted or printed
a traceback. The library-level cases (shard_map / pmap, NNX parity) are tests, not commands:
docs/training.md lists them.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--config", "experiments/configs/contour.py:smoke"]
IMAGES = ["--config", "experiments/configs/natural_images.py:smoke"]
QUIET = ["--only", "lccnn", "--noanalyze", "--no_report", "--config.progress=false"]
LONGER = ["--config.num_epochs=6", "--config.checkpoint_every=2"]  # 24 steps, a checkpoint every 2


def main_cmd(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "experiments.main", *args, *QUIET, "--workdir", str(workdir)]


def run_cmd(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_archive(path: Path, classes: dict[str, int], per_class: int = 16, corrupt: str | None = None) -> Path:
    """A tar of ``per_class`` 8×8 PNGs per class (grey level ``level + i``); ``corrupt``: one bad file."""
    from PIL import Image

    with tarfile.open(path, "w") as tar:
        files = []
        for cls, level in classes.items():
            for i in range(per_class):
                buffer = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), (level + 7 * i) % 256, np.uint8)).save(buffer, format="PNG")
                files.append((f"{cls}/{i}.png", buffer.getvalue()))
        if corrupt:
            files.append((corrupt, b"not an image"))
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def refusal(proc: subprocess.CompletedProcess, workdir: Path, must_name: str) -> dict:
    """Exit 2, one ``error:`` line naming ``must_name``, no traceback, nothing trained."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    trained = any(workdir.rglob("final.json")) or any(p.name.isdigit() for p in workdir.rglob("checkpoints/*"))
    ok = (
        proc.returncode == 2
        and len(errors) == len(lines) == 1
        and must_name in errors[0]
        and "Traceback" not in proc.stderr
        and not trained
    )
    return {
        "status": proc.returncode,
        "stderr_lines": len(lines),
        "stderr": lines[-1:],
        "traceback": "Traceback" in proc.stderr,
        "ok": ok,
    }


def params_of(workdir: Path):
    from lateral_jax.training import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = run.load_trained(workdir)
    return trained.step, trained.params, [str(w.message) for w in caught]


def same_params(a, b) -> bool:
    import jax

    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# ---------------------------------------------------------------------------------------------
# Bad input: refused before training with one line naming the field
# ---------------------------------------------------------------------------------------------

FLAG_CASES = {
    "keep_checkpoints_0": (["--config.keep_checkpoints=0"], "keep_checkpoints"),
    "num_steps_negative": (["--config.model.num_steps=-1"], "num_steps"),
    "num_groups_not_dividing": (["--config.model.lateral.num_groups=3"], "num_groups"),
    "widths_empty": (["--config.model.widths=()"], "widths"),
    "widths_scalar": (["--config.model.widths=8"], "widths"),
    "batch_larger_than_data": (["--config.batch_size=4096"], "batch_size"),
    "checkpoint_every_negative": (["--config.checkpoint_every=-1"], "checkpoint_every"),
    "spectral_images_negative": (["--config.spectral_images=-1"], "spectral_images"),
    "learning_rate_nan": (["--config.optimizer.learning_rate=nan"], "learning_rate"),
    "num_epochs_nan": (["--config.num_epochs=nan"], "num_epochs"),
    "num_epochs_inf": (["--config.num_epochs=inf"], "num_epochs"),
    "unknown_field": (["--config.model.nonexistent=3"], "nonexistent"),
}


def flag_case(tmp: Path, overrides: list[str], must_name: str) -> dict:
    workdir = tmp / "run"
    proc = run_cmd(main_cmd(workdir, *SMOKE, *overrides))
    return {"command": " ".join(overrides), **refusal(proc, workdir, must_name)}


def missing_config_file(tmp: Path) -> dict:
    workdir = tmp / "run"
    proc = run_cmd(main_cmd(workdir, "--config", "nofile.py"))
    return {"command": "--config nofile.py", **refusal(proc, workdir, "nofile.py")}


def archive_case(classes: dict[str, int], must_name: str, corrupt: str | None = None) -> Callable[[Path], dict]:
    def case(tmp: Path) -> dict:
        archive = write_archive(tmp / "imgs.tar", classes, corrupt=corrupt)
        workdir = tmp / "run"
        args = [*IMAGES, f"--config.data.archive={archive}", f"--config.data.data_dir={tmp / 'tfds'}"]
        proc = run_cmd(main_cmd(workdir, *args))
        return {
            "command": f"natural_images smoke on a {len(classes)}-class archive",
            **refusal(proc, workdir, must_name),
        }

    return case


# ---------------------------------------------------------------------------------------------
# Life cycle: nothing lost, nothing resumed on the wrong data
# ---------------------------------------------------------------------------------------------


def _reference(tmp: Path) -> tuple[int, object]:
    """An uninterrupted run of the longer smoke config (shared by the life-cycle cases)."""
    workdir = tmp.parent / "reference"
    if not (workdir / "lccnn" / "final.json").exists():
        proc = run_cmd(main_cmd(workdir, *SMOKE, *LONGER))
        if proc.returncode != 0:
            raise RuntimeError(f"the reference run failed: {proc.stderr[-2000:]}")
    step, params, _ = params_of(workdir / "lccnn")
    return step, params


def _wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.time()
    while not any(p.name.isdigit() for p in (workdir / "lccnn" / "checkpoints").glob("*")):
        if proc.poll() is not None or time.time() - start > timeout:
            raise RuntimeError("the run ended or stalled before its first checkpoint")
        time.sleep(0.2)


def interrupted(sig: int) -> Callable[[Path], dict]:
    def case(tmp: Path) -> dict:
        ref_step, ref_params = _reference(tmp)
        workdir = tmp / "run"
        proc = subprocess.Popen(
            main_cmd(workdir, *SMOKE, *LONGER), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        _wait_for_checkpoint(workdir, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
        first_status = proc.returncode
        again = run_cmd(main_cmd(workdir, *SMOKE, *LONGER))
        step, params, _ = params_of(workdir / "lccnn")
        resumed_line = "resumed from the checkpoint at step" in again.stdout + again.stderr
        want_status = 75 if sig == signal.SIGTERM else -signal.SIGKILL
        ok = (
            first_status == want_status
            and again.returncode == 0
            and step == ref_step
            and same_params(params, ref_params)
        )
        ok = ok and resumed_line and "Traceback" not in err + again.stderr
        return {
            "command": f"{signal.Signals(sig).name} after the first checkpoint, then the same command",
            "status": first_status,
            "rerun_status": again.returncode,
            "resumed_line": resumed_line,
            "bitwise_equal_to_uninterrupted": same_params(params, ref_params),
            "ok": ok,
        }

    return case


def sigterm_at_startup(tmp: Path) -> dict:
    workdir = tmp / "run"
    proc = subprocess.Popen(
        main_cmd(workdir, *SMOKE), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    return {"command": "SIGTERM 1 s after start", "status": proc.returncode, "ok": proc.returncode == 75}


def changed_config(tmp: Path) -> dict:
    _, ref_params = _reference(tmp)
    workdir = tmp / "run"
    shutil.copytree(tmp.parent / "reference", workdir)
    proc = run_cmd(main_cmd(workdir, *SMOKE, *LONGER, "--config.optimizer.learning_rate=0.5"))
    _, params, _ = params_of(workdir / "lccnn")
    result = refusal(proc, Path(tempfile.mkdtemp()), "learning_rate")
    result["ok"] = result["ok"] and same_params(params, ref_params)
    return {"command": "rerun a finished folder with --config.optimizer.learning_rate=0.5", **result}


def two_writers(tmp: Path) -> dict:
    """A second command on a folder while the first still trains (a long first run, stopped after)."""
    workdir = tmp / "run"
    long_run = [*SMOKE, "--config.num_epochs=400", "--config.checkpoint_every=2"]
    first = subprocess.Popen(
        main_cmd(workdir, *long_run), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_checkpoint(workdir, first)
    second = run_cmd(main_cmd(workdir, *long_run))
    first_alive = first.poll() is None
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=300)
    result = refusal(second, Path(tempfile.mkdtemp()), "pid")
    result["ok"] = result["ok"] and first_alive and first.returncode == 75
    return {
        "command": "a second run on a folder being trained",
        "first_alive": first_alive,
        "first_status": first.returncode,
        **result,
    }


def corrupt_newest_checkpoint(tmp: Path) -> dict:
    ref_step, ref_params = _reference(tmp)
    workdir = tmp / "run"
    shutil.copytree(tmp.parent / "reference", workdir)
    newest = max(
        (p for p in (workdir / "lccnn" / "checkpoints").glob("*") if p.name.isdigit()), key=lambda p: int(p.name)
    )
    for f in newest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * f.stat().st_size)
    step, _, warned = params_of(workdir / "lccnn")
    says_so = any("final.json reports" in w or "reports the run finished" in w for w in warned)
    again = run_cmd(main_cmd(workdir, *SMOKE, *LONGER))
    new_step, params, _ = params_of(workdir / "lccnn")
    ok = (
        step < ref_step
        and says_so
        and again.returncode == 0
        and new_step == ref_step
        and same_params(params, ref_params)
    )
    return {
        "command": "zero the newest checkpoint's files, load_trained, rerun",
        "load_trained_step": step,
        "warned_final_json_differs": says_so,
        "rerun_status": again.returncode,
        "ok": ok,
    }


def archive_replaced(tmp: Path) -> dict:
    archive = write_archive(tmp / "imgs.tar", {"cat": 10, "dog": 200})
    workdir = tmp / "run"
    args = [*IMAGES, f"--config.data.archive={archive}", f"--config.data.data_dir={tmp / 'tfds'}"]
    first = run_cmd(main_cmd(workdir, *args))
    _, before, _ = params_of(workdir / "lccnn")
    write_archive(archive, {"cat": 60, "dog": 120})
    again = run_cmd(main_cmd(workdir, *args))
    _, after, _ = params_of(workdir / "lccnn")
    result = refusal(again, Path(tempfile.mkdtemp()), "data.archive content")
    result["ok"] = result["ok"] and first.returncode == 0 and same_params(before, after)
    return {"command": "train, replace the archive in place, rerun", **result}


CASES: dict[str, Callable[[Path], dict]] = {
    **{name: (lambda tmp, o=o, f=f: flag_case(tmp, o, f)) for name, (o, f) in FLAG_CASES.items()},
    "missing_config_file": missing_config_file,
    "empty_archive": archive_case({}, "no images found"),
    "one_class_archive": archive_case({"cat": 0}, "class"),
    "corrupt_image": archive_case({"cat": 0, "dog": 128}, "dog/broken.png", corrupt="dog/broken.png"),
    "sigterm_at_startup": sigterm_at_startup,
    "kill_9_resume": interrupted(signal.SIGKILL),
    "sigterm_resume": interrupted(signal.SIGTERM),
    "changed_config": changed_config,
    "two_writers": two_writers,
    "corrupt_newest_checkpoint": corrupt_newest_checkpoint,
    "archive_replaced_in_place": archive_replaced,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated case names (default: all)")
    p.add_argument("--out", default=None, help="append one JSON line per case to this file")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CASES)
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        print(f"error: --only: unknown case(s) {unknown}; choose from {sorted(CASES)}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="lateral_jax_cases_") as root:
        for name in names:
            tmp = Path(root) / name
            tmp.mkdir()
            start = time.time()
            try:
                row = {"case": name, **CASES[name](tmp)}
            except Exception as e:  # noqa: BLE001 - a case that crashes is a failed case, reported
                row = {"case": name, "ok": False, "crash": f"{type(e).__name__}: {e}"[:500]}
            row["seconds"] = round(time.time() - start, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"cases": len(rows), "ok": sum(r["ok"] for r in rows), "failed": [r["case"] for r in rows if not r["ok"]]}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            for row in [*rows, summary]:
                f.write(json.dumps(row) + "\n")
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
