"""The study driver (experiments/study.py) on its smoke protocol: rows, resume, tables."""

import dataclasses
import json

import pytest

from experiments import study


def test_study_smoke_resumes_and_tabulates(tmp_path, capsys):
    out = tmp_path / "study.jsonl"
    args = ["--protocol", "smoke", "--datasets", "contour", "--variants", "fcnn,lccnn_T1", "--out", str(out)]
    study.main(args)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("fcnn", 0), ("lccnn_T1", 0), ("fcnn", 1), ("lccnn_T1", 1)]
    assert all(0.0 <= r["val_accuracy"] <= 1.0 and not r["diverged"] for r in rows)
    assert rows[0]["num_params"] < rows[1]["num_params"]
    assert study.analytic_forward_flops(rows[1]) > study.analytic_forward_flops(rows[0])
    assert (tmp_path / "study_contour_fcnn.npz").exists()  # seed-0 params saved for analysis
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


def test_a_killed_run_resumes_from_its_last_epoch_and_matches_an_uninterrupted_one(tmp_path, capsys):
    protocol = dataclasses.replace(study.PROTOCOLS["smoke"], synthetic_epochs=2)
    arrays, compiled = study.load_dataset("contour", protocol), {}  # one compilation for the three runs

    def run(out):
        return study.run_one("contour", "fcnn", 0, protocol, arrays, compiled, out, save_params=False)

    uninterrupted = run(tmp_path / "a.jsonl")
    model, mconfig, tx, mesh, epoch_fn, eval_fn, epochs = compiled[("contour", "fcnn")]
    calls = []

    def dies_in_epoch_two(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed in epoch 2")
        return epoch_fn(*args)

    compiled[("contour", "fcnn")] = (model, mconfig, tx, mesh, dies_in_epoch_two, eval_fn, epochs)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.jsonl")
    assert study.run_checkpoint_dir(tmp_path / "b.jsonl", "contour", "fcnn", 0).exists()
    compiled[("contour", "fcnn")] = (model, mconfig, tx, mesh, epoch_fn, eval_fn, epochs)
    resumed = run(tmp_path / "b.jsonl")
    assert "resuming after epoch 1 of 2" in capsys.readouterr().out
    assert resumed["val_loss"] == uninterrupted["val_loss"]
    assert resumed["val_accuracy"] == uninterrupted["val_accuracy"]


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
