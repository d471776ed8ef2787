"""Fashion-MNIST from its official release files (the four IDX files), prepared as array_record without
TensorFlow: downloaded (checksummed) on first use on a machine with internet, or read from
``--config.data.raw_dir`` (default ``~/tensorflow_datasets/raw/fashion_mnist``).  Validation: a seeded 10 %
of the training split; the official test split is reported at the end (``test_accuracy``).

Command: python -m experiments.main --config experiments/configs/fashion_mnist.py --workdir runs/fashion_mnist
Smoke: --config experiments/configs/fashion_mnist.py:smoke (the test suite runs it on generated IDX files).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    return base.idx_config("fashion_mnist", variant)
