"""Multi-host data parallelism on one machine: two processes joined by jax.distributed on localhost."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

WORKER = Path(__file__).with_name("multihost_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """Each process feeds its own half of every global batch (the real grain pipeline, process-sharded);
    after 3 steps the parameters equal a single process's on the global batch (atol 1e-5: only the
    order of the gradient all-reduce differs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--processes",
                "2",
                "--process-id",
                str(i),
                "--port",
                str(port),
                "--out",
                str(tmp_path / "multi.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    subprocess.run(
        [sys.executable, str(WORKER), "--processes", "1", "--out", str(tmp_path / "single.npz")],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    multi, single = np.load(tmp_path / "multi.npz"), np.load(tmp_path / "single.npz")
    assert sorted(multi.files) == sorted(single.files) and len(multi.files) > 5
    for name in single.files:
        np.testing.assert_allclose(multi[name], single[name], atol=1e-5, rtol=1e-5, err_msg=name)
    assert not np.allclose(single["['lateral_0']['w_ff']"], 0.0)


RUN_WORKER = Path(__file__).with_name("multihost_run_worker.py")


def launch(workdir: Path, processes: int = 2) -> list[subprocess.Popen]:
    """The 2 processes of one multi-host run of ``multihost_run_worker.py`` (device-resident data)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, str(RUN_WORKER), "--processes", str(processes), "--process-id", str(i)]
            + ["--port", str(port), "--workdir", str(workdir), "--device-data"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]


def test_two_process_run_killed_and_resumed_equals_an_uninterrupted_one(tmp_path):
    """Two processes (gloo), each device holding its share of the device-resident split, train a whole
    run with orbax checkpoints.  Killed with SIGKILL after its first checkpoint and restarted, the run
    ends with bitwise the parameters of an uninterrupted two-process run; metrics and final.json are
    written once (no duplicate records); the two-process evaluation equals a single-process one."""
    import json
    import signal
    import time

    from lateral_jax.core.sharding import make_mesh
    from lateral_jax.training import run, train
    from lateral_jax.training.data import pipeline
    from lateral_jax.training.sharding import replicate

    finish(launch(tmp_path / "whole"))
    procs = launch(tmp_path / "killed")
    deadline = time.monotonic() + 240
    while not (tmp_path / "killed" / "checkpoints" / "10").is_dir():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint appeared"
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "the run finished before it could be killed"
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert not (tmp_path / "killed" / "final.json").exists()
    finish(launch(tmp_path / "killed"))

    whole, resumed = run.load_trained(tmp_path / "whole"), run.load_trained(tmp_path / "killed")
    assert whole.step == resumed.step == 40
    leaves = jax.tree_util.tree_leaves_with_path(whole.params)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    for folder in ("whole", "killed"):
        records = [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]
        keys = [(r["step"], r["kind"]) for r in records]
        assert len(keys) == len(set(keys)) == 8, keys  # train + eval at each of the 4 epoch ends
    final = json.loads((tmp_path / "whole" / "final.json").read_text())
    mesh = make_mesh()  # this process alone, 8 devices
    single = train.evaluate(
        train.jit_eval_step(whole.model, mesh),
        replicate(whole.params, mesh),
        pipeline.eval_batches(whole.data.validation, global_batch_size=16, normalisation=whole.data.normalisation),
        mesh,
    )
    assert single["count"] == final["validation_examples"] == 72
    assert single["accuracy"] == final["validation_accuracy"]
    np.testing.assert_allclose(single["loss"], final["validation_loss"], rtol=1e-5)
