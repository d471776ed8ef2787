"""The main job: F-CNN vs LC-CNN vs LCEI-CNN on the embedded contour-integration task, seeds 0–2.

Command (also the README's main job):
  python -m experiments.main --config experiments/configs/contour.py --workdir runs/main
Smoke variant (CI, one seed, under a minute): --config experiments/configs/contour.py:smoke
Runtime: 7.5 minutes for the 9 runs and the analysis on a 2-core AMD EPYC with AVX2 only (README).
Measured (validation accuracy, mean ± std over seeds 0–2): F-CNN 0.671 ± 0.018, LC-CNN 0.878 ± 0.077,
LCEI-CNN 0.874 ± 0.060 (results/main_job_contour/; five seeds of the same protocol in RESULTS.md).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.synthetic_config("contour", variant)
