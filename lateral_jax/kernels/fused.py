"""A fused Pallas kernel for the T lateral loops of one layer (opt-in: ``LateralConfig.loop_kernel``).

The XLA path launches, per loop, a convolution, a normalisation and an activation, and reads the
drive and the lateral kernel from device memory every time.  Here one Pallas program per example
runs *all* T loops::

    for t in 1..T:                                  (one program per example, grid = (B,))
        pass 1, per tile of P pixels:   pre  = d + Σ_taps  a(t-1)[p + δ_tap] · W_lat[tap]
                                        s₁  += Σ_p pre,   s₂ += Σ_p pre²        (per channel, fp32)
        group statistics:               μ_g  = Σ_{c∈g} s₁ / n_g,   σ²_g = Σ_{c∈g} s₂ / n_g − μ_g²
        pass 2, per tile:               a(t) = (1−α) a(t-1) + α f(γ (pre − μ) / √(σ² + ε) + β)

The state of one example is kept flattened, ``[H·W, C]``, between zero margins of ``r·W + r``
rows or more (``r`` the lateral radius), so a 3×3 tap ``(dy, dx)`` is the row shift ``dy·W + dx``;
rows whose column wraps around the image edge are masked.  Every loop's state is written to the
``states`` output ``[T+1, B, margin + H·W + margin, C]``, which is both the kernel's working
buffer (it stays in L2 on a GPU) and what the backward pass needs.

Backward (hand-written): a second kernel, one program per example, runs the
loops backwards over the saved states.  Per loop it recomputes ``pre(t)`` from ``a(t-1)`` (one
convolution; the forward pass keeps only the states), then ``∂L/∂z = α f'(z) ḡ``, the GroupNorm
backward ``∂L/∂pre = (u − ⟨u⟩_g − x̂ ⟨u x̂⟩_g)/σ`` with ``u = γ ∂L/∂z``, and the transposed lateral
convolution ``∂L/∂a(t-1) = (1−α) ḡ + Σ_δ ∂L/∂pre[p − δ] W[δ]ᵀ``.  The reductions over loops, batch
and pixels run in XLA as single large ops: ``∂L/∂d = Σ_t ∂L/∂pre(t)`` and ``∂L/∂W_lat``, the
weight gradient of one convolution over the ``T·B`` pairs ``(a(t-1), ∂L/∂pre(t))``.

Differentiation: the call is a ``jax.experimental.hijax`` primitive with a VJP *and* a JVP.
Reverse mode (``jax.grad``, ``jax.vjp``) runs the backward kernel above; forward mode
(``jax.jvp``, ``jax.jacfwd``) and ``jax.linearize`` take the states from the forward kernel and
their tangents from the same loops written in XLA ops (:func:`_xla_states`).  Second-order
derivatives (Hessian-vector products) would differentiate the Pallas kernels themselves, which
Pallas does not support: use ``loop_kernel="xla"`` for them.

Backends: on GPU the kernel compiles through Pallas's Triton lowering; on CPU and TPU it runs in
Pallas's interpreter (the same program, for tests; slow).  Constraints (checked, with a clear
error): full mixing, one lateral kernel (no two-population form), ``C`` a power of two ≥ 16.  Any
map size: ``H·W`` is rounded up to whole pixel tiles whose tail rows are kept at zero.

Verification: the numerics are tested against the XLA reference in interpret mode, and the tests
check that the kernel lowers to a Triton call for CUDA; its GPU speed is measured by
``experiments/bench.py --loop-kernel pallas`` (docs/performance.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import hijax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from lateral_jax.core import plan
from lateral_jax.core.cell import Unrolled, initial_state, lateral_step, relative_change
from lateral_jax.core.config import GradMode, LateralConfig
from lateral_jax.core.params import LateralParams, NormParams
from lateral_jax.core.sharding import DATA_AXIS, data_parallel_mesh
from lateral_jax.kernels.convolution import conv
from lateral_jax.kernels.fused_kernels import LoopGeometry, check_supported, geometry, loop_grad_kernel, loop_kernel


def _compiler_params(interpret: bool) -> dict:
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plt

    return {"compiler_params": plt.CompilerParams(num_warps=4, num_stages=1)}


def _per_example(*shape) -> pl.BlockSpec:
    """Block of one example of a ``[B, *shape]`` array (batch axis squeezed)."""
    return pl.BlockSpec((None, *shape), lambda i: (i,) + (0,) * len(shape))


def _per_example_time_major(*shape) -> pl.BlockSpec:
    """Block of one example of a ``[T', B, *shape]`` array."""
    return pl.BlockSpec((shape[0], None, *shape[1:]), lambda i: (0, i) + (0,) * (len(shape) - 1))


def _shared(*shape) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda i: (0,) * len(shape))


def _flat_pixels(x: jax.Array, g: LoopGeometry) -> jax.Array:
    """``[..., H, W, C]`` → ``[..., H·W rounded up to whole tiles, C]`` (zero tail rows)."""
    flat = x.reshape(*x.shape[:-3], g.pixels, g.channels)
    pad = [(0, 0)] * (flat.ndim - 2) + [(0, g.padded_pixels - g.pixels), (0, 0)]
    return jnp.pad(flat, pad) if g.padded_pixels != g.pixels else flat


def _kernel_args(drive, w_lat, g: LoopGeometry):
    taps, c = (2 * g.radius + 1) ** 2, g.channels
    return _flat_pixels(drive, g), w_lat.astype(drive.dtype).reshape(taps, c, c)


def _call_kernel(a0, drive, w_lat, scale, bias, g: LoopGeometry, interpret: bool) -> jax.Array:
    """The padded states ``[T+1, B, rows, C]`` (see the module docstring)."""
    b, c, hw, taps = drive.shape[0], g.channels, g.padded_pixels, (2 * g.radius + 1) ** 2
    d, w = _kernel_args(drive, w_lat, g)
    states, _ = pl.pallas_call(
        functools.partial(loop_kernel, g=g, interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((g.num_steps + 1, b, g.rows, c), drive.dtype),
            jax.ShapeDtypeStruct((b, 4, c), jnp.float32),
        ),
        grid=(b,),
        in_specs=[_per_example(hw, c), _per_example(hw, c), _shared(taps, c, c), _shared(c), _shared(c)],
        out_specs=(_per_example_time_major(g.num_steps + 1, g.rows, c), _per_example(4, c)),
        interpret=interpret,
        name="lateral_loops",
        **_compiler_params(interpret),
    )(_flat_pixels(a0, g), d, w, scale, bias)
    return states


def _call_grad_kernel(states, drive, w_lat, scale, bias, g_states, g: LoopGeometry, interpret: bool):
    """``(∂L/∂pre(1..T) [T, B, rows, C] padded, ∂L/∂a(0) [B, HW, C], (∂L/∂γ, ∂L/∂β) [B, 2, C])``."""
    b, c, hw, taps, t = drive.shape[0], g.channels, g.padded_pixels, (2 * g.radius + 1) ** 2, g.num_steps
    d, w = _kernel_args(drive, w_lat, g)
    f32 = jnp.float32
    gpre, ga0, gnorm, *_ = pl.pallas_call(
        functools.partial(loop_grad_kernel, g=g, interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((t, b, g.rows, c), f32),  # ∂L/∂pre(t), padded
            jax.ShapeDtypeStruct((b, hw, c), f32),  # ∂L/∂a(0)
            jax.ShapeDtypeStruct((b, 2, c), f32),  # ∂L/∂γ, ∂L/∂β per example
            jax.ShapeDtypeStruct((b, hw, c), f32),  # scratch: running ∂L/∂a(t)
            jax.ShapeDtypeStruct((b, hw, c), drive.dtype),  # scratch: pre(t)
            jax.ShapeDtypeStruct((b, hw, c), f32),  # scratch: ∂L/∂z
            jax.ShapeDtypeStruct((b, 8, c), f32),  # scratch: statistics
        ),
        grid=(b,),
        in_specs=[
            _per_example_time_major(t + 1, g.rows, c),
            _per_example(hw, c),
            _shared(taps, c, c),
            _shared(c),
            _shared(c),
            _per_example_time_major(t + 1, hw, c),
        ],
        out_specs=(
            _per_example_time_major(t, g.rows, c),
            _per_example(hw, c),
            _per_example(2, c),
            _per_example(hw, c),
            _per_example(hw, c),
            _per_example(hw, c),
            _per_example(8, c),
        ),
        interpret=interpret,
        name="lateral_loops_grad",
        **_compiler_params(interpret),
    )(states, d, w, scale, bias, _flat_pixels(g_states, g))
    return gpre, ga0, gnorm


def _unpad(states: jax.Array, g: LoopGeometry) -> jax.Array:
    t1, b = states.shape[:2]
    return states[:, :, g.margin : g.margin + g.pixels].reshape(t1, b, g.height, g.width, g.channels)


def _xla_states(a0, drive, w_lat, scale, bias, config: LateralConfig, num_steps: int) -> jax.Array:
    """The same loops as the kernel in XLA ops (:func:`lateral_jax.core.cell.lateral_step`):
    ``a(0..T)`` ``[T+1, B, H, W, C]`` from ``a(0)``; what forward mode differentiates."""
    loop_norm = NormParams(scale, bias) if config.loop_norm != "none" else None
    params = LateralParams(None, None, w_lat, None, None, loop_norm)

    def body(a, _):
        return lateral_step(a, None, params=params, drive=drive, config=config)

    _, states = jax.lax.scan(body, a0, None, length=num_steps)
    return jnp.concatenate([a0[None], states])


def _backward(g: LoopGeometry, config: LateralConfig, interpret: bool, residuals, g_states):
    """The fused backward kernel for the sequential part; the two reductions over loops, batch and
    pixels run in XLA as single large ops: ``∂L/∂d = Σ_t ∂L/∂pre(t)`` and ``∂L/∂W`` as the
    weight-gradient of one convolution over the ``T·B`` pairs ``(a(t-1), ∂L/∂pre(t))``."""
    padded, drive, w_lat, scale, bias = residuals
    gpre, ga0, gnorm = _call_grad_kernel(padded, drive, w_lat, scale, bias, g_states, g, interpret)
    t, b = g.num_steps, drive.shape[0]
    gpre = _unpad(gpre, g).astype(drive.dtype)
    inputs = _unpad(padded[:-1], g)
    flat = (t * b, g.height, g.width, g.channels)

    def lateral_conv(w):
        return conv(inputs.reshape(flat), w, algorithm=config.conv_algorithm)

    g_w = jax.vjp(lateral_conv, w_lat.astype(drive.dtype))[1](gpre.reshape(flat))[0].astype(w_lat.dtype)
    g_d = jnp.sum(gpre.astype(jnp.float32), axis=0).astype(drive.dtype)
    g_a0 = ga0[:, : g.pixels].reshape(drive.shape).astype(drive.dtype)
    g_scale, g_bias = jnp.sum(gnorm[:, 0], axis=0).astype(scale.dtype), jnp.sum(gnorm[:, 1], axis=0).astype(bias.dtype)
    return g_a0, g_d, g_w, g_scale, g_bias


class _FusedLoops(hijax.VJPHiPrimitive):
    """The fused loops as a primitive with both a VJP and a JVP (``jax.experimental.hijax``).

    Reverse mode (``jax.grad``, ``jax.vjp``) runs the hand-written backward kernel
    (:func:`_backward`); forward mode (``jax.jvp``, ``jax.jacfwd``) and ``jax.linearize`` take the
    primal from the fused kernel and the tangent from the same loops in XLA ops
    (:func:`_xla_states`), whose derivatives JAX derives.  A ``custom_vjp`` alone would refuse
    forward mode; a ``custom_jvp`` alone would make reverse mode transpose the XLA tangent and
    lose the backward kernel.
    """

    def __init__(self, in_avals, g: LoopGeometry, config: LateralConfig, interpret: bool):
        drive = in_avals[1]
        self.in_avals = tuple(in_avals)
        self.out_aval = hijax.ShapedArray((g.num_steps + 1, *drive.shape), drive.dtype)
        self.params = {"g": g, "config": config, "interpret": interpret}
        super().__init__()

    def expand(self, a0, drive, w_lat, scale, bias):
        return _unpad(_call_kernel(a0, drive, w_lat, scale, bias, self.g, self.interpret), self.g)

    def vjp_fwd(self, nzs_in, a0, drive, w_lat, scale, bias):
        padded = _call_kernel(a0, drive, w_lat, scale, bias, self.g, self.interpret)
        return _unpad(padded, self.g), (padded, drive, w_lat, scale, bias)

    def vjp_bwd_retval(self, residuals, g_states):
        return _backward(self.g, self.config, self.interpret, residuals, g_states)

    def _tangent(self, primals, tangents):
        tangents = tuple(hijax.instantiate_zeros(t) for t in tangents)
        reference = functools.partial(_xla_states, config=self.config, num_steps=self.g.num_steps)
        return jax.jvp(reference, tuple(primals), tangents)[1]

    def jvp(self, primals, tangents):
        return self.expand(*primals), self._tangent(primals, tangents)

    def lin(self, nzs_in, *primals):
        return self.expand(*primals), primals

    def linearized(self, primals, *tangents):
        return self._tangent(primals, tangents)


def _fused_states(a0, drive, w_lat, scale, bias, g: LoopGeometry, config: LateralConfig, interpret: bool):
    args = (a0, drive, w_lat, scale, bias)
    return _FusedLoops(tuple(jax.typeof(x) for x in args), g, config, interpret)(*args)


def loop_states(
    params: LateralParams,
    drive: jax.Array,
    a0: jax.Array,
    *,
    num_steps: int,
    config: LateralConfig,
    interpret: bool | None = None,
) -> jax.Array:
    """``a(0..T)`` as ``[T+1, B, H, W, C]``, the loops run by the fused kernel; ``a0 = a(0)``.

    Equal (up to float reassociation) to the XLA loop of :func:`lateral_jax.core.recurrence.recur`, and
    differentiable in ``a0``, ``drive``, ``W_lat`` and the loop norm's parameters.  ``interpret``:
    run Pallas's interpreter (default: everywhere but on a GPU).
    """
    check_supported(drive.shape, config, params.w_inh is not None)
    if interpret is None:
        interpret = plan.resolve(config).pallas_interpret
    g = geometry(drive.shape, config, num_steps)
    c = g.channels
    if params.loop_norm is not None:
        scale, bias = params.loop_norm.scale, params.loop_norm.bias
    else:
        scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)

    def run(a0, drive, w_lat, scale, bias):
        return _fused_states(a0, drive, w_lat, scale, bias, g, config, bool(interpret))

    mesh = data_parallel_mesh(drive.shape[0], who="loop_kernel='pallas'")
    if mesh is not None:  # one kernel per device on its shard of the batch; W_lat's gradient is summed
        batch, shared = P(DATA_AXIS), P()
        run = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(batch, batch, shared, shared, shared),
            out_specs=P(None, DATA_AXIS),
            check_vma=False,  # pallas_call outputs carry no varying-axes annotation
        )
    return run(a0, drive, params.w_lat, scale, bias)


def recur_fused(
    params: LateralParams,
    drive: jax.Array,
    *,
    num_steps: int,
    config: LateralConfig,
    grad_mode: GradMode,
    return_states: bool,
    interpret: bool | None = None,
) -> Unrolled:
    """:func:`lateral_jax.core.recurrence.recur` with ``loop_kernel="pallas"`` (full BPTT gradient);
    ``interpret`` as :func:`loop_states`."""
    plan.check_pallas(grad_mode)
    a0 = initial_state(params, drive, config)
    if num_steps == 0:
        return Unrolled(a0, a0[None] if return_states else None, relative_change(a0, a0))
    states = loop_states(params, drive, a0, num_steps=num_steps, config=config, interpret=interpret)
    return Unrolled(states[-1], states if return_states else None, relative_change(states[-1], states[-2]))


__all__ = ["LoopGeometry", "check_supported", "geometry", "loop_states", "recur_fused"]
