"""The main job: F-CNN vs LC-CNN vs LCEI-CNN on the embedded contour-integration task.

Command (also the README's main job):
  python -m experiments.main --config experiments/configs/contour.py --workdir runs/main
Smoke variant (CI, under a minute): --config experiments/configs/contour.py:smoke
Runtime: about 4 minutes on a 2-core CPU (README: training 3.3 min, analysis 47 s on an AMD EPYC).
Expected result (seed 0, measured): F-CNN ≈ 0.60, LC-CNN ≈ 0.88 validation accuracy; seeds vary (RESULTS.md).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.synthetic_config("contour", variant)
