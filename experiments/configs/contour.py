"""The main job: F-CNN vs LC-CNN vs LCEI-CNN on the embedded contour-integration task.

Command (also the README's main job):
  python -m experiments.main --config experiments/configs/contour.py --workdir runs/main
Smoke variant (CI, ~1 min): --config experiments/configs/contour.py:smoke
Runtime: about 7 minutes on a 2-core CPU (fcnn ~0.5 min, lccnn/lceicnn ~2.5 min each, analysis ~1.5 min).
Expected result (seed 0, measured): F-CNN ≈ 0.60, LC-CNN ≈ 0.88 validation accuracy; seeds vary (RESULTS.md).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.synthetic_config("contour", variant)
