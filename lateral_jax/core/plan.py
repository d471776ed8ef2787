"""Run policy, resolved once: the backend-dependent choices of a lateral layer, made before tracing.

The maths (:mod:`~lateral_jax.core.cell`, :mod:`~lateral_jax.core.loops`, ...) never reads which
platform it runs on; the public entry points (``recurrence.unroll`` / ``recur`` /
``unroll_unshared``, ``hgru.run``, the Flax layers, ``dynamics``) call :func:`resolve` once with
the backend (:func:`current_backend` unless one is given) and pass the concrete
:class:`RunPlan` down.  This is the only module of ``lateral_jax.core`` that asks JAX for the
backend (``tests/architecture_test.py`` enforces it).

The choices, per backend:

* **Convolutions.** ``conv_algorithm="auto"`` takes the Winograd path for eligible 3×3
  convolutions on CPU (where it is 2× XLA's; docs/performance.md) and XLA's convolution elsewhere:
  the plan turns ``"auto"`` into ``"xla"`` off the CPU; on the CPU ``"auto"`` stays the
  shape rule of :func:`lateral_jax.kernels.convolution.use_winograd`.
* **Loops.** ``scan_unroll="auto"`` unrolls loops of up to 16 steps, and on CPU loops of up to
  32 that contain an XLA convolution (:func:`default_scan_unroll`).  On CPU a full unroll is a
  Python loop, because XLA:CPU differentiates an XLA convolution inside a ``while`` loop on a
  pathologically slow path even when the loop has one trip (jax-ml/jax#12868); on GPU and TPU every
  loop is a ``jax.lax.scan`` with that unroll factor (our choice: the issue is CPU-only, and a
  ``scan`` keeps programs small; its speed there has not been measured here).  A CPU loop too long to
  unroll gives its eligible 3×3 lateral convolutions the Winograd path, which rolls at full speed.
* **Pallas.** The fused loop kernel runs compiled on GPU and in interpret mode elsewhere.
"""

from __future__ import annotations

import dataclasses

import jax

from lateral_jax.core.config import LateralConfig, LoopOptions

# Longest loop that ``scan_unroll="auto"`` unrolls on CPU when it contains an XLA convolution;
# compile time grows linearly with the unrolled length (docs/performance.md), so longer loops roll.
CPU_MAX_UNROLLED_STEPS = 32
# Longest loop that ``scan_unroll="auto"`` unrolls everywhere.
MAX_UNROLLED_STEPS = 16


def current_backend() -> str:
    """The platform of JAX's default device (``"cpu"``, ``"gpu"``, ``"tpu"``): the one place
    ``lateral_jax.core`` reads it."""
    return jax.default_backend()


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """How a layer runs on ``backend``, every choice concrete.

    Attributes:
      backend: the platform the plan is for.
      config: the layer's :class:`LateralConfig` with ``conv_algorithm`` resolved for ``backend``
        (``"auto"`` stays only on CPU, where it is the shape rule of ``convolution.use_winograd``).
      python_loops: a fully unrolled loop is a Python loop (CPU) rather than a ``lax.scan``.
      pallas_interpret: the fused Pallas kernel runs in interpret mode (off GPU).
    """

    backend: str
    config: LateralConfig
    python_loops: bool
    pallas_interpret: bool

    def scan_unroll(self, num_steps: int, loop: LoopOptions, *, xla_conv_in_loop: bool = True) -> int | bool:
        """``loop.scan_unroll`` for a loop of ``num_steps`` steps, ``"auto"`` resolved."""
        if loop.scan_unroll != "auto":
            return loop.scan_unroll
        return default_scan_unroll(num_steps, backend=self.backend, xla_conv_in_loop=xla_conv_in_loop)

    def remat_outer_unroll(self, loop: LoopOptions, *, xla_conv_in_loop: bool = True) -> int | bool:
        """The unroll of ``"remat"``'s outer loop over segments: with ``scan_unroll="auto"`` rolled
        (1), except on CPU around XLA convolutions (jax#12868), where it is unrolled (``True``);
        rolled with an explicit ``scan_unroll`` it is that value.  Rolled, XLA:CPU would otherwise
        schedule the recomputation next to the forward pass and keep every state alive."""
        if loop.scan_unroll != "auto":
            return loop.scan_unroll
        return True if self.backend == "cpu" and xla_conv_in_loop else 1


def default_scan_unroll(num_steps: int, *, backend: str | None = None, xla_conv_in_loop: bool = True) -> int | bool:
    """The unroll factor ``scan_unroll="auto"`` picks on ``backend`` (default :func:`current_backend`):
    ``True`` (fully unrolled) for loops of at most :data:`MAX_UNROLLED_STEPS` steps, and on CPU, when
    the loop contains an XLA convolution (jax-ml/jax#12868), of at most :data:`CPU_MAX_UNROLLED_STEPS`;
    1 (rolled) otherwise, which bounds compile time and memory for long loops."""
    backend = current_backend() if backend is None else backend
    if num_steps <= MAX_UNROLLED_STEPS:
        return True
    if backend == "cpu" and xla_conv_in_loop and num_steps <= CPU_MAX_UNROLLED_STEPS:
        return True
    return 1


def check_pallas(grad_mode: str, *, unshared: bool = False) -> None:
    """Raises ``ValueError`` unless the fused Pallas kernel can run this: full BPTT, a weight-shared layer."""
    if unshared:
        raise ValueError(
            "the unshared control runs its loops in XLA (one kernel per loop); got loop_kernel='pallas'. "
            "Use loop_kernel='xla' for it."
        )
    if grad_mode != "full":
        raise ValueError(
            f"loop_kernel='pallas' computes the full BPTT gradient (grad_mode='full'); got grad_mode={grad_mode!r}. "
            "Use loop_kernel='xla' for 'remat', 'truncated' and 'implicit'."
        )


def check(config: LateralConfig, loop: LoopOptions, *, unshared: bool = False) -> None:
    """Raises ``ValueError`` for a layer config and loop options that cannot run together; the Flax
    layers call it when they are built, so the clash surfaces at construction, not at trace time."""
    if config.loop_kernel == "pallas":
        check_pallas(loop.grad_mode, unshared=unshared)


def resolve(config: LateralConfig = LateralConfig(), backend: str | None = None) -> RunPlan:
    """The :class:`RunPlan` of ``config`` on ``backend`` (default: :func:`current_backend`)."""
    backend = current_backend() if backend is None else backend
    if backend != "cpu" and config.conv_algorithm == "auto":
        config = dataclasses.replace(config, conv_algorithm="xla")
    return RunPlan(backend=backend, config=config, python_loops=backend == "cpu", pallas_interpret=backend != "gpu")


__all__ = [
    "CPU_MAX_UNROLLED_STEPS",
    "MAX_UNROLLED_STEPS",
    "RunPlan",
    "check",
    "check_pallas",
    "current_backend",
    "default_scan_unroll",
    "resolve",
]
