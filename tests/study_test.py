"""The study driver (experiments/study.py) on its smoke protocol: rows, resume, tables."""

import dataclasses
import json

import pytest

from experiments import study, study_tables
from experiments.configs import variants
from lateral_jax.training import run


def test_study_smoke_resumes_and_tabulates(tmp_path, capsys):
    """Each study run is an ordinary training run folder; finished rows are skipped on a rerun."""
    out = tmp_path / "study.jsonl"
    args = ["--protocol", "smoke", "--datasets", "contour", "--variants", "fcnn,lccnn_T1", "--out", str(out)]
    study.main([*args, "--shard", "1/2"])  # the second of two processes: runs 1 and 3 of the 4
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("lccnn_T1", 0), ("lccnn_T1", 1)]
    study.main(args)  # the rest
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows = rows[2:] + rows[:2]
    assert [(r["variant"], r["seed"]) for r in rows] == [("fcnn", 0), ("fcnn", 1), ("lccnn_T1", 0), ("lccnn_T1", 1)]
    rows = [rows[0], rows[2], rows[1], rows[3]]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and not r["diverged"] for r in rows)
    assert rows[0]["num_params"] < rows[1]["num_params"]
    assert rows[0]["train_examples"] == 128 and rows[0]["val_examples"] == 64
    assert study.analytic_forward_flops(rows[1]) > study.analytic_forward_flops(rows[0])
    folder = study.run_dir(out, "contour", "lccnn_T1", 0)
    final = json.loads((folder / "final.json").read_text())
    assert final["validation_accuracy"] == rows[1]["val_accuracy"]
    config = json.loads((folder / "config.json").read_text())
    assert config["device_data"] is True and config["model"]["num_steps"] == 1 and config["data"]["seed"] == 0
    study.main(args)  # finished runs are skipped
    assert len(out.read_text().splitlines()) == 4
    capsys.readouterr()
    study.main(["--tables", str(out)])
    table = capsys.readouterr().out
    assert "| fcnn |" in table and "| lccnn_T1 |" in table and "Protocol `smoke`" in table
    lines = out.read_text().splitlines()  # several files: their rows are pooled
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[2:]) + "\n")
    study.main(["--tables", f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"])
    assert capsys.readouterr().out == table


def test_a_killed_run_resumes_from_its_last_epoch_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    """A study run dies in its second epoch; rerun, it resumes from the first epoch's checkpoint
    and ends exactly where an uninterrupted run ends."""
    protocol = dataclasses.replace(study.PROTOCOLS["smoke"], synthetic_epochs=2)
    config = study.run_config("contour", "fcnn", 0, protocol, 128)
    uninterrupted = study.run_one("contour", "fcnn", 0, protocol, config, tmp_path / "a.jsonl")
    advance, calls = run.DeviceFeed.advance, []

    def dies_in_epoch_two(self, state):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed in epoch 2")
        return advance(self, state)

    monkeypatch.setattr(run.DeviceFeed, "advance", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        study.run_one("contour", "fcnn", 0, protocol, config, tmp_path / "b.jsonl")
    folder = study.run_dir(tmp_path / "b.jsonl", "contour", "fcnn", 0)
    assert sorted(p.name for p in (folder / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    resumed = study.run_one("contour", "fcnn", 0, protocol, config, tmp_path / "b.jsonl")
    assert len(calls) == 3  # one more epoch after the resume, not two
    assert resumed["val_loss"] == uninterrupted["val_loss"]
    assert resumed["val_accuracy"] == uninterrupted["val_accuracy"]


def test_variant_names_define_each_model_once():
    assert variants.overrides("lceicnn_T4_l1e-2") == {
        "kind": "lceicnn", "ei_mode": "mixed_sign", "ei_weight": 1e-2, "num_steps": 4
    }  # fmt: skip
    assert variants.overrides("lceicnn_param") == {"kind": "lceicnn", "ei_mode": "parametrise", "ei_weight": 0.0}
    assert variants.overrides("fcnn_matched") == {"kind": "fcnn_matched"}
    assert variants.overrides("unshared_T4") == {"kind": "unshared", "num_steps": 4}
    with pytest.raises(ValueError, match="variant 'lccnn_X2' is not a valid name"):
        variants.overrides("lccnn_X2")


def test_tables_mark_variants_whose_seeds_ran_on_other_devices():
    row = {
        "dataset": "cifar10", "protocol": "gpu", "variant": "fcnn", "kind": "fcnn", "num_steps": 0,
        "widths": [64, 128, 256], "val_accuracy": 0.6, "diverged": False, "num_params": 1, "wall_s": 1.0,
        "device": "NVIDIA H200",
    }  # fmt: skip
    rows = [row, {**row, "val_accuracy": 0.62}, {**row, "device": "cpu", "dtype": "float32"}]
    table = study.tables(rows)
    assert "| fcnn | 60.67 ± 1.15 % | 3† |" in table
    assert "† seeds run on more than one device/compute dtype: fcnn: NVIDIA H200 bfloat16, cpu float32." in table


def _row(variant, seed, acc, dataset="contour", protocol="embedded"):
    return {"dataset": dataset, "protocol": protocol, "variant": variant, "seed": seed, "val_accuracy": acc}


def test_a_run_within_five_points_of_chance_counts_as_a_failure():
    assert study_tables.failed(_row("lccnn_T4", 0, 0.5499)) and not study_tables.failed(_row("x", 0, 0.55))
    assert study_tables.failed(_row("lccnn_T4", 0, None))  # diverged
    assert study_tables.failed(_row("fcnn", 0, 0.149, dataset="cifar10"))  # chance is 10 % there
    assert not study_tables.failed(_row("fcnn", 0, 0.15, dataset="cifar10"))
    rows = [_row("lccnn_T4", s, a, protocol="cpu") for s, a in enumerate((0.80, 0.51, 0.90))]
    rows += [_row("lccnn_T4", s, 0.8) for s in range(5)]
    rows += [_row("fcnn", s, 0.52) for s in range(5)] + [_row("fcnn_matched", s, a) for s, a in enumerate((0.5, 0.7))]
    table = study.failure_table(rows, ("cpu", "embedded"))
    assert "| lccnn_T4 | 1 / 3 | 0 / 5 |" in table
    assert "| fcnn | – | 5 / 5 (feed-forward, fails every seed) |" in table
    assert "| fcnn_matched | – | 1 / 2 |" in table  # fails on one seed of two: not excused


def test_a_shard_is_i_of_n():
    assert study.parse_shard("1/2") == (1, 2)  # a real split: test_study_smoke_resumes_and_tabulates
    for bad in ("2/2", "x", "1"):
        with pytest.raises(ValueError, match="must be i/n with 0 <= i < n"):
            study.parse_shard(bad)


def test_the_paper_protocol_and_kernel_suffix_reach_the_lateral_layers():
    paper = study.run_config("contour", "lccnn_T4_k7", 0, study.PROTOCOLS["embedded_paper"], 4096)
    assert (paper.model.lateral.drive_norm, paper.model.lateral.loop_norm) == ("none", "none")
    assert paper.model.lateral.lateral_size == 7 and paper.model.num_steps == 4
    stable = study.run_config("contour", "lccnn_T4", 0, study.PROTOCOLS["embedded"], 4096)
    assert (stable.model.lateral.loop_norm, stable.model.lateral.lateral_size) == ("group", 3)
    assert (stable.batch_size, stable.optimizer.warmup_steps, stable.model.widths) == (32, 100, (8, 16, 16))
    assert stable.optimizer.learning_rate == 2e-3 and stable.num_epochs == 4.0
    long = study.run_config("pathfinder", "lceicnn_T4_param", 2, study.PROTOCOLS["embedded_long"], 4096)
    short = study.run_config("pathfinder", "lceicnn_T4_param", 2, study.PROTOCOLS["embedded"], 4096)
    assert (long.num_epochs, long.eval_every) == (8.0, 1024)  # evaluated once, at the end
    assert dataclasses.replace(long, num_epochs=4.0, eval_every=512) == short  # only the length differs
