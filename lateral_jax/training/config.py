"""The typed configuration of a training run, its validation and its one conversion from plain dicts.

:class:`RunConfig` nests :class:`DataConfig`, :class:`ModelConfig` (which holds the layer's
:class:`~lateral_jax.core.config.LateralConfig` and :class:`~lateral_jax.core.config.LoopOptions`)
and :class:`~lateral_jax.training.optimizer.OptimizerConfig`.  :meth:`RunConfig.from_config_dict` is
the way in for a new run: it types a nested mapping (an ``ml_collections`` config) with
:func:`from_dict` and checks it with :func:`validate`.  A run folder's ``config.json`` was validated
when the run started and is read back with :func:`from_dict` alone (so a finished run still loads
where, say, its archive path no longer exists); :func:`to_dict` is the inverse of both.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from lateral_jax.core import ei
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.hgru import HGRUConfig
from lateral_jax.training.data import official, sources
from lateral_jax.training.divergence import DivergenceConfig
from lateral_jax.training.optimizer import OptimizerConfig

SYNTHETIC = ("contour", "pathfinder", "pathfinder_published")
DATASETS = (*SYNTHETIC, *official.DATASETS, "image_folder", "tfds")
CROPS = ("pad", "random_resized")
BLOCKS = ("basic", "bottleneck")
# The one registry of model kinds: the configs' variant names, the command line, validation, the
# model builder (``programs.build_model``) and the analysis read it.  Family: ``"lateral_cnn"`` (the
# ``LateralCNN`` class, which the neurophysiology probe measures), ``"lateral_resnet"``, ``"hgru"``.
MODEL_KIND_FAMILIES = {
    "fcnn": "lateral_cnn",
    "fcnn_matched": "lateral_cnn",
    "lccnn": "lateral_cnn",
    "lceicnn": "lateral_cnn",
    "unshared": "lateral_cnn",
    "lateral_resnet": "lateral_resnet",
    "hgru": "hgru",
}
MODEL_KINDS = tuple(MODEL_KIND_FAMILIES)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the examples come from.

    Attributes:
      dataset: contour | pathfinder (generated) | mnist | fashion_mnist | cifar10 (from the official
        release files, :mod:`lateral_jax.training.data.official`) | image_folder (a
        ``[<split>/]<class>/<image>`` archive or folder) | tfds (a dataset prepared by tfds as
        array_record, named by ``tfds_name``).
      num_train, num_validation: sizes of the generated splits (synthetic tasks).
      task: spec overrides of the synthetic task (e.g. ``{"path_angle": 30.0}``).
      archive: path of the image archive/folder (``image_folder``).
      image_size: images are resized to this (``image_folder``).
      bad_images: an image of the archive that cannot be decoded stops the run naming it
        (``"error"``) or is left out with a warning giving the count and names (``"skip"``).
      validation_fraction: seeded, stratified validation split of the training split when the
        dataset has no validation split of its own.  A dataset's own ``test`` split is kept apart
        and reported at the end of the run (``test_accuracy``).
      train_subset: use only this many (stratified, seeded) training examples.
      seed: seed of the generated examples and of the splits; ``None`` uses the run's seed.
      data_dir: folder of the prepared (array_record) data; download: fetch missing release files.
      raw_dir: folder of the official release files (default ``<data_dir>/raw/<dataset>``).
      tfds_name: the tfds dataset of ``dataset="tfds"`` (e.g. ``imagenet2012``), prepared beforehand.
      augment: training augmentation (random crop + horizontal flip) for natural images.
      crop: ``"pad"``: the crop is of the image zero-padded by 4 pixels (small images);
        ``"random_resized"``: a random area (8–100 %) and aspect ratio (3/4–4/3) of the image,
        resized to ``crop_size`` (ImageNet-style); evaluation then takes the central ``crop_size`` × ``crop_size``.
      crop_size: side of the training crop and of the evaluation centre crop (``None``: the image's).
    """

    dataset: str = "contour"
    num_train: int = 8192
    num_validation: int = 2048
    task: tuple[tuple[str, Any], ...] = ()
    archive: str | None = None
    image_size: int = 32
    bad_images: str = "error"
    validation_fraction: float = 0.1
    train_subset: int | None = None
    seed: int | None = None
    data_dir: str | None = None
    download: bool = True
    raw_dir: str | None = None
    tfds_name: str | None = None
    augment: bool = False
    crop: str = "pad"
    crop_size: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model, its size and its lateral layers.

    Attributes:
      kind: fcnn | fcnn_matched (F-CNN widened to the LC-CNN's parameter count) | lccnn |
        lceicnn | unshared (compute-matched control) | lateral_resnet.
      widths: channels per stage (of a bottleneck ResNet: the inner width; blocks output 4×).
      stage_sizes: blocks per ResNet stage (``()``: 2 per stage; ``(2, 2, 2, 2)`` with ``basic``
        blocks is ResNet-18, ``(3, 4, 6, 3)`` with ``bottleneck`` blocks ResNet-50).
      block: basic | bottleneck (ResNet).
      lateral_stages: the ResNet stages with lateral recurrence after each block.
      small_inputs: ResNet stem: 3×3 stride 1 (``True``) or 7×7 stride 2 + max-pool (``False``);
        ``None`` picks the small stem for inputs of at most 64 pixels.
      num_steps: T lateral loops (ignored for the F-CNN kinds).
      lateral: the lateral layers' :class:`LateralConfig`.
      loop: how their loops run and are differentiated, :class:`LoopOptions`.
      ei_mode, ei_weight, excitatory_fraction: E/I separation (:mod:`lateral_jax.core.ei`).
      dtype: computation dtype, float32 or bfloat16 (parameters stay float32).
      hgru: the hGRU's :class:`~lateral_jax.core.hgru.HGRUConfig` (kind ``hgru``: a stem
        convolution of ``lateral.kernel_size`` to ``widths[0]`` channels, then the hGRU).
      contractor_weight, contractor_threshold: C-RBP's contraction penalty (weight and λ) at
        every lateral layer's fixed point; ``loop.grad_mode="implicit"`` only.
    """

    kind: str = "lccnn"
    widths: tuple[int, ...] = (16, 32, 64)
    stage_sizes: tuple[int, ...] = ()
    block: str = "basic"
    lateral_stages: tuple[int, ...] = (0, 1)
    small_inputs: bool | None = None
    num_steps: int = 4
    lateral: LateralConfig = LateralConfig.stable()
    loop: LoopOptions = LoopOptions()
    ei_mode: str = "none"
    ei_weight: float = 0.0
    excitatory_fraction: float = 0.8
    dtype: str = "float32"
    hgru: HGRUConfig = HGRUConfig()
    contractor_weight: float = 0.0
    contractor_threshold: float = 0.9


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run.

    Attributes:
      batch_size: global batch (split over all devices).
      num_epochs: passes over the training split (a whole number with ``device_data``).
      log_every, eval_every, checkpoint_every: in steps; 0 means once per epoch.
      keep_checkpoints: newest checkpoints kept.
      device_data: keep the whole (normalised) training split on the device(s) and run each
        epoch as one jitted call (:mod:`lateral_jax.training.device_epochs`) instead of feeding
        host batches; augmentation then runs in JAX.  Logging, evaluation and checkpoints happen
        at epoch ends.
      progress: show a progress bar.
      spectral_images: at every evaluation, the spectral radius of each lateral layer's loop
        Jacobian at ``a(T)`` (:func:`lateral_jax.core.dynamics.layer_spectral_radii`) is logged as
        ``loop/spectral_radius/<layer>``, the mean over this many validation images (0: off).
      divergence: when the run stops (or warns) because its loss diverged
        (:mod:`lateral_jax.training.divergence`).
      label_smoothing: the cross-entropy's targets are ``(1 - ε) one_hot + ε / K``.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    batch_size: int = 64
    num_epochs: float = 4.0
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    device_data: bool = False
    progress: bool = True
    spectral_images: int = 8
    divergence: DivergenceConfig = DivergenceConfig()
    label_smoothing: float = 0.0

    @classmethod
    def from_config_dict(cls, config: Any) -> RunConfig:
        """A new run's config from a nested mapping (an ``ml_collections.ConfigDict`` or its
        ``to_dict()``), typed by :func:`from_dict` and checked by :func:`validate`; a bad field
        raises ``ValueError`` naming it, the value and the fix."""
        raw = config.to_dict() if hasattr(config, "to_dict") else config
        run_config = from_dict(raw, cls)
        validate(run_config)
        return run_config


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
        if d.bad_images not in sources.BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images={d.bad_images!r} must be one of {sources.BAD_IMAGE_POLICIES}.")
    if d.dataset == "tfds" and not d.tfds_name:
        raise ValueError(
            "dataset='tfds' needs tfds_name=<a dataset prepared by tfds as array_record, e.g. imagenet2012>."
        )
    if d.crop not in CROPS:
        raise ValueError(f"crop={d.crop!r} must be one of {CROPS}.")
    if d.crop_size is not None and d.crop_size < 1:
        raise ValueError(f"crop_size={d.crop_size!r} must be >= 1 (or None: the stored image size).")
    if config.device_data and d.augment and d.crop == "random_resized":
        raise ValueError(
            "crop='random_resized' runs in the host pipeline; use device_data=False with it (or crop='pad')."
        )
    if m.block not in BLOCKS:
        raise ValueError(f"block={m.block!r} must be one of {BLOCKS}.")
    if m.stage_sizes and len(m.stage_sizes) != len(m.widths):
        raise ValueError(
            f"stage_sizes={m.stage_sizes} and widths={m.widths} differ in length; give one block count per stage."
        )
    if not 0.0 <= config.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={config.label_smoothing!r} must lie in [0, 1).")
    if not 0 <= m.ei_weight < float("inf"):  # NaN fails too
        raise ValueError(f"ei_weight={m.ei_weight!r} must be a finite number >= 0 (λ_EI in CE + λ_EI·L_EI).")
    if not 0 < d.validation_fraction < 1:
        raise ValueError(
            f"validation_fraction={d.validation_fraction!r} must lie strictly between 0 and 1 (the share of the "
            "training split held out for validation)."
        )
    for name in ("num_train", "num_validation"):
        value = getattr(d, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a whole number >= 1 (examples generated for the split).")
    if not 0 <= m.contractor_weight < float("inf"):
        raise ValueError(f"contractor_weight={m.contractor_weight!r} must be a finite number >= 0.")
    if m.contractor_weight > 0 and m.loop.grad_mode != "implicit":
        raise ValueError(
            f"contractor_weight={m.contractor_weight} (C-RBP) acts at a fixed point: set loop.grad_mode='implicit' "
            f"(got {m.loop.grad_mode!r}) or contractor_weight=0."
        )

    ei.check_mode(m.ei_mode)
    ei.check_fraction(m.excitatory_fraction)
    if m.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype={m.dtype!r} must be 'float32' or 'bfloat16'.")
    _check_widths(m)
    if m.kind == "hgru":
        m.hgru.check_channels(m.widths[0])
    _check_counts(config)
    if not 0 < config.num_epochs < float("inf"):  # NaN fails too
        raise ValueError(f"num_epochs={config.num_epochs!r} must be a finite number > 0.")
    if config.device_data and config.num_epochs != int(config.num_epochs):
        raise ValueError(
            f"num_epochs={config.num_epochs!r} must be a whole number with device_data=True (one call per epoch)."
        )


def _check_widths(m: ModelConfig) -> None:
    """Widths are a non-empty tuple of positive channel counts; GroupNorm's groups divide each."""
    if not isinstance(m.widths, tuple | list) or not m.widths:
        raise ValueError(
            f"widths={m.widths!r} must be a non-empty tuple of channel counts, one per stage, e.g. (16, 32, 64)."
        )
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in m.widths):
        raise ValueError(f"widths={m.widths!r} must hold whole numbers >= 1 (channels per stage).")
    if not isinstance(m.num_steps, int) or m.num_steps < 0:
        raise ValueError(f"num_steps={m.num_steps!r} must be a whole number >= 0 (T, the lateral loops).")
    if m.kind != "lateral_resnet" and "group" in (m.lateral.drive_norm, m.lateral.loop_norm):
        bad = [w for w in m.widths if w % m.lateral.num_groups]
        if bad:
            raise ValueError(
                f"num_groups={m.lateral.num_groups} does not divide width(s) {bad} of widths={tuple(m.widths)}; "
                "pick num_groups dividing every width, or widths that are multiples of it."
            )


def _check_counts(config: RunConfig) -> None:
    """Sizes and intervals: whole numbers in range, named with the fix."""
    for name, low, meaning in (
        ("batch_size", 1, "examples per step"),
        ("keep_checkpoints", 1, "a run keeps at least its last checkpoint: its trained weights"),
        ("log_every", 0, "steps; 0: once per epoch"),
        ("eval_every", 0, "steps; 0: once per epoch"),
        ("checkpoint_every", 0, "steps; 0: once per epoch"),
        ("spectral_images", 0, "0: no spectral radii at evaluation"),
    ):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} must be a whole number >= {low} ({meaning}).")


def to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain dicts, lists and scalars (JSON-ready)."""
    return dataclasses.asdict(config)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """``value`` converted to the annotated type ``hint`` (nested dataclasses, tuples, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        options = [h for h in typing.get_args(hint) if h is not type(None)]
        return _coerce(options[0], value, where) if len(options) == 1 else value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(value, hint, where=where)
    if origin is tuple:
        if isinstance(value, dict):  # a mapping of spec overrides
            return tuple(sorted(value.items()))
        args = typing.get_args(hint)
        item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        return tuple(v if item is None else _coerce(item, v, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def from_dict(raw: dict[str, Any], cls: type = RunConfig, *, where: str = "config") -> Any:
    """Builds the config dataclass ``cls`` from a nested dict; unknown fields are an error.

    Missing fields take their defaults.  Nested dicts become the annotated dataclasses, lists
    become tuples, a dict where a tuple of pairs is expected becomes its sorted items.
    """
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be a mapping of {cls.__name__} fields; got {type(raw).__name__}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {unknown}; {cls.__name__} has {names}.")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in raw.items()})


def stability_advice(config: RunConfig) -> str:
    """What to change when this run's loss diverged or went non-finite, read from its config (so a
    run already on a loop norm is not told to add one)."""
    m, opt = config.model, config.optimizer
    advice = [f"lower optimizer.learning_rate (now {opt.learning_rate:g})"]
    if opt.grad_clip_norm is None:
        advice.append("enable optimizer.grad_clip_norm (e.g. 1.0)")
    else:
        advice.append(f"tighten optimizer.grad_clip_norm (now {opt.grad_clip_norm:g})")
    if m.kind == "hgru" and m.hgru.activation not in ("tanh",):
        advice.append(f"a bounded hGRU activation (model.hgru.activation='tanh', now {m.hgru.activation!r})")
    elif m.kind != "hgru" and m.num_steps > 0 and m.lateral.loop_norm == "none":
        advice.append("a loop norm (model.lateral.loop_norm='group': LateralConfig.stable())")
    elif m.kind != "hgru" and m.num_steps > 0:
        advice.append(f"a smaller model.lateral.lateral_init_scale (now {m.lateral.lateral_init_scale:g})")
    if m.loop.grad_mode == "implicit":
        advice.append("C-RBP's contraction penalty (model.contractor_weight > 0) or grad_mode 'full'")
    return "Try: " + "; ".join(advice) + "."
