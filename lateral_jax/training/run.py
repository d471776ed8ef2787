"""``train_and_evaluate(config, workdir)``: one training run, resumable, on every device.

A run writes to ``workdir``: ``config.json``, ``checkpoints/`` (orbax), ``metrics.jsonl`` (one JSON
object per log or eval event, keyed by step; TensorBoard events too with the ``tensorboard``
extra) and ``final.json``.  Re-running with the same ``workdir`` and config resumes from the newest
readable checkpoint, including the data iterator's position, so a resumed run sees exactly the
batches an uninterrupted run sees.  The folder is locked while a run writes to it and belongs to
one config (:mod:`lateral_jax.training.rundir`); docs/training.md lists the guarantees.

Batches come from the host (a grain pipeline, one step per call) or, with
``RunConfig.device_data``, from the device (the whole split on the device, one jitted call per
epoch); both run the same :func:`lateral_jax.training.train.train_step`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lateral_jax.core import models
from lateral_jax.core.sharding import make_mesh
from lateral_jax.training import checkpoint, train
from lateral_jax.training.config import (
    DataConfig,
    ModelConfig,
    RunConfig,
    from_dict,
    stability_advice,
    to_dict,
    validate,
)
from lateral_jax.training.data import pipeline, sources
from lateral_jax.training.datasets import Data, build_data
from lateral_jax.training.divergence import DivergenceError, DivergenceMonitor
from lateral_jax.training.feeds import DeviceFeed, HostFeed
from lateral_jax.training.metrics import MetricWriter
from lateral_jax.training.optimizer import ema_params
from lateral_jax.training.programs import Programs, build_model, programs
from lateral_jax.training.rundir import (
    EXIT_DIVERGED,
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_REFUSED,
    ConfigMismatchError,
    OnConfigChange,
    RunFolder,
    RunFolderError,
)
from lateral_jax.training.sharding import check_batch_size, replicate, replicated_shapes

# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


class _SigtermFlag:
    """Turns SIGTERM into a flag the loop polls (save, then exit).  Multi-host runs also stop at
    orbax's preemption sync point (``reached_preemption``), which agrees across hosts on one step;
    that service exists only after ``jax.distributed.initialize``, so one process relies on this."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


def _host(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def _crossed(before: int, after: int, every: int, total: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]``, or ``after`` is the last step."""
    return after // every > before // every or after == total


class Assembly(NamedTuple):
    """A run's pieces as :func:`assemble` builds them for training and :func:`load_trained` alike."""

    programs: Programs  # model, optimiser, mesh and jitted programs
    initial: train.TrainState  # replicated over the mesh, from the run's seed
    steps_per_epoch: int
    total_steps: int


def assemble(config: RunConfig, data: Data, *, abstract: bool = False) -> Assembly:
    """The one assembler of a run: its programs (the optimiser's schedule counts updates, one per
    ``accumulate_steps`` batches) and its initial state (a checkpoint's restore target; with
    ``abstract`` only its shapes, dtypes and shardings, which skips running the initialisation)."""
    steps_per_epoch = max(1, len(data.train) // config.batch_size)
    total_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
    updates = math.ceil(total_steps / config.optimizer.accumulate_steps)
    p = programs(
        config.model,
        dataclasses.replace(config.optimizer, total_steps=updates),
        data.num_classes,
        tuple(data.input_shape),
        batch_size=config.batch_size,
        device_data=config.device_data,
        augment=config.data.augment,
        label_smoothing=config.label_smoothing,
        devices=tuple(jax.devices()),
    )
    example = jnp.zeros((1, *data.input_shape), jnp.float32)
    if abstract:
        initial = replicated_shapes(train.abstract_state(p.model, p.tx, example), p.mesh)
    else:
        initial = replicate(train.init_state(p.model, p.tx, jax.random.key(config.seed), example), p.mesh)
    return Assembly(p, initial, steps_per_epoch, total_steps)


class _Run:
    """The pieces of one run; :meth:`train` is the loop."""

    def __init__(self, config: RunConfig, workdir: Path):
        self.config, self.workdir = config, workdir
        self.is_main = jax.process_index() == 0
        check_batch_size(config.batch_size, make_mesh())
        self.data = build_data(config.data, config.seed)
        p, self.initial, self.steps_per_epoch, self.total_steps = assemble(config, self.data)
        self.mesh, self.model, self.tx, self.eval_fn, self.spectral_fn = p.mesh, p.model, p.tx, p.eval_step, p.spectral
        if config.device_data:
            self.feed = DeviceFeed(config, self.data, p.epoch, self.mesh)
        else:
            self.feed = HostFeed(config, self.data, p.step, self.mesh)
        self.ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
        self.writer: MetricWriter | None = None  # opened once the resume step is known
        self.divergence = DivergenceMonitor(config.divergence, self.data.num_classes, advice=stability_advice(config))

    def batches(self, source: Any):
        """This process's part of every evaluation batch of ``source``."""
        return pipeline.eval_batches(
            source,
            global_batch_size=self.config.batch_size,
            normalisation=self.data.normalisation,
            crop_size=self.config.data.crop_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def accuracy(self, state: train.TrainState, source: Any) -> dict[str, float]:
        """Accuracy and loss over ``source`` (every process's part summed), with the weight EMA's
        as ``ema_accuracy`` / ``ema_loss`` when the optimiser keeps one."""
        result = train.evaluate(self.eval_fn, state.params, self.batches(source), self.mesh)
        values = {"accuracy": result["accuracy"], "loss": result["loss"]}
        ema = ema_params(state.opt_state)
        if ema is not None:
            result = train.evaluate(self.eval_fn, ema, self.batches(source), self.mesh)
            values.update(ema_accuracy=result["accuracy"], ema_loss=result["loss"])
        return values

    def evaluate(self, state: train.TrainState, step: int) -> dict[str, float]:
        values = {**self.accuracy(state, self.data.validation), **train.ei_metrics(state.params)}
        if self.config.spectral_images > 0:
            # the first spectral_images examples of this process's first evaluation batch, decoded alone
            count, local = jax.process_count(), self.config.batch_size // jax.process_count()
            first = range(jax.process_index(), min(len(self.data.validation), local * count), count)
            indices = list(first)[: self.config.spectral_images]
            if indices:
                images, _ = pipeline.to_arrays(
                    self.data.validation, self.data.normalisation, crop_size=self.config.data.crop_size, indices=indices
                )
                values.update(self.spectral_metrics(state.params, images))
        self.writer.write(step, "eval", values)
        self.observe_loss(step, values["loss"])
        return values

    def test(self, state: train.TrainState, step: int) -> dict[str, float]:
        """The dataset's own test split, once at the end (``{}`` when it has none)."""
        if self.data.test is None:
            return {}
        values = self.accuracy(state, self.data.test)
        self.writer.write(step, "test", values)
        return values

    def spectral_metrics(self, params: Any, images) -> dict[str, float]:
        """``loop/spectral_radius/<layer>``: the mean over ``images`` of ρ(J) at each layer's a(T)."""
        radii = jax.device_get(self.spectral_fn({"params": jax.device_get(params)}, jnp.asarray(images)))
        return {f"loop/spectral_radius/{name}": float(np.mean(r)) for name, r in radii.items()}

    def newest_checkpoint(self) -> int | str:
        """The newest saved step once pending saves are written (``"none"`` before the first)."""
        self.ckpt.wait()
        kept = self.ckpt.all_steps()
        return kept[-1] if kept else "none"

    def observe_loss(self, step: int, loss: float) -> None:
        try:
            self.divergence.observe(step, loss)
        except DivergenceError as e:
            raise DivergenceError(
                f"{e} Checkpoints up to step {self.newest_checkpoint()} are kept in {self.ckpt.directory}.",
                step=e.step,
            ) from None

    def check_finite(self, state: train.TrainState) -> None:
        bad = int(state.nonfinite_step)
        if bad >= 0:
            raise train.NonFiniteLossError(
                f"non-finite loss or gradient at step {bad} (updates from that step on were skipped). "
                f"The last good checkpoint is kept: step {self.newest_checkpoint()} in {self.ckpt.directory}. "
                + stability_advice(self.config),
                step=bad,
            )

    def progress_bar(self, start: int):
        if not (self.config.progress and self.is_main):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.total_steps,
            initial=start,
            desc=self.config.model.kind,
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

    def train(self, state: train.TrainState, start: int):
        """Runs from step ``start`` to the end (or a preemption); returns
        ``(state, last eval, last train metrics, preempted)``."""
        c, total = self.config, self.total_steps
        log_every = c.log_every or self.steps_per_epoch
        eval_every = c.eval_every or self.steps_per_epoch
        checkpoint_every = c.checkpoint_every or self.steps_per_epoch
        bar = self.progress_bar(start)
        window_t, window_images = time.perf_counter(), 0
        last_eval: dict[str, float] = {}
        last_train: dict[str, float] = {}
        step, preempted = start, False
        with _SigtermFlag() as sigterm:
            while step < total and not preempted:
                state, metrics = self.feed.advance(state)
                before, step = step, step + self.feed.steps_per_advance
                window_images += (step - before) * c.batch_size
                if _crossed(before, step, log_every, total):
                    self.check_finite(state)
                    last_train = _host(metrics)
                    now = time.perf_counter()
                    last_train["images_per_s"] = window_images / max(now - window_t, 1e-9)
                    window_t, window_images = now, 0
                    self.writer.write(step, "train", last_train)
                    self.observe_loss(step, last_train["ce"])
                    if bar is not None:
                        loss, acc, rate = last_train["loss"], last_train["accuracy"], last_train["images_per_s"]
                        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{rate:.0f}")
                if bar is not None:
                    bar.update(step - before)
                if _crossed(before, step, eval_every, total):
                    self.check_finite(state)
                    last_eval = self.evaluate(state, step)
                    if bar is not None:
                        bar.write(f"[{c.model.kind}] step {step}: validation accuracy {last_eval['accuracy']:.4f}")
                preempted = sigterm.requested or self.ckpt.manager.reached_preemption(step)
                if _crossed(before, step, checkpoint_every, total) or preempted:
                    self.check_finite(state)
                    self.ckpt.save(step, state, self.feed.get_state(), force=preempted)
        if bar is not None:
            bar.close()
        return state, last_eval, last_train, preempted


def train_and_evaluate(
    config: RunConfig, workdir: str | Path, *, on_config_change: OnConfigChange = "error"
) -> dict[str, Any]:
    """Trains (or resumes) one model; returns the final metrics (also written to ``final.json``).

    Returns ``{"preempted": True, "step": s}`` instead when SIGTERM (or a multi-host preemption
    notice) stopped the run after saving a checkpoint at step ``s``; rerun to resume.

    Raises :class:`~lateral_jax.training.rundir.ConfigMismatchError` when ``workdir`` holds
    checkpoints of a different config (``on_config_change="move_aside"`` moves that run to
    ``<workdir>.superseded-<time>`` and starts afresh), :class:`RunFolderError` when the folder is
    in use by another run or cannot be written, :class:`~lateral_jax.training.train.NonFiniteLossError`
    or :class:`~lateral_jax.training.divergence.DivergenceError` when training went wrong.
    """
    validate(config)
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    with RunFolder(workdir, enabled=is_main) as folder:
        moved = folder.claim(
            to_dict(config),
            on_config_change=on_config_change,
            normalise=lambda old: to_dict(from_dict(old)),
            data_identity=data_identity(config.data),
        )
        if moved is not None:
            warnings.warn(f"{workdir} held a run of another config; it was moved to {moved}.", stacklevel=2)
        if jax.process_count() > 1:  # every process starts after process 0 settled the folder
            multihost_utils.sync_global_devices("lateral_jax.run_folder")
        return _train_in(config, folder)


def data_identity(config: DataConfig) -> dict[str, str] | None:
    """What identifies a run's data beyond its config: the content fingerprint of an image archive
    or folder (:func:`~lateral_jax.training.data.sources.archive_fingerprint`), so a run does not
    resume on an archive replaced in place; ``None`` for data its config determines."""
    if config.dataset == "image_folder" and config.archive:
        return {"data.archive content": sources.archive_fingerprint(config.archive)}
    return None


def _train_in(config: RunConfig, folder: RunFolder) -> dict[str, Any]:
    t0 = time.perf_counter()
    r = _Run(config, folder.path)
    state = r.initial
    try:
        restored = r.ckpt.restore(state, move_unreadable=r.is_main)
        if restored is not None:
            _, state, data_state = restored
            r.feed.set_state(data_state)
        start = int(state.step)
        if restored is not None and r.is_main:
            print(f"{folder.path}: resumed from the checkpoint at step {start} of {r.total_steps}", flush=True)
        if start < r.total_steps and r.is_main:
            folder.clear_final()
        r.writer = MetricWriter(folder.path, resume_step=start, enabled=r.is_main)
        state, last_eval, last_train, preempted = r.train(state, start)
        if not (last_eval or preempted):  # resumed after the final step: evaluate the restored state
            last_eval = r.evaluate(state, int(state.step))
        last_test = {} if preempted else r.test(state, int(state.step))
    finally:
        r.ckpt.close()
        if r.writer is not None:
            r.writer.close()
    if preempted:
        warnings.warn(
            f"SIGTERM: checkpoint saved at step {int(state.step)} in {r.ckpt.directory}; rerun to resume.", stacklevel=2
        )
        return {"preempted": True, "step": int(state.step)}
    final = {
        "model": config.model.kind,
        "dataset": config.data.dataset,
        "steps": int(state.step),
        "num_params": models.param_count(state.params),
        "widths": list(getattr(r.model, "widths", config.model.widths)),
        "train_examples": len(r.data.train),
        "validation_examples": len(r.data.validation),
        "test_examples": 0 if r.data.test is None else len(r.data.test),
        "validation_accuracy": last_eval["accuracy"],
        "validation_loss": last_eval["loss"],
        **{f"test_{k}": v for k, v in last_test.items()},
        **{f"validation_{k}": v for k, v in last_eval.items() if k.startswith("ema_")},
        "train": last_train,
        "ei": {k: v for k, v in last_eval.items() if k.startswith("ei/")},
        "device": jax.devices()[0].device_kind,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if r.is_main:
        folder.write_final(final)
    return final


# --------------------------------------------------------------------------------------------
# Loading a finished run
# --------------------------------------------------------------------------------------------


def load_run_config(workdir: str | Path) -> RunConfig:
    """The ``RunConfig`` a run was trained with (from ``<workdir>/config.json``)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a lateral_jax training run folder.")
    return from_dict(json.loads(path.read_text()), where=str(path))


@dataclasses.dataclass
class TrainedRun:
    config: RunConfig
    data: Data
    model: Any
    params: Any
    step: int


def load_trained(workdir: str | Path) -> TrainedRun:
    """Config, data, model and the newest readable checkpoint's parameters of a run."""
    config = load_run_config(workdir)
    data = build_data(config.data, config.seed)
    assembly = assemble(config, data, abstract=True)
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
    restored = ckpt.restore(assembly.initial)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {Path(workdir) / 'checkpoints'}; train the run first.")
    step, state, _ = restored
    final_path = Path(workdir) / "final.json"
    if final_path.exists():
        reported = json.loads(final_path.read_text()).get("steps")
        if reported is not None and reported != step:
            warnings.warn(
                f"{final_path} reports the run finished at step {reported}, but the newest readable checkpoint "
                f"is step {step} (the newer one is unreadable): these are step {step}'s parameters, not those "
                "final.json describes; rerun the training command to retrain and save the missing steps.",
                RuntimeWarning,
                stacklevel=2,
            )
    return TrainedRun(config, data, assembly.programs.model, jax.device_get(state.params), step)


__all__ = [
    "EXIT_DIVERGED",
    "EXIT_OK",
    "EXIT_PREEMPTED",
    "EXIT_REFUSED",
    "ConfigMismatchError",
    "DivergenceError",
    "RunFolderError",
    "Data",
    "DataConfig",
    "DeviceFeed",
    "HostFeed",
    "ModelConfig",
    "RunConfig",
    "TrainedRun",
    "build_data",
    "build_model",
    "load_run_config",
    "load_trained",
    "train_and_evaluate",
]
