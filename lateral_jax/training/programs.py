"""What a run compiles: its model, optimiser and jitted programs, built once per process per config.

A run's programs (the train step or device epoch, the evaluation step, the loop spectral radii)
depend on the model and optimiser configs, the data's shape and classes, the batch and the
devices, not on the seed or the data's values.  :func:`programs` builds them for a key of exactly
those and keeps the last few, so the second and later seeds of a model in one process
(``experiments.main`` with several seeds, a study) reuse the compiled executables instead of
tracing and compiling them again: jitted functions are cached by function object, and a fresh
closure per run would miss that cache every time.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from lateral_jax.core import dynamics, hgru_models, models
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import device_epochs, train
from lateral_jax.training.config import ModelConfig
from lateral_jax.training.data import sources
from lateral_jax.training.optimizer import OptimizerConfig, make_optimizer

COMPILATION_CACHE_ENV = "LATERAL_JAX_COMPILATION_CACHE"


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process and returns its folder.

    A second process that compiles the same program (a rerun of the main job, the next shard of a
    study, ``predict``) loads the executable instead of compiling it again; the program and hence
    every number are the same.  The folder: ``directory``, else ``$LATERAL_JAX_COMPILATION_CACHE``,
    else ``$JAX_COMPILATION_CACHE_DIR``, else ``~/.cache/lateral_jax/jax``;
    ``LATERAL_JAX_COMPILATION_CACHE=off`` turns it off (returns ``None``).  Only programs that took
    at least a second to compile are written.  The library never calls this itself: the entry
    points in ``experiments/`` do, a user's own code may.
    """
    setting = os.environ.get(COMPILATION_CACHE_ENV, "")
    if directory is None and setting.lower() in ("off", "0", "false", "no"):
        return None
    folder = directory or setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or "~/.cache/lateral_jax/jax"
    folder = os.path.expanduser(str(folder))
    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return folder


def quiet_libraries(verbose: bool = False) -> None:
    """What the entry points print besides their own lines: with ``verbose`` everything, else only
    errors from the libraries' loggers (JAX's backend probing, tfds's preparation notes) and no tfds
    progress bars, so a refusal is the one ``error:`` line it writes.  Python ``warnings`` (the
    library's own advice) are not affected."""
    import logging

    from absl import logging as absl_logging

    level = logging.INFO if verbose else logging.ERROR
    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    for name in ("", "absl", "jax", "tensorflow_datasets"):
        logging.getLogger(name).setLevel(level)
    sources.TFDS_PROGRESS["show"] = verbose


def build_model(config: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> Any:
    """The Flax model of ``config`` for ``num_classes`` outputs and ``input_shape`` (H, W, C) inputs."""
    common = dict(
        num_classes=num_classes,
        lateral=config.lateral,
        loop=config.loop,
        ei_mode=config.ei_mode,
        ei_weight=config.ei_weight,
        excitatory_fraction=config.excitatory_fraction,
        dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32,
    )
    if config.kind == "lateral_resnet":
        return models.LateralResNet(
            stage_sizes=config.stage_sizes or (2,) * len(config.widths),
            widths=config.widths,
            block=config.block,
            lateral_stages=config.lateral_stages,
            small_inputs=input_shape[0] <= 64 if config.small_inputs is None else config.small_inputs,
            num_groups=config.lateral.num_groups,
            num_steps=config.num_steps,
            **common,
        )
    if config.kind == "hgru":
        return hgru_models.HGRUNet(
            width=config.widths[0],
            stem_size=config.lateral.kernel_size,
            num_classes=num_classes,
            num_steps=config.num_steps,
            config=config.hgru,
            loop=config.loop,
            ei_mode=config.ei_mode,
            ei_weight=config.ei_weight,
            contractor_weight=config.contractor_weight,
            contractor_threshold=config.contractor_threshold,
            dtype=common["dtype"],
        )
    if config.contractor_weight > 0:
        common.update(contractor_weight=config.contractor_weight, contractor_threshold=config.contractor_threshold)
    if config.kind == "fcnn":
        return models.LateralCNN(widths=config.widths, num_steps=0, **common)
    if config.kind == "fcnn_matched":
        reference = models.LateralCNN(widths=config.widths, num_steps=config.num_steps, **common)
        widths = models.param_matched_widths(reference, (1, *input_shape), multiple=config.lateral.num_groups)
        return models.LateralCNN(widths=widths, num_steps=0, **common)
    unshared = config.kind == "unshared"
    return models.LateralCNN(widths=config.widths, num_steps=config.num_steps, unshared=unshared, **common)


@dataclasses.dataclass(frozen=True)
class Programs:
    """A run's model, optimiser and jitted programs.

    ``step`` is the host-fed train step (``None`` with ``device_data``); ``epoch`` the device-resident
    epoch (``None`` without); ``eval_step`` sums a batch's correct predictions and loss;
    ``spectral`` gives each lateral layer's ρ(J) at ``a(T)``.
    """

    mesh: Mesh
    model: Any
    tx: optax.GradientTransformation
    step: Callable | None
    epoch: Callable | None
    eval_step: Callable
    spectral: Callable


@functools.lru_cache(maxsize=16)
def programs(
    model_config: ModelConfig,
    optimizer: OptimizerConfig,
    num_classes: int,
    input_shape: tuple[int, ...],
    *,
    batch_size: int,
    device_data: bool,
    augment: bool,
    label_smoothing: float,
    devices: tuple[Any, ...],
) -> Programs:
    """The :class:`Programs` of a run (``optimizer.total_steps`` set; ``devices``: ``jax.devices()``,
    part of the key so a changed device set builds anew)."""
    del devices
    mesh = make_mesh()
    model = build_model(model_config, num_classes, input_shape)
    tx = make_optimizer(optimizer, ei_mode=model_config.ei_mode)
    step = epoch = None
    if device_data:
        epoch = device_epochs.make_device_epoch(
            model, tx, mesh, batch_size=batch_size, augment=augment, label_smoothing=label_smoothing
        )
    else:
        step = train.jit_train_step(model, tx, mesh, label_smoothing=label_smoothing)
    eval_step = train.jit_eval_step(model, mesh)
    spectral = jax.jit(functools.partial(dynamics.layer_spectral_radii, model, num_iters=12))
    return Programs(mesh, model, tx, step, epoch, eval_step, spectral)
