"""The two static settings of a lateral layer: its structure and how its loops are executed.

:class:`LateralConfig` says *what* the layer computes (kernel sizes, mixing, leak, norms,
activation, initial lateral gain, convolution algorithm).  :class:`LoopOptions` says *how* the T
loops run and are differentiated (gradient mode, truncation, implicit solver, scan unrolling,
rematerialisation chunks); it changes no forward value (except ``"implicit"``, which returns the
fixed point) and is passed unchanged from a run's config through the models and layers to
:func:`lateral_jax.core.recurrence.unroll`.  Both are frozen, hashable dataclasses, safe as
``jax.jit`` static arguments and as Flax module attributes, and validate themselves on creation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

GradMode = Literal["full", "remat", "truncated", "implicit"]
Norm = Literal["none", "group", "layer"]
Activation = Literal["relu", "gelu", "tanh", "softplus", "identity"]
Mixing = Literal["full", "depthwise"]
ConvAlgorithm = Literal["auto", "xla", "winograd"]
LoopKernel = Literal["xla", "pallas"]
ScanUnroll = int | bool | Literal["auto"]

GRAD_MODES = ("full", "remat", "truncated", "implicit")
NORMS = ("none", "group", "layer")
ACTIVATIONS = ("relu", "gelu", "tanh", "softplus", "identity")
MIXINGS = ("full", "depthwise")
CONV_ALGORITHMS = ("auto", "xla", "winograd")
LOOP_KERNELS = ("xla", "pallas")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raises a ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_odd_size(name: str, value: object) -> None:
    """Raises a ``ValueError`` unless ``value`` is a positive odd int (a kernel size)."""
    if not _is_int(value) or value <= 0 or value % 2 == 0:
        raise ValueError(
            f"{name}={value!r} must be a positive odd integer (1, 3, 5, 7, ...) so that SAME padding "
            "keeps the kernel centred on each unit."
        )


def check_positive_int(name: str, value: object) -> int:
    """Returns ``value`` or raises a ``ValueError`` unless it is a positive int."""
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive int.")
    return value


def check_num_steps(num_steps: object, name: str = "num_steps") -> int:
    """Returns ``num_steps`` as an int, or raises a ``ValueError`` saying what is wrong."""
    if not _is_int(num_steps):
        raise ValueError(
            f"{name}={num_steps!r} must be a non-negative Python int (the number of lateral loops T; "
            "0 is the feed-forward network)."
        )
    if num_steps < 0:
        raise ValueError(f"{name}={num_steps} is negative; use 0 for the feed-forward network or T > 0 loops.")
    return num_steps


@dataclasses.dataclass(frozen=True)
class LateralConfig:
    """Static structure of one lateral layer.

    Attributes:
      kernel_size: afferent kernel size k (odd).
      lateral_size: lateral kernel size l (odd); the excitatory kernel in the two-population form.
      inhibitory_size: if set, the two-population E/I form: a second lateral kernel ``W_inh`` of
        this (odd, typically wider) size, pushed to be inhibitory by :mod:`lateral_jax.core.ei`.
      mixing: ``"full"`` (every channel to every channel) or ``"depthwise"`` (channel to itself).
      leak: α in ``a(t) = (1-α) a(t-1) + α f(...)``; 1 is no leak.
      drive_norm: normalisation ``N_d`` of the afferent drive.
      loop_norm: normalisation ``N_l`` applied inside the loop (also at t = 0).
      num_groups: groups for ``"group"`` norms (must divide the channel count).
      activation: the non-linearity f.
      lateral_init_scale: std of ``W_lat`` at init relative to He scaling; small so the model
        starts near the F-CNN (0 gives an all-zero lateral kernel).
      conv_algorithm: how the 3×3 convolutions are computed (:mod:`lateral_jax.kernels.convolution`):
        ``"xla"`` (``lax.conv_general_dilated``, the reference), ``"winograd"``
        (:func:`lateral_jax.kernels.winograd.conv3x3`, fewer multiplications) or
        ``"auto"`` (Winograd for large float32 full-mixing 3×3 convolutions on CPU, XLA elsewhere).
      loop_kernel: ``"xla"`` (the reference: the loops are a ``lax.scan`` of XLA ops) or
        ``"pallas"``: all T loops of ``grad_mode="full"`` in one fused Pallas kernel
        (:mod:`lateral_jax.kernels.fused`) with a hand-written backward pass (forward and reverse mode;
        second-order derivatives need ``"xla"``).
    """

    kernel_size: int = 3
    lateral_size: int = 3
    inhibitory_size: int | None = None
    mixing: Mixing = "full"
    leak: float = 1.0
    drive_norm: Norm = "none"
    loop_norm: Norm = "none"
    num_groups: int = 8
    activation: Activation = "relu"
    lateral_init_scale: float = 0.1
    conv_algorithm: ConvAlgorithm = "auto"
    loop_kernel: LoopKernel = "xla"

    def __post_init__(self) -> None:
        check_odd_size("kernel_size", self.kernel_size)
        check_odd_size("lateral_size", self.lateral_size)
        if self.inhibitory_size is not None:
            check_odd_size("inhibitory_size", self.inhibitory_size)
        check_choice("mixing", self.mixing, MIXINGS)
        check_choice("drive_norm", self.drive_norm, NORMS)
        check_choice("loop_norm", self.loop_norm, NORMS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("conv_algorithm", self.conv_algorithm, CONV_ALGORITHMS)
        check_choice("loop_kernel", self.loop_kernel, LOOP_KERNELS)
        if not 0.0 < self.leak <= 1.0:
            raise ValueError(f"leak={self.leak!r} must lie in (0, 1]; 1 means no leak.")
        check_positive_int("num_groups", self.num_groups)
        if not 0 <= self.lateral_init_scale < float("inf"):  # NaN fails too
            raise ValueError(f"lateral_init_scale={self.lateral_init_scale!r} must be a finite number >= 0.")
        if self.inhibitory_size is not None and self.mixing != "full":
            raise ValueError("inhibitory_size (two-population E/I form) needs mixing='full'.")

    @classmethod
    def paper(cls, **overrides) -> LateralConfig:
        """The raw layer of the paper's equations: no normalisation anywhere, ReLU, no leak."""
        return cls(**{"drive_norm": "none", "loop_norm": "none", **overrides})

    @classmethod
    def stable(cls, **overrides) -> LateralConfig:
        """The stable training default: GroupNorm on the drive *and* inside the loop.

        Renormalising every loop bounds the recurrent gain; without a loop norm a 3-layer LC-CNN at
        T = 4 can diverge (docs/design.md, "Stability").
        """
        return cls(**{"drive_norm": "group", "loop_norm": "group", **overrides})

    def check_channels(self, channels: int) -> None:
        """Raises a ``ValueError`` when a group norm's ``num_groups`` does not divide ``channels``."""
        if "group" in (self.drive_norm, self.loop_norm) and channels % self.num_groups:
            raise ValueError(
                f"num_groups={self.num_groups} does not divide the {channels} channels of the layer; "
                "pick a divisor of the channel count or use norm='layer'."
            )


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How the lateral loops are executed and differentiated (one default per option).

    Attributes:
      grad_mode: ``"full"`` (backpropagation through time), ``"remat"`` (the same gradient with
        √T checkpointing), ``"truncated"`` (gradients through the last ``truncate_steps`` loops)
        or ``"implicit"`` (a fixed point differentiated by the implicit-function theorem);
        see :mod:`lateral_jax.core.loops` and :mod:`lateral_jax.core.implicit`.
      truncate_steps: K for ``"truncated"`` (required there, rejected elsewhere).
      implicit_tol, implicit_max_steps: stopping rule of the ``"implicit"`` solve (relative change
        below ``implicit_tol`` or ``implicit_max_steps`` iterations); the adjoint solve of the
        backward pass uses the same rule.
      implicit_warn: ``"implicit"`` only: warn (a ``RuntimeWarning`` from the running program,
        at the 1st, 10th, 100th, ... occurrence) when the solve stops with a residual above
        ``implicit_tol`` — its outputs and gradients then differ from a long unroll's.
      scan_unroll: ``lax.scan`` unroll factor, ``True`` for a Python-unrolled loop, or ``"auto"``
        (:func:`lateral_jax.core.plan.default_scan_unroll`).
      remat_batch_chunks: ``"remat"`` only: run the loops on this many equal slices of the batch,
        each recomputed on its own in the backward pass; ``"auto"`` picks about √T.
      batch_axes: ``"implicit"`` only: the named axes the batch is split along under ``jax.pmap``
        (its ``axis_name``). The solve's stopping test sums the change over them, so every device
        stops at the step one device would stop at for the whole batch. Under ``jax.shard_map`` the
        axes are read from the arrays' types and need not be given.
    """

    grad_mode: GradMode = "full"
    truncate_steps: int | None = None
    implicit_tol: float = 1e-5
    implicit_max_steps: int = 100
    implicit_warn: bool = True
    scan_unroll: ScanUnroll = "auto"
    remat_batch_chunks: int | Literal["auto"] = "auto"
    batch_axes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_choice("grad_mode", self.grad_mode, GRAD_MODES)
        if isinstance(self.batch_axes, (str, list)):  # one name, or a list read back from JSON
            names = [self.batch_axes] if isinstance(self.batch_axes, str) else self.batch_axes
            object.__setattr__(self, "batch_axes", tuple(names))
        if not isinstance(self.batch_axes, tuple) or not all(isinstance(a, str) and a for a in self.batch_axes):
            raise TypeError(
                f"batch_axes={self.batch_axes!r} must be a tuple of axis names (jax.pmap's axis_name), e.g. ('batch',)."
            )
        if self.grad_mode == "truncated":
            if not _is_int(self.truncate_steps) or self.truncate_steps < 1:
                raise ValueError(
                    "grad_mode='truncated' needs truncate_steps=K, a positive int (gradients flow through the "
                    f"last K loops); got {self.truncate_steps!r}."
                )
        elif self.truncate_steps is not None:
            raise ValueError(f"truncate_steps={self.truncate_steps!r} is only used with grad_mode='truncated'.")
        if not self.implicit_tol > 0:
            raise ValueError(f"implicit_tol={self.implicit_tol!r} must be > 0.")
        if not _is_int(self.implicit_max_steps) or self.implicit_max_steps < 1:
            raise ValueError(f"implicit_max_steps={self.implicit_max_steps!r} must be >= 1.")
        if self.scan_unroll != "auto" and not (
            isinstance(self.scan_unroll, bool) or (_is_int(self.scan_unroll) and self.scan_unroll >= 1)
        ):
            raise ValueError(f"scan_unroll={self.scan_unroll!r} must be 'auto', True, False or a positive int.")
        if self.remat_batch_chunks != "auto" and (not _is_int(self.remat_batch_chunks) or self.remat_batch_chunks < 1):
            raise ValueError(
                f"remat_batch_chunks={self.remat_batch_chunks!r} must be 'auto' or a positive int that divides "
                "the batch size."
            )


def loop_options(loop: LoopOptions | None = None, **overrides) -> LoopOptions:
    """``loop`` (default :class:`LoopOptions`) with keyword ``overrides``; unknown names are an error."""
    loop = LoopOptions() if loop is None else loop
    if not overrides:
        return loop
    names = {f.name for f in dataclasses.fields(LoopOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown loop option(s) {unknown}; LoopOptions has {sorted(names)}.")
    return dataclasses.replace(loop, **overrides)
