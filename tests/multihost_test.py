"""Multi-host data parallelism on one machine: two processes joined by jax.distributed on localhost."""

import os
import socket
import subprocess
import sys
from pathlib import Path

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
