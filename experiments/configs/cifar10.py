"""CIFAR-10 from the local JPEG archive (../shared/data/cifar10-jpeg-train.tar.gz), seeded 90/10
train/validation split of its 50,000 training images; validation accuracy is reported.

Command (reduced CPU protocol, widths 32/64/128, 10,000-image subset, 10 epochs):
  python -m experiments.main --config experiments/configs/cifar10.py --workdir runs/cifar10
Full protocol (GPU): --config experiments/configs/cifar10.py:full  (64/128/256, all images, 25 epochs, bf16)
Smoke: --config experiments/configs/cifar10.py:smoke
The archive path can be changed with --config.data.archive=/path/to/archive.tar.gz.
"""

from pathlib import Path

from experiments.configs import base

ARCHIVE = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpeg-train.tar.gz")


def get_config(variant: str = ""):
    base.check_variant(variant, ("", "full", "smoke"))
    c = base.natural_image_config(base.get_base_config())
    c.data.dataset = "image_folder"
    c.data.archive = ARCHIVE
    c.data.validation_fraction = 0.1
    c.data.train_subset = 10_000
    c.batch_size = 128
    c.num_epochs = 10.0
    if variant == "full":
        c.data.train_subset = None
        c.model.widths = (64, 128, 256)
        c.model.dtype = "bfloat16"
        c.num_epochs = 25.0
        c.batch_size = 256
        c.optimizer.learning_rate = 0.1
    elif variant == "smoke":
        base.make_smoke(c, batch_size=64, train_subset=512)
    return c
