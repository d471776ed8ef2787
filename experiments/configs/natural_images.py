"""Kaggle's "Natural Images" (8 classes, layout natural_images/<class>/<image>.jpg), resized to 32×32,
seeded 80/20 train/validation split.

Command (after downloading the archive yourself):
  python -m experiments.main --config experiments/configs/natural_images.py --workdir runs/natural \
      --config.data.archive=/path/to/natural-images.zip
Smoke: --config experiments/configs/natural_images.py:smoke (needs the archive too; the test suite
runs it on a generated archive of the same layout).
"""

from experiments.configs import base


def get_config(variant: str = ""):
    base.check_variant(variant)
    c = base.natural_image_config(base.get_base_config())
    c.data.dataset = "image_folder"
    c.data.image_size = 32
    c.data.validation_fraction = 0.2
    c.batch_size = 64
    c.num_epochs = 15.0
    if variant == "smoke":
        base.make_smoke(c, batch_size=16)
    return c
