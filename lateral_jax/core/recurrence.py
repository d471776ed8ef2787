"""Lateral recurrence inside a feature map: the public, pure API of one lateral layer.

For input ``x`` (NHWC), afferent kernel ``W_ff`` (HWIO), bias ``b`` and a lateral kernel
``W_lat`` (stride 1, SAME padding, from the layer's output channels to its own output channels)::

    d    = N_d(W_ff * x + b)                                   afferent drive, computed once
    a(0) = f(N_l(d))                                           the feed-forward (F-CNN) response
    a(t) = (1 - α) a(t-1) + α f(N_l(d + L(a(t-1)))),  t = 1..T
    L(a) = W_lat * a   [+ W_inh * a  in the two-population E/I form]

with the *same* ``W_lat`` at every loop (weight sharing is what makes a recurrent convolution a
set of lateral connections).  ``T = 0`` is the plain feed-forward layer, and with ``W_lat = 0``
every loop equals it.

This module is the layer's front door: :class:`LateralConfig` (what the layer computes),
:class:`LoopOptions` (how its loops run and are differentiated), :class:`LateralParams` and
:func:`init_params`, the one-loop :func:`step` (a ``lax.scan`` body), and :func:`unroll` /
:func:`recur` / :func:`unroll_unshared`.  The pieces live in modules of their own:
:mod:`~lateral_jax.core.cell` (the maths), :mod:`~lateral_jax.core.loops` (scan, remat,
truncation), :mod:`~lateral_jax.core.implicit` (the fixed point),
:mod:`~lateral_jax.kernels.convolution` (algorithm dispatch) and :mod:`~lateral_jax.kernels.fused`
(the opt-in Pallas kernel).  Everything is a pure function over ``NamedTuple`` pytrees; no Flax.
"""

from __future__ import annotations

import functools

from jaxtyping import Array, Float

from lateral_jax.core import implicit, loops, plan
from lateral_jax.core.cell import (
    Unrolled,
    activate,
    afferent_drive,
    check_input,
    check_lateral_params,
    group_norm,
    initial_state,
    lateral_input,
    lateral_step,
    normalise,
    relative_change,
)
from lateral_jax.core.config import (
    ACTIVATIONS,
    CONV_ALGORITHMS,
    GRAD_MODES,
    LOOP_KERNELS,
    MIXINGS,
    NORMS,
    Activation,
    ConvAlgorithm,
    GradMode,
    LateralConfig,
    LoopKernel,
    LoopOptions,
    Mixing,
    Norm,
    check_num_steps,
    check_odd_size,
    loop_options,
)
from lateral_jax.core.implicit import fixed_point
from lateral_jax.core.loops import default_remat_batch_chunks, remat_segment_length
from lateral_jax.core.params import (
    LateralParams,
    NormParams,
    he_normal,
    init_lateral_kernel,
    init_params,
    lateral_kernel_shape,
)
from lateral_jax.core.plan import default_scan_unroll
from lateral_jax.kernels import fused
from lateral_jax.kernels.convolution import conv, use_winograd, winograd_tile

step = lateral_step


def recur(
    params: LateralParams,
    drive: Float[Array, "b h w c"],
    *,
    num_steps: int,
    config: LateralConfig = LateralConfig(),
    loop: LoopOptions | None = None,
    return_states: bool = True,
    backend: str | None = None,
    **loop_overrides,
) -> Unrolled:
    """Runs the lateral loops on a precomputed afferent drive ``d`` (see :func:`unroll`).

    ``backend``: the platform to plan for (:func:`lateral_jax.core.plan.resolve`; default JAX's
    default backend), so the same call traces the same program wherever it is traced."""
    num_steps = check_num_steps(num_steps)
    loop = loop_options(loop, **loop_overrides)
    check_lateral_params(params, drive, config)
    run_plan = plan.resolve(config, backend)
    config = run_plan.config
    if config.loop_kernel == "pallas":
        return fused.recur_fused(
            params,
            drive,
            num_steps=num_steps,
            config=config,
            grad_mode=loop.grad_mode,
            return_states=return_states,
            interpret=run_plan.pallas_interpret,
        )
    if loop.grad_mode == "implicit":
        if return_states:
            raise ValueError(
                "grad_mode='implicit' keeps no per-loop states (that is its O(1) memory); pass "
                "return_states=False, or use grad_mode='full'/'remat' to record a(0..T)."
            )
        final, residual = implicit.fixed_point(
            params,
            drive,
            config=config,
            tol=loop.implicit_tol,
            max_steps=loop.implicit_max_steps,
            warn=loop.implicit_warn,
            batch_axes=loop.batch_axes,
        )
        return Unrolled(final, None, residual)
    return loops.run(params, drive, num_steps=num_steps, loop=loop, return_states=return_states, plan=run_plan)


def unroll(
    params: LateralParams,
    x: Float[Array, "b h w ci"],
    *,
    num_steps: int,
    config: LateralConfig = LateralConfig(),
    loop: LoopOptions | None = None,
    return_states: bool = True,
    backend: str | None = None,
    **loop_overrides,
) -> Unrolled:
    """Applies the lateral layer to an NHWC batch: ``d = N_d(W_ff * x + b)`` then T loops.

    Args:
      params: :class:`LateralParams` (from :func:`init_params`).
      x: input batch, NHWC.
      num_steps: T, the number of lateral loops (0 is the feed-forward layer; ignored in
        ``"implicit"`` mode, which iterates to the fixed point).
      config: the layer's static structure, :class:`LateralConfig`.
      loop: how the loops run and are differentiated, :class:`LoopOptions` (default: its defaults).
      return_states: also return ``a(0..T)`` as ``[T+1, B, H, W, C]`` (needed for analysis; costs
        T+1 activations of memory).
      backend: the platform to plan for (``"cpu"``, ``"gpu"``, ``"tpu"``; default: JAX's default
        backend): :func:`lateral_jax.core.plan.resolve` turns every ``"auto"`` into a concrete choice
        for it before tracing.
      **loop_overrides: fields of :class:`LoopOptions` to override, e.g. ``grad_mode="remat"``.

    Returns:
      :class:`Unrolled` ``(final, states, residual)``.
    """
    config = plan.resolve(config, backend).config
    drive = afferent_drive(params, x, config)
    return recur(
        params,
        drive,
        num_steps=num_steps,
        config=config,
        loop=loop,
        return_states=return_states,
        backend=backend,
        **loop_overrides,
    )


def unroll_unshared(
    params: LateralParams,
    x: Float[Array, "b h w ci"],
    *,
    config: LateralConfig = LateralConfig(),
    loop: LoopOptions | None = None,
    return_states: bool = True,
    backend: str | None = None,
    **loop_overrides,
) -> Unrolled:
    """The compute-matched control: T loops, each with its *own* kernel ``params.w_lat[t]``.

    ``a(t) = f(N_l(d + W_t * a(t-1)))`` with ``params.w_lat`` of shape ``[T, l, l, C, C]``; the same
    FLOPs as the weight-shared layer, T times the lateral parameters.  Of ``loop`` only
    ``scan_unroll`` applies (gradients are full BPTT).
    """
    if config.loop_kernel != "xla":
        plan.check_pallas("full", unshared=True)
    loop = loop_options(loop, **loop_overrides)
    run_plan = plan.resolve(config, backend)
    config = run_plan.config
    drive = afferent_drive(params, x, config)
    num_steps = params.w_lat.shape[0]
    a0 = initial_state(params, drive, config)
    step_fn = functools.partial(lateral_step, params=params._replace(w_inh=None), drive=drive, config=config)
    final, states, before = loops.run_loops(
        step_fn,
        a0,
        params.w_lat,
        num_steps,
        return_states=return_states,
        scan_unroll=run_plan.scan_unroll(num_steps, loop),
        python_loops=run_plan.python_loops,
    )
    return Unrolled(final, states, relative_change(final, before))


def receptive_field_radius(*, kernel_size: int, lateral_size: int, num_steps: int) -> int:
    """Radius (in pixels) of a unit's receptive field after T loops: ``(k-1)/2 + T (l-1)/2``."""
    check_odd_size("kernel_size", kernel_size)
    check_odd_size("lateral_size", lateral_size)
    return (kernel_size - 1) // 2 + check_num_steps(num_steps) * (lateral_size - 1) // 2


__all__ = [
    "ACTIVATIONS",
    "CONV_ALGORITHMS",
    "GRAD_MODES",
    "LOOP_KERNELS",
    "MIXINGS",
    "NORMS",
    "Activation",
    "ConvAlgorithm",
    "GradMode",
    "LateralConfig",
    "LateralParams",
    "LoopKernel",
    "LoopOptions",
    "Mixing",
    "Norm",
    "NormParams",
    "Unrolled",
    "activate",
    "afferent_drive",
    "check_input",
    "check_num_steps",
    "conv",
    "default_remat_batch_chunks",
    "default_scan_unroll",
    "fixed_point",
    "group_norm",
    "he_normal",
    "init_lateral_kernel",
    "init_params",
    "initial_state",
    "lateral_input",
    "lateral_kernel_shape",
    "lateral_step",
    "normalise",
    "receptive_field_radius",
    "recur",
    "relative_change",
    "remat_segment_length",
    "step",
    "unroll",
    "unroll_unshared",
    "use_winograd",
    "winograd_tile",
]
