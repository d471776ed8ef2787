"""The study's learning-curve table: plateau changes, per-seed values and the verdict, from rows."""

import numpy as np

from experiments import learning_curves


def _row(variant, seed, curve):
    return {
        "dataset": "cifar10",
        "protocol": "p",
        "variant": variant,
        "seed": seed,
        "diverged": False,
        "val_accuracy": curve[-1],
        "val_curve": [[100 * (i + 1), a] for i, a in enumerate(curve)],
    }


def test_plateau_change_is_the_spread_of_the_last_evaluations_in_points():
    assert np.isclose(learning_curves.plateau_change([[1, 0.50], [2, 0.60], [3, 0.612], [4, 0.609]]), 1.2)
    assert np.isclose(learning_curves.plateau_change([[1, 0.5], [2, 0.6]], last=3), 10.0)


def test_table_reports_each_seed_and_how_many_reached_the_plateau(tmp_path):
    rows = [
        _row("fcnn", 0, [0.40, 0.55, 0.600, 0.602, 0.603]),
        _row("fcnn", 1, [0.40, 0.50, 0.560, 0.580, 0.610]),
        _row("lccnn_T4", 0, [0.45, 0.60, 0.650, 0.651, 0.652]),
        {**_row("lccnn_T4", 1, [0.1]), "val_curve": None},  # no curve: left out
    ]
    table = learning_curves.plateau_table(rows)
    assert "| fcnn | 0, 1 | 0.6065 ± 0.0035 | 0.6030, 0.6100 | 0.30, 5.00 | 1 / 2 |" in table
    assert "| lccnn_T4 | 0 | 0.6520 ± 0.0000 | 0.6520 | 0.20 | 1 / 1 |" in table
    learning_curves.figure(rows, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
