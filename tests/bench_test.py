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
