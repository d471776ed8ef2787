"""ILSVRC-2012 (ImageNet-1k) with lateral ResNets: a plain ResNet (T = 0) against lateral recurrence
(T = 2) in the first two stages.

Data: the standard folder layout ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``
(the validation images sorted into class folders), prepared once as array_record at 256×256
(``--config.data.image_size``), or a tfds-prepared copy (``--config.data.dataset=tfds
--config.data.tfds_name=imagenet2012 --config.data.data_dir=...``).  Training: random-resized crops
of 224² (8–100 % of the area, aspect 3/4–4/3) and flips; evaluation: the central 224².  SGD with
momentum 0.9, learning rate 0.1 × batch / 256 after 5 epochs of linear warm-up,
cosine decay, weight decay 1e-4, label smoothing 0.1, bfloat16 compute, 90 epochs.

Commands (docs/scaling.md has the pod and cluster recipes and the memory table):
  python -m experiments.main --config experiments/configs/imagenet.py --workdir runs/imagenet \\
      --config.data.archive=/path/to/ILSVRC2012 --distributed                # every host of a slice
  --config experiments/configs/imagenet.py:resnet50                       # ResNet-50 (bottleneck)
  --config.optimizer.name=lars --config.batch_size=16384 --config.optimizer.learning_rate=12.8
                                                                          # LARS for large batches
  --config.optimizer.accumulate_steps=4                                   # 4 batches per update
  --config.optimizer.ema_decay=0.9999                                     # evaluate the weight EMA too
Smoke (CPU, CI): --config experiments/configs/imagenet.py:smoke --config.data.archive=<folder of the
same layout> (tests/scale_test.py generates one): ResNet-10-style, 2 stages of 8/16, 40² stored,
32² crops, 1 epoch.
Expected cost: docs/scaling.md projects the time per epoch from the measured FLOPs per image.
"""

from experiments.configs import base


def get_config(variant: str = ""):
    base.check_variant(variant, ("", "resnet50", "smoke"))
    c = base.get_base_config()
    c.models = ("lateral_resnet_T0", "lateral_resnet_T2")
    c.data.dataset = "image_folder"
    c.data.archive = "/data/ILSVRC2012"
    c.data.image_size = 256
    c.data.crop = "random_resized"
    c.data.crop_size = 224
    c.data.augment = True
    c.model.update(
        dict(
            kind="lateral_resnet",
            widths=(64, 128, 256, 512),
            stage_sizes=(2, 2, 2, 2),
            block="basic",
            lateral_stages=(0, 1),
            small_inputs=False,
            num_steps=2,
            dtype="bfloat16",
        )
    )
    c.model.lateral.num_groups = 32
    c.batch_size = 1024
    c.num_epochs = 90.0
    c.label_smoothing = 0.1
    c.optimizer.update(dict(name="momentum", learning_rate=0.1 * c.batch_size / 256, momentum=0.9, weight_decay=1e-4))
    c.optimizer.warmup_steps = 5 * 1_281_167 // c.batch_size
    c.log_every = 100
    c.eval_every = 0
    c.keep_checkpoints = 3
    c.spectral_images = 8
    if variant == "resnet50":
        c.model.update(dict(stage_sizes=(3, 4, 6, 3), block="bottleneck"))
    elif variant == "smoke":
        c.model.update(dict(widths=(8, 16), stage_sizes=(1, 1), num_steps=2, dtype="float32"))
        c.model.lateral.num_groups = 4
        c.data.update(dict(archive="", image_size=40, crop_size=32))
        c.models = ("lateral_resnet_T0", "lateral_resnet_T2")
        c.batch_size = 16
        c.num_epochs = 1.0
        c.log_every = 2
        c.optimizer.update(dict(learning_rate=0.05, warmup_steps=2))
        c.spectral_images = 2
    return c
