"""F-CNN vs LC-CNN vs LCEI-CNN on the embedded Pathfinder-style task, seeds 0–2 (the main job's protocol).

Command: python -m experiments.main --config experiments/configs/pathfinder.py --workdir runs/pathfinder
Smoke: --config experiments/configs/pathfinder.py:smoke
Five seeds of the same protocol: RESULTS.md (LC-CNN
69.6 ± 7.0 %, F-CNN 56.1 ± 2.1 %).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.synthetic_config("pathfinder", variant)
