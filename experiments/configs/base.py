"""Shared defaults of every experiment config (see the per-dataset files for commands and results).

A config describes a *comparison*: the data, optimiser and schedule shared by every model, the
base model settings, and ``variants``: named overrides of the model settings (e.g. ``fcnn`` =
``kind='fcnn'``).  ``experiments/main.py`` trains ``models`` (a tuple of variant names) one after
another, each in ``<workdir>/<variant>``, then writes ``<workdir>/report.md``.
"""

import ml_collections


def lateral_config(**overrides) -> ml_collections.ConfigDict:
    """Fields of lateral_jax.recurrence.LateralConfig; the default is LateralConfig.stable()."""
    base = dict(
        kernel_size=3,
        lateral_size=3,
        inhibitory_size=None,
        mixing="full",
        leak=1.0,
        drive_norm="group",
        loop_norm="group",
        num_groups=4,
        activation="relu",
        lateral_init_scale=0.1,
        conv_algorithm="auto",
        loop_kernel="xla",
    )
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def standard_variants() -> dict:
    """The paper's three models and our two controls."""
    return {
        "fcnn": {"kind": "fcnn"},
        "lccnn": {"kind": "lccnn"},
        "lceicnn": {"kind": "lceicnn", "ei_mode": "mixed_sign", "ei_weight": 1e-3},
        "lceicnn_param": {"kind": "lceicnn", "ei_mode": "parametrise"},
        "lceicnn_proj": {"kind": "lceicnn", "ei_mode": "project"},
        "fcnn_matched": {"kind": "fcnn_matched"},
        "unshared": {"kind": "unshared"},
    }


def get_base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(
        dict(
            dataset="contour",
            num_train=4096,
            num_validation=1024,
            task={},
            archive="",
            image_size=32,
            validation_fraction=0.1,
            train_subset=0,
            data_dir="",
            download=True,
            augment=False,
        )
    )
    c.model = ml_collections.ConfigDict(
        dict(
            kind="lccnn",
            widths=(16, 32, 32),
            num_steps=4,
            lateral=lateral_config(),
            grad_mode="full",
            truncate_steps=0,
            ei_mode="none",
            ei_weight=0.0,
            excitatory_fraction=0.8,
            dtype="float32",
        )
    )
    c.optimizer = ml_collections.ConfigDict(
        dict(
            name="adam",
            learning_rate=3e-3,
            momentum=0.9,
            weight_decay=0.0,
            schedule="cosine",
            warmup_steps=30,  # a short warm-up: without it LC-CNNs often stall at chance on the contour task
            grad_clip_norm=1.0,
        )
    )
    c.variants = standard_variants()
    c.models = ("fcnn", "lccnn", "lceicnn")
    c.batch_size = 128
    c.num_epochs = 5.0
    c.seed = 0
    c.log_every = 20
    c.eval_every = 0
    c.checkpoint_every = 0
    c.keep_checkpoints = 2
    return c


def make_smoke(c: ml_collections.ConfigDict, *, batch_size: int = 32, **data) -> ml_collections.ConfigDict:
    """The tiny `:smoke` variant of a config (CPU and CI): 2 stages of 8 channels, T = 2, 1 epoch."""
    c.model.widths = (8, 8)
    c.model.num_steps = 2
    c.model.lateral.num_groups = 4
    c.num_epochs = 1.0
    c.batch_size = batch_size
    c.log_every = 2
    c.optimizer.warmup_steps = 0
    c.data.update(data)
    return c


def tfds_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """MNIST-like tfds datasets (28×28×1): two stages 32/64, Adam 1e-3, 10 epochs."""
    c = get_base_config()
    c.data.dataset = dataset
    c.model.widths = (32, 64)
    c.model.lateral.num_groups = 8
    c.optimizer.update(dict(name="adam", learning_rate=1e-3))
    c.batch_size = 128
    c.num_epochs = 10.0
    return make_smoke(c, train_subset=256) if variant == "smoke" else c
