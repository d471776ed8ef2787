"""Shared defaults of every experiment config (see the per-dataset files for commands and results).

A config describes a *comparison*: every field of ``lateral_jax.training.config.RunConfig`` (data,
model, optimiser, schedule), shared by the models, plus ``models``: the variant names to train
(:mod:`experiments.configs.variants`).  ``experiments/main.py`` trains each variant in
``<workdir>/<variant>`` and writes ``<workdir>/report.md``.  Fields that may be ``None`` are typed
placeholders, so ``--config.model.loop.truncate_steps=2`` works on the command line.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from experiments.configs import variants
from lateral_jax.core.config import LateralConfig
from lateral_jax.training.config import DataConfig, ModelConfig, RunConfig
from lateral_jax.training.optimizer import OptimizerConfig


def as_config_dict(obj: Any) -> ml_collections.ConfigDict:
    """A config dataclass as a ``ConfigDict`` (nested; ``None`` fields become typed placeholders)."""
    hints = typing.get_type_hints(type(obj))
    out = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            out[field.name] = as_config_dict(value)
        elif value is None:
            kinds = [h for h in typing.get_args(hints[field.name]) if h is not type(None)]
            out[field.name] = config_dict.placeholder(kinds[0])
        elif field.name == "task":
            out[field.name] = ml_collections.ConfigDict(dict(value))
        else:
            out[field.name] = value
    return ml_collections.ConfigDict(out)


def get_base_config() -> ml_collections.ConfigDict:
    """The contour main job's settings (the ``embedded`` study protocol, RESULTS.md); other configs
    start from these.

    ``seeds``: ``None`` trains one run per model with ``seed``; a tuple trains one per seed
    (``<workdir>/<model>_seed<N>``) and the report gives mean ± std.
    """
    run = RunConfig(
        data=DataConfig(dataset="contour", num_train=4096, num_validation=1024),
        model=ModelConfig(widths=(8, 16, 16), lateral=LateralConfig.stable(num_groups=8)),
        # Batch 32 and a 100-step warm-up: at batch 128 with a 30-step warm-up (160 updates) LC-CNNs
        # stalled at chance on one seed in three (RESULTS.md, failure rates).
        optimizer=OptimizerConfig(name="adam", learning_rate=2e-3, weight_decay=0.0, warmup_steps=100),
        batch_size=32,
        num_epochs=4.0,
        keep_checkpoints=2,
    )
    c = as_config_dict(run)
    c.models = ("fcnn", "lccnn", "lceicnn")
    c.seeds = config_dict.placeholder(tuple)
    return c


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """A copy of a comparison config with variant ``variant``'s model fields set on it
    (:func:`experiments.configs.variants.overrides`; nested ``lateral``/``loop`` fields merge into
    the config's).  Command-line overrides are applied to this copy afterwards, so they win."""
    out = copy.deepcopy(config)
    fields = variants.overrides(variant)
    with out.ignore_type():  # a variant's values are the ModelConfig's types already (checked at from_config_dict)
        for group in ("lateral", "loop"):
            out.model[group].update(fields.pop(group, {}))
        out.model.update(fields)
    return out


def to_run_config(config: ml_collections.ConfigDict, variant: str) -> RunConfig:
    """The typed, validated ``RunConfig`` of one variant of a comparison config (no command line)."""
    return from_config_dict(with_variant(config, variant))


def from_config_dict(config: ml_collections.ConfigDict) -> RunConfig:
    """The ``RunConfig`` of a comparison config (its ``models``/``seeds`` left out), validated:
    :meth:`lateral_jax.training.config.RunConfig.from_config_dict`."""
    raw = config.to_dict()
    raw.pop("models", None)
    raw.pop("seeds", None)
    return RunConfig.from_config_dict(raw)


def make_smoke(c: ml_collections.ConfigDict, *, batch_size: int = 32, **data) -> ml_collections.ConfigDict:
    """The tiny `:smoke` variant of a config (CPU and CI): 2 stages of 8 channels, T = 2, 1 epoch."""
    c.model.widths = (8, 8)
    c.model.num_steps = 2
    c.model.lateral.num_groups = 4
    c.seeds = None
    c.num_epochs = 1.0
    c.batch_size = batch_size
    c.log_every = 2
    c.optimizer.warmup_steps = 0
    c.data.update(data)
    return c


def check_variant(variant: str, valid: tuple[str, ...] = ("", "smoke")) -> str:
    """``variant`` (the ``:name`` after a config file's path), or a ``ValueError`` listing the valid ones."""
    if variant not in valid:
        names = ", ".join(repr(v) for v in valid if v)
        raise ValueError(f"config variant {variant!r} is unknown; use one of {names}, or none for the full config.")
    return variant


def synthetic_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """The embedded tasks (contour, pathfinder): the base settings on ``dataset``."""
    check_variant(variant)
    c = get_base_config()
    c.data.dataset = dataset
    # three seeds, the same generated examples for each (seeds differ in initialisation and batch
    # order), the training split on the device
    c.seeds = (0, 1, 2)
    c.data.seed = 0
    c.device_data = True
    return make_smoke(c, num_train=256, num_validation=128) if variant == "smoke" else c


def natural_image_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Settings shared by the natural-image configs (CIFAR-10, Natural Images): widths 32/64/128,
    SGD with momentum 0.05, weight decay 5e-4, crop + flip augmentation (in JAX, on the training
    split decoded once and held on the devices: ``device_data``)."""
    c.data.augment = True
    c.device_data = True
    c.model.widths = (32, 64, 128)
    c.model.lateral.num_groups = 8
    c.optimizer.update(dict(name="momentum", learning_rate=0.05, weight_decay=5e-4))
    return c


def idx_config(dataset: str, variant: str) -> ml_collections.ConfigDict:
    """The MNIST-like datasets (28×28×1, official IDX files): two stages 32/64, Adam 1e-3, 10 epochs."""
    check_variant(variant)
    c = get_base_config()
    c.data.dataset = dataset
    c.model.widths = (32, 64)
    c.model.lateral.num_groups = 8
    c.optimizer.update(dict(name="adam", learning_rate=1e-3))
    c.batch_size = 128
    c.num_epochs = 10.0
    return make_smoke(c, train_subset=256) if variant == "smoke" else c
