"""Executing the T lateral loops: scan, √T rematerialisation, batch chunks, truncation.

Every mode runs the same step (:func:`lateral_jax.core.layer.lateral_step`) and returns the same
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

Unrolling: on CPU, the gradient of an XLA convolution inside a *rolled* ``while`` loop takes a
pathologically slow XLA path (jax-ml/jax#12868), so :func:`default_scan_unroll` unrolls such loops
there up to T = :data:`CPU_MAX_UNROLLED_STEPS`.  Longer loops roll, so compile time stays bounded at
any T; with ``conv_algorithm="auto"`` their 3×3 convolutions then take the Winograd path, which
rolls at full speed (other kernels roll on the slow path).  Elsewhere loops of up to 16 steps are
unrolled and longer ones rolled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from lateral_jax.core.batching import largest_divisor, merge_batch, split_batch
from lateral_jax.core.config import LateralConfig, LoopOptions, ScanUnroll
from lateral_jax.core.convolution import use_winograd, winograd_eligible
from lateral_jax.core.layer import Unrolled, initial_state, lateral_step, relative_change
from lateral_jax.core.params import LateralParams

# (carry, x) -> (carry, y): one loop.
StepFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]
# (final a(T), states a(0..T) or None, a(T-1))
LoopResult = tuple[jax.Array, jax.Array | None, jax.Array]


# Longest loop that ``scan_unroll="auto"`` unrolls on CPU; compile time grows linearly with the
# unrolled length (docs/performance.md), so longer loops roll.
CPU_MAX_UNROLLED_STEPS = 32
# Longest loop that ``scan_unroll="auto"`` unrolls everywhere.
MAX_UNROLLED_STEPS = 16


def default_scan_unroll(num_steps: int, *, xla_conv_in_loop: bool = True) -> int | bool:
    """The unroll factor ``scan_unroll="auto"`` picks: ``True`` (a Python-unrolled loop) for loops
    of at most :data:`MAX_UNROLLED_STEPS` steps, and on CPU, when the loop contains an XLA
    convolution (jax-ml/jax#12868), of at most :data:`CPU_MAX_UNROLLED_STEPS`; 1 (rolled)
    otherwise, which bounds compile time and memory for long loops (a rolled loop on CPU runs each
    step of a loop of XLA convolutions many times slower, so :func:`run` gives such loops' 3×3
    convolutions the Winograd path; compile time stays flat at any T)."""
    if num_steps <= MAX_UNROLLED_STEPS:
        return True
    if jax.default_backend() == "cpu" and xla_conv_in_loop and num_steps <= CPU_MAX_UNROLLED_STEPS:
        return True
    return 1


def scan(body, init, xs, length: int, scan_unroll: ScanUnroll):
    """``lax.scan``, except that a full unroll is a Python loop (the same values, stacked).

    ``lax.scan(..., unroll=True)`` still emits a ``while`` loop around the unrolled body (a
    one-trip loop when ``length`` is 1), which is enough for XLA:CPU to take jax#12868's slow path.
    """
    unroll_factor = default_scan_unroll(length) if scan_unroll == "auto" else scan_unroll
    if unroll_factor is True or (not isinstance(unroll_factor, bool) and unroll_factor >= length):
        carry, ys = init, []
        for i in range(length):
            carry, y = body(carry, None if xs is None else jax.tree_util.tree_map(lambda a, i=i: a[i], xs))
            ys.append(y)
        return carry, jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *ys)
    return jax.lax.scan(body, init, xs, length=length, unroll=unroll_factor)


def _scan_steps(step_fn: StepFn, a0: jax.Array, xs, length: int, *, return_states: bool, scan_unroll):
    """Scans ``length`` steps from ``a0``; returns ``((a(T), a(T-1)), a(1..T) or None)``."""

    def body(carry, x):
        prev, _ = carry
        new, _ = step_fn(prev, x)
        return (new, prev), (new if return_states else None)

    return scan(body, (a0, a0), xs, length, scan_unroll)


def remat_segment_length(num_steps: int) -> int:
    """Loops per checkpointed segment in ``"remat"`` mode: ``round(√T)`` (at least 1)."""
    return max(1, round(math.sqrt(num_steps)))


def _scan_steps_remat(
    step_fn: StepFn, a0: jax.Array, num_steps: int, *, return_states: bool, scan_unroll, outer_unroll
):
    """√T checkpointing: an outer scan over segments of S = round(√T) loops, each segment under
    ``jax.checkpoint``; the backward pass stores the T/S segment inputs and recomputes one segment
    (S states) at a time."""
    seg = remat_segment_length(num_steps)
    n_seg, rem = divmod(num_steps, seg)

    def segment(length):
        return jax.checkpoint(
            lambda a: _scan_steps(step_fn, a, None, length, return_states=return_states, scan_unroll=scan_unroll)
        )

    run_seg = segment(seg)
    (final, before), ys = scan(lambda carry, _: run_seg(carry[0]), (a0, a0), None, n_seg, outer_unroll)
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
    scan_unroll: ScanUnroll,
    remat: bool = False,
    remat_outer_unroll: int | bool = 1,
) -> LoopResult:
    """Runs ``num_steps`` loops from ``a0``; returns ``(a(T), a(0..T) or None, a(T-1))``."""
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
        )
    else:
        (final, before), ys = _scan_steps(
            step_fn, a0, xs, num_steps, return_states=return_states, scan_unroll=scan_unroll
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
    fn: Callable[[jax.Array], LoopResult], x: jax.Array, num_chunks: int, *, rolled: bool
) -> LoopResult:
    """``fn`` applied to ``num_chunks`` equal slices of ``x``'s batch axis; outputs reassembled.

    With more than one device the slices are strided (:func:`lateral_jax.core.batching.split_batch`),
    so a batch sharded over devices stays sharded the same way inside every slice.  ``fn`` returns
    ``(final, states | None, before)``; ``states`` has its batch on axis 1.
    """
    _, (final, states, before) = scan(
        lambda carry, d: (carry, fn(d)), None, split_batch(x, num_chunks), num_chunks, 1 if rolled else True
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
    config: LateralConfig,
    loop: LoopOptions,
    return_states: bool,
) -> Unrolled:
    """The T loops of the weight-shared layer on ``drive`` in ``loop.grad_mode`` (not ``"implicit"``)."""
    kernels = [params.w_lat] + ([] if params.w_inh is None else [params.w_inh])
    depthwise = config.mixing == "depthwise"
    winograd_loop = all(use_winograd(drive, k, config.conv_algorithm, depthwise=depthwise) for k in kernels)
    if (
        loop.scan_unroll == "auto"
        and config.conv_algorithm == "auto"
        and jax.default_backend() == "cpu"
        and num_steps > CPU_MAX_UNROLLED_STEPS
        and not winograd_loop
        and all(winograd_eligible(drive, k, depthwise=depthwise) for k in kernels)
    ):
        # A long loop rolls, and XLA:CPU runs a rolled loop of XLA convolutions pathologically
        # slowly (jax#12868): its 3×3 convolutions take the Winograd path, which rolls at full speed.
        config = dataclasses.replace(config, conv_algorithm="winograd")
        winograd_loop = True
    slow_rolled_conv = jax.default_backend() == "cpu" and not winograd_loop
    scan_unroll = remat_outer_unroll = loop.scan_unroll
    if scan_unroll == "auto":
        scan_unroll = default_scan_unroll(num_steps, xla_conv_in_loop=not winograd_loop)
        # remat's outer loop over segments stays rolled: unrolled, XLA:CPU schedules the
        # recomputation next to the forward pass and keeps every state alive.
        remat_outer_unroll = True if slow_rolled_conv else 1
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
        )

    if remat:
        chunks = _resolve_remat_batch_chunks(loop.remat_batch_chunks, drive.shape[0], num_steps, slow_rolled_conv)
        if chunks > 1:
            # Only each chunk's drive is kept for the backward pass, which recomputes one chunk at a time.
            one_chunk = jax.checkpoint(lambda d: loops_on(d, initial_state(params, d, config), num_steps))
            final, states, before = map_batch_chunks(one_chunk, drive, chunks, rolled=remat_outer_unroll is not True)
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
