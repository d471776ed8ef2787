"""F-CNN vs LC-CNN vs LCEI-CNN on the embedded Pathfinder-style task.

Command: python -m experiments.main --config experiments/configs/pathfinder.py --workdir runs/pathfinder
Smoke: --config experiments/configs/pathfinder.py:smoke
Runtime: about 6 minutes on a 2-core CPU.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config()
    c.data.dataset = "pathfinder"
    if variant == "smoke":
        c.data.num_train, c.data.num_validation = 256, 128
        c.model.widths = (8, 8)
        c.model.num_steps = 2
        c.num_epochs = 1.0
        c.batch_size = 32
        c.log_every = 2
        c.optimizer.warmup_steps = 0
    return c
