"""The difficulty curves (experiments/curves.py) on the study's smoke protocol: rows, resume, reuse, tables."""

import dataclasses
import json

import pytest

from experiments import curves, study

KNOB = [("pathfinder", "num_curves")]


def test_curves_train_each_level_resume_and_tabulate(tmp_path, capsys):
    out, smoke = tmp_path / "curves.jsonl", study.PROTOCOLS["smoke"]
    # a study row at the default level (2 curves) stands in for that run
    reuse = tmp_path / "study.jsonl"
    reuse.write_text(json.dumps({"dataset": "pathfinder", "protocol": "smoke", "variant": "fcnn", "seed": 0}) + "\n")
    assert curves.run_curves(out, KNOB, models=("fcnn",), seeds=(0,), protocol=smoke, reuse=[reuse])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["knob"], r["level"], r["variant"]) for r in rows] == [
        ("num_curves", 3.0, "fcnn"),
        ("num_curves", 4.0, "fcnn"),
    ]
    config = json.loads(
        (curves.run_folder(out, "pathfinder", "num_curves", 4.0, "fcnn", 0) / "config.json").read_text()
    )
    assert config["data"]["task"] == [["num_curves", 4]]  # an int knob stays an int
    assert curves.level_config("pathfinder", "num_curves", 2.0, "fcnn", 0, smoke).data.task == ()  # the default
    assert curves.run_curves(out, KNOB, models=("fcnn",), seeds=(0,), protocol=smoke, reuse=[reuse])
    assert len(out.read_text().splitlines()) == 2  # finished runs are skipped
    points = curves.curve_points(
        rows,
        [{**r, "dataset": "pathfinder", "knob": None, "protocol": "smoke", "val_accuracy": 0.7} for r in rows[:1]],
        protocol="smoke",
    )
    assert points["pathfinder", "num_curves", 2.0, "fcnn"] == [0.7]
    points[("pathfinder", "num_curves", 3.0, "lccnn_T4")] = [0.8, 0.9]
    points[("pathfinder", "num_curves", 3.0, "fcnn")] = [0.6, 0.6]
    points[("pathfinder", "num_curves", 3.0, "fcnn_matched")] = [0.55]  # the gain is over the better control
    table = curves.tables(points)
    assert "| lccnn_T4 | – | 85.0 ± 7.1 (2) | – |" in table
    assert "| lccnn_T4 − best F-CNN (points) | – | +25.0 | – |" in table
    curves.figure(points, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_unknown_knobs_are_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown contour:width; choose from contour:path_length"):
        curves.parse_knobs("contour:width")


def test_levels_outside_the_knobs_are_refused_naming_the_known_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        curves.main(["--knobs", "pathfinder_published:contour_length", "--levels", "7"])
    assert exit_info.value.code == 2
    assert "--levels: 7 is not among the knobs' levels [6.0, 9.0, 14.0]" in capsys.readouterr().err


def test_the_pathfinder_benchmark_runs_published_lengths_with_the_hgru_settings(tmp_path, monkeypatch):
    """The field's benchmark is a curve over the published contour length: its protocol's data and
    the benchmark hGRU (C-RBP in implicit mode); each row carries the loops' ρ(J), tabulated."""
    from lateral_jax.core.hgru import HGRUConfig

    bench = study.PROTOCOLS["pathfinder_bench"]
    config = curves.level_config("pathfinder_published", "contour_length", 9.0, "hgru_T8_crbp", 1, bench)
    assert config.data.dataset == "pathfinder_published" and config.data.task == (("contour_length", 9),)
    assert (config.data.num_train, config.data.num_validation, config.num_epochs) == (16384, 1024, 4.0)
    assert config.model.hgru == HGRUConfig(kernel_size=5, num_groups=4, activation="tanh")
    assert config.model.loop.grad_mode == "implicit" and config.model.contractor_weight == 1.0
    assert curves.level_config("pathfinder_published", "contour_length", 6.0, "fcnn", 0, bench).data.task == ()

    monkeypatch.setenv("LATERAL_JAX_DATA", str(tmp_path / "data"))
    out, knob = tmp_path / "bench.jsonl", [("pathfinder_published", "contour_length")]
    tiny = dataclasses.replace(study.PROTOCOLS["smoke"], synthetic_train=64, synthetic_validation=32)
    assert curves.run_curves(out, knob, models=("hgru_T2",), seeds=(0,), protocol=tiny, levels=(9.0,))
    assert [json.loads(line)["level"] for line in out.read_text().splitlines()] == [9.0]  # only the given level
    assert curves.run_curves(out, knob, models=("hgru_T2",), seeds=(0,), protocol=tiny)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["level"], r["val_examples"]) for r in rows] == [(9.0, 32), (6.0, 32), (14.0, 32)]
    assert all(set(r["spectral_radius"]) == {"hgru"} and 0 < r["spectral_radius"]["hgru"] < 10 for r in rows)
    rows = sorted(rows, key=lambda r: r["level"])
    rows[0]["spectral_radius"] = {"hgru": 0.5}
    rows[1]["spectral_radius"] = {"hgru": 0.75}
    table = curves.spectral_table([*rows[:2], {**rows[1], "seed": 1, "spectral_radius": {"hgru": 0.25}}], ("hgru_T2",))
    assert "| hgru_T2 | 0.500 | 0.500 ± 0.354 |" in table
