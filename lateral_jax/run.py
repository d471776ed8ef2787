"""``train_and_evaluate(config, workdir)``: one training run, resumable, on every device.

``RunConfig`` is the typed boundary (experiments/ turn ml_collections configs into it).  A run
writes to ``workdir``: ``checkpoints/`` (orbax), ``metrics.jsonl`` (one JSON object per log or
eval event), TensorBoard event files when ``tensorboard`` is installed, and ``final.json``.
Re-running with the same ``workdir`` resumes from the newest readable checkpoint, including the
data iterator's position, so a resumed run sees exactly the batches an uninterrupted run sees.
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lateral_jax import checkpoint, ei, models, train
from lateral_jax.data import pipeline, sources, synthetic
from lateral_jax.recurrence import LateralConfig

SYNTHETIC = ("contour", "pathfinder")
DATASETS = (*SYNTHETIC, *sources.REGISTERED, "image_folder")
MODEL_KINDS = ("fcnn", "fcnn_matched", "lccnn", "lceicnn", "unshared", "lateral_resnet")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from.

    Attributes:
      dataset: contour | pathfinder | mnist | fashion_mnist | cifar10 | image_folder.
      num_train, num_validation: sizes of the generated splits (synthetic tasks).
      task: spec overrides of the synthetic task (e.g. ``{"path_angle": 30.0}``).
      archive: path of the image archive/folder (``image_folder``).
      image_size: images are resized to this (``image_folder``).
      validation_fraction: seeded, stratified validation split of the training split when the
        dataset has no validation split of its own (``image_folder``; tfds datasets use ``test``).
      train_subset: use only this many (stratified, seeded) training examples.
      data_dir: tfds data folder; download: let tfds download registered datasets.
      augment: random crop (padding 4) + horizontal flip for natural images.
    """

    dataset: str = "contour"
    num_train: int = 8192
    num_validation: int = 2048
    task: tuple[tuple[str, Any], ...] = ()
    archive: str | None = None
    image_size: int = 32
    validation_fraction: float = 0.1
    train_subset: int | None = None
    data_dir: str | None = None
    download: bool = True
    augment: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "lccnn"
    widths: tuple[int, ...] = (16, 32, 64)
    num_steps: int = 4
    lateral: LateralConfig = LateralConfig.stable()
    grad_mode: str = "full"
    truncate_steps: int | None = None
    ei_mode: str = "none"
    ei_weight: float = 0.0
    excitatory_fraction: float = 0.8
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: train.OptimizerConfig = train.OptimizerConfig()
    batch_size: int = 64
    num_epochs: float = 4.0
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0  # 0: once per epoch
    checkpoint_every: int = 0  # 0: once per epoch
    keep_checkpoints: int = 3
    progress: bool = True
    inject_nan_step: int | None = None  # fault injection for tests: the batch at this step is NaN


def validate(config: RunConfig) -> None:
    """Raises ``ValueError`` naming the field, the value and the fix."""
    d, m = config.data, config.model
    if d.dataset not in DATASETS:
        raise ValueError(f"dataset={d.dataset!r} is unknown; choose one of {', '.join(DATASETS)}.")
    if m.kind not in MODEL_KINDS:
        raise ValueError(f"model kind={m.kind!r} is unknown; choose one of {', '.join(MODEL_KINDS)}.")
    if d.dataset == "image_folder":
        if not d.archive:
            raise ValueError("dataset='image_folder' needs archive=<path of a [split/]class/image archive or folder>.")
        if not Path(d.archive).exists():
            raise ValueError(f"archive={d.archive!r} does not exist; give the path of the image archive or folder.")
    if m.ei_weight < 0:
        raise ValueError(f"ei_weight={m.ei_weight!r} must be >= 0 (λ_EI in CE + λ_EI·L_EI).")
    ei.check_mode(m.ei_mode)
    ei.check_fraction(m.excitatory_fraction)
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={m.dtype!r} must be 'float32' or 'bfloat16'.")
    if config.batch_size < 1:
        raise ValueError(f"batch_size={config.batch_size!r} must be >= 1.")
    if config.num_epochs <= 0:
        raise ValueError(f"num_epochs={config.num_epochs!r} must be > 0.")


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: Any
    validation: Any
    normalisation: pipeline.Normalisation
    num_classes: int
    input_shape: tuple[int, int, int]
    class_names: list[str]


def _subset(source: Any, size: int | None, seed: int) -> Any:
    if size is None or size >= len(source):
        return source
    labels = sources.labels_of(source)
    _, keep = sources.train_validation_split(labels, validation_fraction=size / len(source), seed=seed + 7)
    return sources.Subset(source, keep)


def build_data(config: DataConfig, seed: int) -> Data:
    if config.dataset in SYNTHETIC:
        task = dict(config.task)
        train_arrays = synthetic.make_task(config.dataset, config.num_train, seed=seed, **task)
        val_arrays = synthetic.make_task(config.dataset, config.num_validation, seed=seed + 10_000, **task)
        tr, va = sources.ArraySource(train_arrays), sources.ArraySource(val_arrays)
        return Data(
            _subset(tr, config.train_subset, seed),
            va,
            pipeline.IDENTITY,
            2,
            tr[0]["image"].shape,
            ["absent", "present"],
        )
    if config.dataset == "image_folder":
        full, names = sources.image_folder_source(
            config.archive, "train", image_size=config.image_size, data_dir=config.data_dir
        )
        train_idx, val_idx = sources.train_validation_split(
            sources.labels_of(full), validation_fraction=config.validation_fraction, seed=seed
        )
        tr, va = sources.Subset(full, train_idx), sources.Subset(full, val_idx)
    else:
        tr = sources.Subset(
            sources.tfds_source(config.dataset, "train", data_dir=config.data_dir, download=config.download)
        )
        va = sources.Subset(
            sources.tfds_source(config.dataset, "test", data_dir=config.data_dir, download=config.download)
        )
        names = [str(i) for i in range(10)]
    tr = _subset(tr, config.train_subset, seed)
    norm = pipeline.channel_stats(tr, seed=seed)
    image = np.asarray(tr[0]["image"])
    shape = image.shape if image.ndim == 3 else (*image.shape, 1)
    return Data(tr, va, norm, len(names), tuple(shape), list(names))


def build_model(config: ModelConfig, num_classes: int, input_shape: tuple[int, ...]) -> Any:
    common = dict(
        num_classes=num_classes,
        lateral=config.lateral,
        grad_mode=config.grad_mode,
        truncate_steps=config.truncate_steps,
        ei_mode=config.ei_mode,
        ei_weight=config.ei_weight,
        excitatory_fraction=config.excitatory_fraction,
        dtype=jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32,
    )
    if config.kind == "lateral_resnet":
        return models.LateralResNet(widths=config.widths, num_steps=config.num_steps, **common)
    if config.kind == "fcnn":
        return models.LateralCNN(widths=config.widths, num_steps=0, **common)
    if config.kind == "fcnn_matched":
        reference = models.LateralCNN(widths=config.widths, num_steps=config.num_steps, **common)
        widths = models.param_matched_widths(reference, (1, *input_shape), multiple=config.lateral.num_groups)
        return models.LateralCNN(widths=widths, num_steps=0, **common)
    unshared = config.kind == "unshared"
    return models.LateralCNN(widths=config.widths, num_steps=config.num_steps, unshared=unshared, **common)


# --------------------------------------------------------------------------------------------
# Metrics output
# --------------------------------------------------------------------------------------------


class MetricWriter:
    """Appends JSON lines to ``metrics.jsonl``; also TensorBoard events when ``tensorboard`` is installed."""

    def __init__(self, workdir: Path, enabled: bool = True):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        if enabled:
            try:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter

                self._tb = EventFileWriter(str(workdir / "tensorboard"))
            except ImportError:
                self._tb = None

    def write(self, step: int, kind: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        if self._tb is not None:
            from tensorboard.compat.proto import event_pb2, summary_pb2

            summary = summary_pb2.Summary(
                value=[summary_pb2.Summary.Value(tag=f"{kind}/{k}", simple_value=float(v)) for k, v in values.items()]
            )
            self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class _Preemption:
    """Turns SIGTERM into a flag the loop polls (save, then exit)."""

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


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _host(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train_and_evaluate(config: RunConfig, workdir: str | Path) -> dict[str, Any]:
    """Trains (or resumes) one model; returns the final metrics (also written to ``final.json``)."""
    validate(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    is_main = jax.process_index() == 0
    mesh = train.make_mesh()
    train.check_batch_size(config.batch_size, mesh)

    data = build_data(config.data, config.seed)
    model = build_model(config.model, data.num_classes, data.input_shape)
    steps_per_epoch = max(1, len(data.train) // config.batch_size)
    total_steps = max(1, math.ceil(config.num_epochs * steps_per_epoch))
    eval_every = config.eval_every or steps_per_epoch
    checkpoint_every = config.checkpoint_every or steps_per_epoch
    opt_config = dataclasses.replace(config.optimizer, total_steps=total_steps)
    tx = train.make_optimizer(opt_config, ei_mode=config.model.ei_mode, excitatory_fraction=None)

    example = jnp.zeros((1, *data.input_shape), jnp.float32)
    state = train.replicate(train.init_state(model, tx, jax.random.key(config.seed), example), mesh)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))

    train_ds = pipeline.train_dataset(
        data.train,
        global_batch_size=config.batch_size,
        seed=config.seed,
        normalisation=data.normalisation,
        augmentation=pipeline.Augmentation() if config.data.augment else None,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterator = iter(train_ds)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", max_to_keep=config.keep_checkpoints)
    restored = ckpt.restore(state)
    if restored is not None:
        _, state, data_state = restored
        iterator.set_state(data_state)
    start = int(state.step)
    writer = MetricWriter(workdir, enabled=is_main)
    if is_main:
        (workdir / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2, default=str))

    step_fn = train.jit_train_step(model, tx, mesh)
    eval_fn = train.jit_eval_step(model, mesh)

    def run_eval(step: int) -> dict[str, float]:
        batches = pipeline.eval_batches(
            data.validation,
            global_batch_size=config.batch_size,
            normalisation=data.normalisation,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        result = train.evaluate(eval_fn, state.params, batches, mesh)
        values = {"accuracy": result["accuracy"], "loss": result["loss"], **train.ei_metrics(state.params)}
        writer.write(step, "eval", values)
        return values

    def check_finite(step: int) -> None:
        bad = int(state.nonfinite_step)
        if bad >= 0:
            ckpt.wait()
            kept = ckpt.all_steps()
            raise train.NonFiniteLossError(
                f"non-finite loss or gradient at step {bad} (updates from that step on were skipped). "
                f"The last good checkpoint is kept: step {kept[-1] if kept else 'none'} in {ckpt.directory}. "
                "Lower the learning rate, enable grad_clip_norm, or use a loop norm (LateralConfig.stable())."
            )

    bar = None
    if config.progress and is_main:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=start,
            desc=f"{config.model.kind}",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    window_t, window_images = time.perf_counter(), 0
    last_eval: dict[str, float] = {}
    history_train: dict[str, float] = {}
    preempted = False
    with _Preemption() as preemption:
        for step in range(start, total_steps):
            batch = next(iterator)
            if config.inject_nan_step is not None and step == config.inject_nan_step:
                batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
            state, metrics = step_fn(state, train.shard_batch(batch, mesh))
            window_images += config.batch_size
            done = step + 1
            if done % config.log_every == 0 or done == total_steps:
                check_finite(done)
                history_train = _host(metrics)
                now = time.perf_counter()
                history_train["images_per_s"] = window_images / max(now - window_t, 1e-9)
                window_t, window_images = now, 0
                writer.write(done, "train", history_train)
                if bar is not None:
                    bar.set_postfix(
                        loss=f"{history_train['loss']:.3f}",
                        acc=f"{history_train['accuracy']:.3f}",
                        img_s=f"{history_train['images_per_s']:.0f}",
                    )
            if bar is not None:
                bar.update(1)
            if done % eval_every == 0 or done == total_steps:
                check_finite(done)
                last_eval = run_eval(done)
                if bar is not None:
                    bar.write(f"[{config.model.kind}] step {done}: validation accuracy {last_eval['accuracy']:.4f}")
            if done % checkpoint_every == 0 or done == total_steps or preemption.requested:
                check_finite(done)
                ckpt.save(done, state, iterator.get_state(), force=preemption.requested)
            if preemption.requested:
                preempted = True
                break
    if bar is not None:
        bar.close()
    ckpt.close()
    writer.close()
    if preempted:
        warnings.warn(
            f"SIGTERM: checkpoint saved at step {int(state.step)} in {ckpt.directory}; rerun to resume.", stacklevel=2
        )
        return {"preempted": True, "step": int(state.step)}
    if not last_eval:  # resumed after the final step: evaluate the restored state
        last_eval = run_eval(int(state.step))
    final = {
        "model": config.model.kind,
        "dataset": config.data.dataset,
        "steps": int(state.step),
        "num_params": num_params,
        "validation_accuracy": last_eval["accuracy"],
        "validation_loss": last_eval["loss"],
        "train": history_train,
        "ei": {k: v for k, v in last_eval.items() if k.startswith("ei/")},
    }
    if is_main:
        (workdir / "final.json").write_text(json.dumps(final, indent=2))
    return final


# --------------------------------------------------------------------------------------------
# Loading a finished run
# --------------------------------------------------------------------------------------------


def load_run_config(workdir: str | Path) -> RunConfig:
    """The ``RunConfig`` a run was trained with (from ``<workdir>/config.json``)."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: {workdir} is not a lateral_jax training run folder.")
    raw = json.loads(path.read_text())
    data = dict(raw["data"])
    data["task"] = tuple(tuple(kv) for kv in data["task"])
    model = dict(raw["model"])
    model["widths"] = tuple(model["widths"])
    model["lateral"] = LateralConfig(**model["lateral"])
    rest = {k: v for k, v in raw.items() if k not in ("data", "model", "optimizer")}
    return RunConfig(
        data=DataConfig(**data), model=ModelConfig(**model), optimizer=train.OptimizerConfig(**raw["optimizer"]), **rest
    )


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
    model = build_model(config.model, data.num_classes, data.input_shape)
    tx = train.make_optimizer(config.optimizer, ei_mode=config.model.ei_mode)
    mesh = train.make_mesh()
    target = train.replicate(train.init_state(model, tx, jax.random.key(0), jnp.zeros((1, *data.input_shape))), mesh)
    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints")
    restored = ckpt.restore(target)
    ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"no readable checkpoint in {Path(workdir) / 'checkpoints'}; train the run first.")
    step, state, _ = restored
    return TrainedRun(config, data, model, jax.device_get(state.params), step)
