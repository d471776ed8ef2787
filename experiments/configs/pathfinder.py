"""F-CNN vs LC-CNN vs LCEI-CNN on the embedded Pathfinder-style task.

Command: python -m experiments.main --config experiments/configs/pathfinder.py --workdir runs/pathfinder
Smoke: --config experiments/configs/pathfinder.py:smoke
Runtime: about 6 minutes on a 2-core CPU.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.synthetic_config("pathfinder", variant)
