"""The study driver (experiments/study.py) on its smoke protocol: rows, resume, tables."""

import dataclasses
import json

import pytest

from experiments import study
from experiments.configs import variants
from lateral_jax.training import run


def test_study_smoke_resumes_and_tabulates(tmp_path, capsys):
    """Each study run is an ordinary training run folder; finished rows are skipped on a rerun."""
    out = tmp_path / "study.jsonl"
    args = ["--protocol", "smoke", "--datasets", "contour", "--variants", "fcnn,lccnn_T1", "--out", str(out)]
    study.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("fcnn", 0), ("lccnn_T1", 0), ("fcnn", 1), ("lccnn_T1", 1)]
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
