"""mnist from tensorflow-datasets (downloaded by tfds on first use; needs internet once).

Command: python -m experiments.main --config experiments/configs/mnist.py --workdir runs/mnist
Smoke: --config experiments/configs/mnist.py:smoke (the test suite runs it on tfds mock data).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    c = base.get_base_config()
    c.data.dataset = "mnist"
    c.model.widths = (32, 64)
    c.model.lateral.num_groups = 8
    c.optimizer.update(dict(name="adam", learning_rate=1e-3))
    c.batch_size = 128
    c.num_epochs = 10.0
    if variant == "smoke":
        c.data.train_subset = 256
        c.model.widths = (8, 8)
        c.model.num_steps = 2
        c.model.lateral.num_groups = 4
        c.num_epochs = 1.0
        c.batch_size = 32
        c.log_every = 2
        c.optimizer.warmup_steps = 0
    return c
