"""The study driver (experiments/study.py) on its smoke protocol: rows, resume, tables."""

import json

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
