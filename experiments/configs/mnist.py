"""mnist from tensorflow-datasets (downloaded by tfds on first use; needs internet once).

Command: python -m experiments.main --config experiments/configs/mnist.py --workdir runs/mnist
Smoke: --config experiments/configs/mnist.py:smoke (the test suite runs it on tfds mock data).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.tfds_config("mnist", variant)
