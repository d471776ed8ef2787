"""Executing the T lateral loops: scan, √T rematerialisation, batch chunks, truncation.

Every mode runs the same step (:func:`lateral_jax.core.cell.lateral_step`) and returns the same
values; they differ in what the backward pass stores and recomputes:

* ``"full"``: backpropagation through time, autodiff through the scan (T stored states).
* ``"remat"``: the loop is cut into segments of ``round(√T)`` loops under ``jax.checkpoint``; the
  backward pass keeps the segment inputs and recomputes one segment at a time, so O(√T) states are
  stored instead of O(T) (per-step checkpointing would save nothing: a step's only residual *is*
  its input state).  The batch is also cut into about √T chunks whose loops are recomputed one
  chunk at a time, so the stored states come to about two full-batch states at any T (for one
  more forward pass).  At T = 1 it is plain BPTT.
* ``"truncated"``: gradients flow through the last ``truncate_steps`` loops only; ``a(T-K)`` is
  treated as a constant.

Unrolling and every other backend-dependent choice is made before tracing by
:func:`lateral_jax.core.plan.resolve` (the :class:`~lateral_jax.core.plan.RunPlan` passed to
:func:`run`): on CPU a fully unrolled loop is a Python loop (jax-ml/jax#12868), elsewhere a
``lax.scan``; long CPU loops roll and give their 3×3 convolutions the Winograd path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lateral_jax.core.cell import Unrolled, initial_state, lateral_step, relative_change
from lateral_jax.core.config import LoopOptions
from lateral_jax.core.params import LateralParams
from lateral_jax.core.plan import CPU_MAX_UNROLLED_STEPS, RunPlan
from lateral_jax.kernels.batching import largest_divisor, merge_batch, split_batch
from lateral_jax.kernels.convolution import use_winograd, winograd_eligible

# (carry, x) -> (carry, y): one loop.
StepFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]
# (final a(T), states a(0..T) or None, a(T-1))
LoopResult = tuple[jax.Array, jax.Array | None, jax.Array]


def scan(body, init, xs, length: int, scan_unroll: int | bool, python_loops: bool = True):
    """``lax.scan`` with unroll factor ``scan_unroll``; with ``python_loops`` (the CPU plan) a full
    unroll is a Python loop (the same values, stacked).

    ``lax.scan(..., unroll=True)`` still emits a ``while`` loop around the unrolled body (a
    one-trip loop when ``length`` is 1), which is enough for XLA:CPU to take jax#12868's slow path.
    """
    if scan_unroll == "auto":
        raise ValueError("scan_unroll='auto' is resolved by lateral_jax.core.plan before the loops run.")
    unroll_factor = scan_unroll
    if python_loops and (unroll_factor is True or (not isinstance(unroll_factor, bool) and unroll_factor >= length)):
        carry, ys = init, []
        for i in range(length):
            carry, y = body(carry, None if xs is None else jax.tree_util.tree_map(lambda a, i=i: a[i], xs))
            ys.append(y)
        return carry, jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *ys)
    return jax.lax.scan(body, init, xs, length=length, unroll=unroll_factor)


def _scan_steps(
    step_fn: StepFn, a0: jax.Array, xs, length: int, *, return_states: bool, scan_unroll, python_loops: bool
):
    """Scans ``length`` steps from ``a0``; returns ``((a(T), a(T-1)), a(1..T) or None)``."""

    def body(carry, x):
        prev, _ = carry
        new, _ = step_fn(prev, x)
        return (new, prev), (new if return_states else None)

    return scan(body, (a0, a0), xs, length, scan_unroll, python_loops)


def remat_segment_length(num_steps: int) -> int:
    """Loops per checkpointed segment in ``"remat"`` mode: ``round(√T)`` (at least 1)."""
    return max(1, round(math.sqrt(num_steps)))


def _scan_steps_remat(
    step_fn: StepFn,
    a0: jax.Array,
    num_steps: int,
    *,
    return_states: bool,
    scan_unroll,
    outer_unroll,
    python_loops: bool,
):
    """√T checkpointing: an outer scan over segments of S = round(√T) loops, each segment under
    ``jax.checkpoint``; the backward pass stores the T/S segment inputs and recomputes one segment
    (S states) at a time."""
    seg = remat_segment_length(num_steps)
    n_seg, rem = divmod(num_steps, seg)

    def segment(length):
        return jax.checkpoint(
            lambda a: _scan_steps(
                step_fn,
                a,
                None,
                length,
                return_states=return_states,
                scan_unroll=scan_unroll,
                python_loops=python_loops,
            )
        )

    run_seg = segment(seg)
    (final, before), ys = scan(lambda carry, _: run_seg(carry[0]), (a0, a0), None, n_seg, outer_unroll, python_loops)
    if return_states:
        ys = ys.reshape((n_seg * seg, *ys.shape[2:]))
    if rem:
        (final, before), ys_rem = segment(rem)(final)
        if return_states:
            ys = jnp.concatenate([ys, ys_rem], axis=0)
    return (final, before), ys


def run_loops(
    step_fn: StepFn,
    a0: jax.Array,
    xs: jax.Array | None,
    num_steps: int,
    *,
    return_states: bool,
    scan_unroll: int | bool,
    remat: bool = False,
    remat_outer_unroll: int | bool = 1,
    python_loops: bool = True,
) -> LoopResult:
    """Runs ``num_steps`` loops from ``a0``; returns ``(a(T), a(0..T) or None, a(T-1))``.

    ``scan_unroll`` and ``remat_outer_unroll`` are concrete (:mod:`lateral_jax.core.plan`);
    ``python_loops``: a full unroll is a Python loop (the CPU plan), else a ``lax.scan``."""
    if num_steps == 0:
        return a0, (a0[None] if return_states else None), a0
    if remat and num_steps > 1:  # one loop is one segment: checkpointing it only adds buffers
        (final, before), ys = _scan_steps_remat(
            step_fn,
            a0,
            num_steps,
            return_states=return_states,
            scan_unroll=scan_unroll,
            outer_unroll=remat_outer_unroll,
            python_loops=python_loops,
        )
    else:
        (final, before), ys = _scan_steps(
            step_fn, a0, xs, num_steps, return_states=return_states, scan_unroll=scan_unroll, python_loops=python_loops
        )
    states = jnp.concatenate([a0[None], ys], axis=0) if return_states else None
    return final, states, before


def default_remat_batch_chunks(batch: int, num_steps: int) -> int:
    """Batch chunks ``"remat"`` mode uses by default: the largest divisor of ``batch`` ≤ round(√T).

    Chunking the batch divides the per-loop state memory by the chunk count; with √T chunks the
    √T-checkpointed loop keeps about 2 full-batch states in memory at any T.
    """
    return largest_divisor(batch, remat_segment_length(num_steps))


def map_batch_chunks(
    fn: Callable[[jax.Array], LoopResult], x: jax.Array, num_chunks: int, *, rolled: bool, python_loops: bool = True
) -> LoopResult:
    """``fn`` applied to ``num_chunks`` equal slices of ``x``'s batch axis; outputs reassembled.

    With more than one device the slices are strided (:func:`lateral_jax.kernels.batching.split_batch`),
    so a batch sharded over devices stays sharded the same way inside every slice.  ``fn`` returns
    ``(final, states | None, before)``; ``states`` has its batch on axis 1.
    """
    _, (final, states, before) = scan(
        lambda carry, d: (carry, fn(d)),
        None,
        split_batch(x, num_chunks),
        num_chunks,
        1 if rolled else True,
        python_loops,
    )
    merged_states = None if states is None else merge_batch(states, axis=1)
    return merge_batch(final), merged_states, merge_batch(before)


def _resolve_remat_batch_chunks(value: int | str, batch: int, num_steps: int, slow_rolled_conv: bool) -> int:
    if value == "auto":
        # With XLA convolutions on CPU the chunk loop must be unrolled (jax#12868), and unrolled
        # chunks are not recomputed one at a time; chunking would only add a forward pass there.
        return 1 if slow_rolled_conv else default_remat_batch_chunks(batch, num_steps)
    if batch % value:
        raise ValueError(
            f"remat_batch_chunks={value!r} must be 'auto' or a positive int that divides the batch size {batch}."
        )
    return value


def run(
    params: LateralParams,
    drive: jax.Array,
    *,
    num_steps: int,
    loop: LoopOptions,
    return_states: bool,
    plan: RunPlan,
) -> Unrolled:
    """The T loops of the weight-shared layer on ``drive`` in ``loop.grad_mode`` (not ``"implicit"``),
    as ``plan`` (:func:`lateral_jax.core.plan.resolve`) says on its backend."""
    config = plan.config
    kernels = [params.w_lat] + ([] if params.w_inh is None else [params.w_inh])
    depthwise = config.mixing == "depthwise"
    winograd_loop = all(use_winograd(drive, k, config.conv_algorithm, depthwise=depthwise) for k in kernels)
    on_cpu = plan.backend == "cpu"
    if (
        loop.scan_unroll == "auto"
        and config.conv_algorithm == "auto"
        and on_cpu
        and num_steps > CPU_MAX_UNROLLED_STEPS
        and not winograd_loop
        and all(winograd_eligible(drive, k, depthwise=depthwise) for k in kernels)
    ):
        # A long loop rolls, and XLA:CPU runs a rolled loop of XLA convolutions pathologically
        # slowly (jax#12868): its 3×3 convolutions take the Winograd path, which rolls at full speed.
        config = dataclasses.replace(config, conv_algorithm="winograd")
        winograd_loop = True
    slow_rolled_conv = on_cpu and not winograd_loop
    scan_unroll = plan.scan_unroll(num_steps, loop, xla_conv_in_loop=not winograd_loop)
    remat_outer_unroll = plan.remat_outer_unroll(loop, xla_conv_in_loop=not winograd_loop)
    remat = loop.grad_mode == "remat"

    def loops_on(d: jax.Array, a0: jax.Array, length: int) -> LoopResult:
        step_fn = functools.partial(lateral_step, params=params, drive=d, config=config)
        return run_loops(
            step_fn,
            a0,
            None,
            length,
            return_states=return_states,
            scan_unroll=scan_unroll,
            remat=remat,
            remat_outer_unroll=remat_outer_unroll,
            python_loops=plan.python_loops,
        )

    if remat:
        chunks = _resolve_remat_batch_chunks(loop.remat_batch_chunks, drive.shape[0], num_steps, slow_rolled_conv)
        if chunks > 1:
            # Only each chunk's drive is kept for the backward pass, which recomputes one chunk at a time.
            one_chunk = jax.checkpoint(lambda d: loops_on(d, initial_state(params, d, config), num_steps))
            final, states, before = map_batch_chunks(
                one_chunk, drive, chunks, rolled=remat_outer_unroll is not True, python_loops=plan.python_loops
            )
            return Unrolled(final, states, relative_change(final, before))

    a0 = initial_state(params, drive, config)
    head = max(num_steps - loop.truncate_steps, 0) if loop.grad_mode == "truncated" else 0
    if head == 0:
        final, states, before = loops_on(drive, a0, num_steps)
        return Unrolled(final, states, relative_change(final, before))
    a_head, head_states, _ = loops_on(drive, a0, head)
    final, tail_states, before = loops_on(drive, jax.lax.stop_gradient(a_head), num_steps - head)
    states = None
    if return_states:
        states = jnp.concatenate([jax.lax.stop_gradient(head_states), tail_states[1:]], axis=0)
    return Unrolled(final, states, relative_change(final, before))
