"""The benchmark harness (experiments/bench.py) on the reference workload, at a tiny batch."""

import json

import pytest

from experiments import bench


def test_workload_flops_match_workload_md():
    assert bench.flops_per_image(4) / 3 == pytest.approx(0.99e9, rel=0.01)  # "≈ 0.99 GFLOP per image"
    assert bench.flops_per_image(4) == pytest.approx(2.955e9, rel=1e-3)


def test_bench_rows_and_conv_algorithms_agree(capsys):
    """One JSON line per configuration; the Winograd and XLA paths give the same first-step loss
    (T = 0: the afferent convolutions only; tests/winograd_test.py covers the lateral loop)."""
    bench.main(["--batch", "2", "--steps", "0", "--conv-algorithm", "xla,winograd", "--iters", "1", "--warmup", "0"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows[0]["env"]["backend"] == "cpu"
    assert rows[0]["env"]["cpu_model"] == bench.host_cpu() != ""  # the machine is recorded with the numbers
    runs = {r["conv_algorithm"]: r for r in rows[1:]}
    assert set(runs) == {"xla", "winograd"}
    for r in runs.values():
        assert r["batch"] == 2 and r["steps"] == 0 and r["grad_mode"] == "full"
        assert r["images_per_s"] > 0 and r["xla_peak_mib"] > 0
        assert r["train_gflop_per_image"] == pytest.approx(bench.flops_per_image(0) / 1e9, abs=1e-3)
    assert runs["winograd"]["loss"] == pytest.approx(runs["xla"]["loss"], rel=1e-5)


def test_median_ratios_summarise_the_rounds():
    rows = [
        {"ratio_vs": "torch-eager", "ours": "float32/full/auto", "batch": 128, "steps": 4, "ratio": v, "round": i}
        for i, v in enumerate([1.2, 0.9, 1.05])
    ] + [{"impl": "lateral_jax", "images_per_s": 50.0, "round": 0}]
    (summary,) = bench.median_ratios(rows)
    assert summary == {
        "median_ratio_vs": "torch-eager",
        "ours": "float32/full/auto",
        "batch": 128,
        "steps": 4,
        "median_ratio": 1.05,
        "min": 0.9,
        "max": 1.2,
        "rounds": 3,
    }


def test_bench_splits_the_batch_over_devices(capsys):
    bench.main(["--batch", "4", "--steps", "1", "--devices", "2", "--conv-algorithm", "xla", "--memory-only"])
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()][1:]
    assert row["devices"] == 2 and row["batch"] == 4 and row["xla_peak_mib"] > 0
    with pytest.raises(ValueError, match="--devices 2 needs .* a batch divisible by it \\(got 3\\)"):
        bench.main(["--batch", "3", "--steps", "1", "--devices", "2", "--memory-only"])


def test_sign_test_and_paired_summary_numbers():
    from experiments import peer_stepper

    assert peer_stepper.sign_test_p(10, 10) == pytest.approx(2 / 1024)  # all ten pairs one way
    assert peer_stepper.sign_test_p(8, 10) == pytest.approx(2 * (45 + 10 + 1) / 1024)
    assert peer_stepper.sign_test_p(5, 10) == 1.0 and peer_stepper.sign_test_p(0, 0) == 1.0
    ours, peer = [1.0, 2.0, 1.0, 1.0], [1.5, 2.2, 0.9, 1.2]  # per-pair speed-ups 1.5, 1.1, 0.9, 1.2
    summary = peer_stepper.paired_summary(ours, peer, batch=128)
    assert summary["pairs"] == 4 and summary["ours_faster_in"] == 3
    assert summary["median_ratio"] == pytest.approx(1.15)
    assert summary["q25"] == pytest.approx(1.05) and summary["q75"] == pytest.approx(1.275)
    assert summary["sign_test_p"] == pytest.approx(0.625)
    assert peer_stepper.paired_summary([1.0] * 40, [1.1] * 40, batch=1)["sign_test_p"] == pytest.approx(1.82e-12)
    assert summary["ours_images_per_s"] == pytest.approx(128.0) and summary["peer_images_per_s"] == pytest.approx(
        128 / 1.35, abs=0.05
    )
    with pytest.raises(ValueError, match="equally many paired timings, got 2 and 1"):
        peer_stepper.paired_summary([1.0, 1.0], [1.0], batch=1)


def test_stepper_protocol_runs_the_requested_steps():
    import io

    from experiments import peer_stepper

    calls = []
    replies = io.StringIO()
    total = peer_stepper.serve(lambda: calls.append(1) or 0.25 * len(calls), io.StringIO("2\nx\n3\nquit\n9\n"), replies)
    lines = [json.loads(line) for line in replies.getvalue().splitlines()]
    assert total == 5 and len(calls) == 5  # "9" after "quit" is never run
    assert lines[0]["loss"] == 0.5 and lines[2]["loss"] == 1.25
    assert len(lines[0]["seconds"]) == 2 and len(lines[2]["seconds"]) == 3 and min(lines[2]["seconds"]) >= 0
    assert lines[1] == {"error": "expected a positive step count or 'quit', got 'x'"}


def test_paired_steps_alternate_with_a_live_child_process(capsys):
    """bench's alternation against a real child process speaking the stepper protocol (a pure-Python
    step that sleeps 10 ms, so the test needs no torch), and the train step really advancing."""
    import subprocess
    import sys

    import jax
    import jax.numpy as jnp

    child = (
        "import sys, time, json; from experiments.peer_stepper import serve; "
        "print(json.dumps({'ready': True}), flush=True); serve(lambda: time.sleep(0.01) or 1.0, sys.stdin, sys.stdout)"
    )
    peer = subprocess.Popen(
        [sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert json.loads(peer.stdout.readline()) == {"ready": True}
    step = jax.jit(lambda s, d: (s + d, {"loss": s.sum()})).lower(jnp.zeros(3), jnp.ones(3)).compile()
    rows: list[dict] = []
    ours_s, peer_s, metrics = bench._alternate(step, jnp.zeros(3), jnp.ones(3), peer, 4, 2, rows)
    peer.stdin.write("quit\n")
    peer.stdin.close()
    assert peer.wait(timeout=30) == 0
    assert float(metrics["loss"]) == 24.0  # warm-up + 4 pairs × 2 steps: the last loss is sum([8, 8, 8])
    assert [len(t) for t in ours_s] == [len(t) for t in peer_s] == [2, 2, 2, 2]
    assert all(t >= 0.01 for block in peer_s for t in block)
    assert [r["pair"] for r in rows] == [0, 1, 2, 3]
    assert [r["speedup"] for r in rows] == [round(sum(p) / sum(o), 3) for p, o in zip(peer_s, ours_s, strict=True)]
    assert capsys.readouterr().out.count('"pair"') == 4


def test_paired_mode_against_the_torch_peer(capsys):
    pytest.importorskip("torch", reason="PyTorch is not installed here (the peer comparison needs it)")
    if not bench.TORCH_PEER.exists():
        pytest.skip(f"{bench.TORCH_PEER} is absent")
    bench.main(["--batch", "2", "--steps", "1", "--paired", "2", "--paired-block", "2", "--conv-algorithm", "xla"])
    (summary,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "paired_ratio_vs" in line]
    assert summary["pairs"] == summary["warm"]["pairs"] == 2 and summary["block"] == 2
    assert summary["batch"] == 2 and summary["ours_images_per_s"] > 0


def test_paired_options_are_checked(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--paired", "3", "--paired-block", "0"])
    assert "--paired-block K >= 1 steps; got 3 and 0" in capsys.readouterr().err
