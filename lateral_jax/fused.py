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

Backward (``jax.custom_vjp``): a reverse loop over the saved states; each loop's VJP is the XLA
reference step (:func:`lateral_jax.recurrence.lateral_step`) at the saved input state, so the
gradient equals backpropagation through time at the cost of one recomputed loop per loop.

Backends: on GPU the kernel compiles through Pallas's Triton lowering; on CPU and TPU it runs in
Pallas's interpreter (the same program, for tests; slow).  Constraints (checked, with a clear
error): full mixing, one lateral kernel (no two-population form), ``C`` a power of two ≥ 16,
``H·W`` divisible by the pixel tile.

Status: the numerics are tested against the XLA reference in interpret mode, and the tests check
that the kernel lowers to a Triton call for CUDA; its speed on a GPU has not been measured yet
(``experiments/bench.py --loop-kernel pallas``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lateral_jax import recurrence as rec

# Tile sizes: every loaded block must have power-of-two sides (Triton) of at least 16 (its dot).
PIXEL_TILE = 64
CHANNEL_TILE = 64


@dataclasses.dataclass(frozen=True)
class LoopGeometry:
    """Static shape of one fused call (hashable: a ``custom_vjp`` non-differentiable argument)."""

    height: int
    width: int
    channels: int
    num_steps: int
    radius: int
    num_groups: int  # 0: no loop norm
    leak: float
    activation: str
    pixel_tile: int
    channel_tile: int
    eps: float = 1e-5

    @property
    def pixels(self) -> int:
        return self.height * self.width

    @property
    def margin(self) -> int:
        """Zero rows before and after the image: ≥ r·W + r, a whole number of pixel tiles."""
        need = self.radius * self.width + self.radius
        return -(-need // self.pixel_tile) * self.pixel_tile

    @property
    def rows(self) -> int:
        return self.margin + self.pixels + self.margin


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_supported(drive_shape: tuple[int, ...], config: rec.LateralConfig, has_inhibitory: bool) -> None:
    """Raises a ``ValueError`` saying why ``loop_kernel='pallas'`` cannot run this layer."""
    _, h, w, c = drive_shape
    problems = []
    if config.mixing != "full":
        problems.append(f"mixing={config.mixing!r} (the kernel needs 'full')")
    if has_inhibitory:
        problems.append("a second (inhibitory) lateral kernel (the two-population form)")
    if not (_is_pow2(c) and c >= 16):
        problems.append(f"{c} channels (needs a power of two >= 16)")
    tile = min(PIXEL_TILE, h * w)
    if not _is_pow2(tile) or (h * w) % tile or tile < 16:
        problems.append(f"a {h}x{w} map (H*W must be a multiple of {PIXEL_TILE}, or a power of two >= 16)")
    if config.loop_norm == "group" and not _is_pow2(c // config.num_groups):
        problems.append(f"{c // config.num_groups} channels per group (needs a power of two)")
    if problems:
        raise ValueError(
            "loop_kernel='pallas' cannot run this layer: "
            + "; ".join(problems)
            + ". Use loop_kernel='xla' (the reference path) for it."
        )


def geometry(drive_shape: tuple[int, ...], config: rec.LateralConfig, num_steps: int) -> LoopGeometry:
    _, h, w, c = drive_shape
    groups = {"none": 0, "group": config.num_groups, "layer": 1}[config.loop_norm]
    return LoopGeometry(
        height=h,
        width=w,
        channels=c,
        num_steps=num_steps,
        radius=config.lateral_size // 2,
        num_groups=groups,
        leak=float(config.leak),
        activation=config.activation,
        pixel_tile=min(PIXEL_TILE, h * w),
        channel_tile=min(CHANNEL_TILE, c),
    )


def _barrier(interpret: bool) -> None:
    """Makes one pass's global-memory writes visible to the whole program before the next reads."""
    if not interpret:
        from jax.experimental.pallas import triton as plt

        plt.debug_barrier()


def _loop_kernel(a0_ref, d_ref, w_ref, scale_ref, bias_ref, states_ref, stats_ref, *, g: LoopGeometry, interpret):
    """One program = one example. Refs: a0, d ``[HW, C]``; w ``[l·l, C, C]``; scale, bias ``[C]``;
    states ``[T+1, rows, C]`` (output); stats ``[4, C]`` fp32 scratch (Σpre, Σpre², μ, 1/σ)."""
    p_tile, c_tile, c = g.pixel_tile, g.channel_tile, g.channels
    n_tiles, n_margin = g.pixels // p_tile, g.margin // p_tile
    dtype = states_ref.dtype
    taps = [(dy, dx) for dy in range(-g.radius, g.radius + 1) for dx in range(-g.radius, g.radius + 1)]

    # Zero margins of every state, and a(0).
    def zero_margins(t, carry):
        def one(i, carry):
            zeros = jnp.zeros((p_tile, c), dtype)
            states_ref[t, pl.ds(i * p_tile, p_tile), :] = zeros
            states_ref[t, pl.ds(g.margin + g.pixels + i * p_tile, p_tile), :] = zeros
            return carry

        return jax.lax.fori_loop(0, n_margin, one, carry)

    jax.lax.fori_loop(0, g.num_steps + 1, zero_margins, 0)

    def copy_a0(i, carry):
        states_ref[0, pl.ds(g.margin + i * p_tile, p_tile), :] = a0_ref[pl.ds(i * p_tile, p_tile), :]
        return carry

    jax.lax.fori_loop(0, n_tiles, copy_a0, 0)
    _barrier(interpret)

    def one_loop(t, carry):
        # Pass 1: pre = d + L(a(t-1)) into states[t]; per-channel Σpre and Σpre² as loop carries (a
        # read-modify-write of global memory inside the loop would race between threads on a GPU).
        def pre_tile(i, sums):
            p0 = i * p_tile
            col = (p0 + jnp.arange(p_tile, dtype=jnp.int32)) % g.width
            new_sums = []
            for j in range(c // c_tile):
                c0 = j * c_tile
                acc = jnp.zeros((p_tile, c_tile), jnp.float32)
                for tap, (dy, dx) in enumerate(taps):
                    valid = ((col + dx) >= 0) & ((col + dx) < g.width)
                    start = g.margin + p0 + dy * g.width + dx
                    for k in range(c // c_tile):
                        x = states_ref[t - 1, pl.ds(start, p_tile), pl.ds(k * c_tile, c_tile)]
                        x = jnp.where(valid[:, None], x, jnp.zeros_like(x))
                        w = w_ref[tap, pl.ds(k * c_tile, c_tile), pl.ds(c0, c_tile)]
                        acc += jnp.dot(x, w, preferred_element_type=jnp.float32)
                pre = d_ref[pl.ds(p0, p_tile), pl.ds(c0, c_tile)] + acc.astype(dtype)
                states_ref[t, pl.ds(g.margin + p0, p_tile), pl.ds(c0, c_tile)] = pre
                pre32 = pre.astype(jnp.float32)
                s1, s2 = sums[j]
                new_sums.append((s1 + jnp.sum(pre32, axis=0), s2 + jnp.sum(pre32 * pre32, axis=0)))
            return tuple(new_sums)

        zero = jnp.zeros((c_tile,), jnp.float32)
        sums = jax.lax.fori_loop(0, n_tiles, pre_tile, tuple((zero, zero) for _ in range(c // c_tile)))
        if g.num_groups:
            for j, (s1, s2) in enumerate(sums):
                stats_ref[0, pl.ds(j * c_tile, c_tile)] = s1
                stats_ref[1, pl.ds(j * c_tile, c_tile)] = s2
        _barrier(interpret)

        # Group statistics, broadcast back to channels (rows 2, 3 of stats).
        if g.num_groups:
            per_group = c // g.num_groups
            count = float(g.pixels * per_group)
            for grp in range(g.num_groups):
                sl = pl.ds(grp * per_group, per_group)
                mean = jnp.sum(stats_ref[0, sl]) / count
                var = jnp.maximum(jnp.sum(stats_ref[1, sl]) / count - mean * mean, 0.0)
                stats_ref[2, sl] = jnp.full((per_group,), mean, jnp.float32)
                stats_ref[3, sl] = jnp.full((per_group,), jax.lax.rsqrt(var + g.eps), jnp.float32)
            _barrier(interpret)

        # Pass 2: a(t) = (1-α) a(t-1) + α f(N(pre)).
        def out_tile(i, carry):
            rows = pl.ds(g.margin + i * p_tile, p_tile)
            z = states_ref[t, rows, :]
            if g.num_groups:
                z32 = (z.astype(jnp.float32) - stats_ref[2, :][None, :]) * stats_ref[3, :][None, :]
                z = (z32 * scale_ref[...][None, :] + bias_ref[...][None, :]).astype(dtype)
            new = rec.activate(z, g.activation)
            if g.leak != 1.0:
                new = ((1.0 - g.leak) * states_ref[t - 1, rows, :] + g.leak * new).astype(dtype)
            states_ref[t, rows, :] = new
            return carry

        jax.lax.fori_loop(0, n_tiles, out_tile, 0)
        _barrier(interpret)
        return carry

    jax.lax.fori_loop(1, g.num_steps + 1, one_loop, 0)


def _call_kernel(a0, drive, w_lat, scale, bias, g: LoopGeometry, interpret: bool) -> jax.Array:
    """The padded states ``[T+1, B, rows, C]`` (see the module docstring)."""
    b, c, hw = drive.shape[0], g.channels, g.pixels
    taps = (2 * g.radius + 1) ** 2
    dtype = drive.dtype
    flat = functools.partial(jnp.reshape, shape=(b, hw, c))
    call_kwargs = {}
    if not interpret:
        from jax.experimental.pallas import triton as plt

        call_kwargs["compiler_params"] = plt.CompilerParams(num_warps=4, num_stages=1)
    states, _ = pl.pallas_call(
        functools.partial(_loop_kernel, g=g, interpret=interpret),
        out_shape=(
            jax.ShapeDtypeStruct((g.num_steps + 1, b, g.rows, c), dtype),
            jax.ShapeDtypeStruct((b, 4, c), jnp.float32),
        ),
        grid=(b,),
        in_specs=[
            pl.BlockSpec((None, hw, c), lambda i: (i, 0, 0)),
            pl.BlockSpec((None, hw, c), lambda i: (i, 0, 0)),
            pl.BlockSpec((taps, c, c), lambda i: (0, 0, 0)),
            pl.BlockSpec((c,), lambda i: (0,)),
            pl.BlockSpec((c,), lambda i: (0,)),
        ],
        out_specs=(
            pl.BlockSpec((g.num_steps + 1, None, g.rows, c), lambda i: (0, i, 0, 0)),
            pl.BlockSpec((None, 4, c), lambda i: (i, 0, 0)),
        ),
        interpret=interpret,
        name="lateral_loops",
        **call_kwargs,
    )(flat(a0), flat(drive), w_lat.astype(dtype).reshape(taps, c, c), scale, bias)
    return states


def _unpad(states: jax.Array, g: LoopGeometry) -> jax.Array:
    t1, b = states.shape[:2]
    return states[:, :, g.margin : g.margin + g.pixels].reshape(t1, b, g.height, g.width, g.channels)


def _reference_step(a_prev, drive, w_lat, scale, bias, config: rec.LateralConfig):
    norm = rec.NormParams(scale, bias) if config.loop_norm != "none" else None
    params = rec.LateralParams(None, None, w_lat, loop_norm=norm)
    return rec.lateral_step(a_prev, None, params=params, drive=drive, config=config)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused_states(a0, drive, w_lat, scale, bias, g, config, interpret):
    return _unpad(_call_kernel(a0, drive, w_lat, scale, bias, g, interpret), g)


def _fused_states_fwd(a0, drive, w_lat, scale, bias, g, config, interpret):
    states = _fused_states(a0, drive, w_lat, scale, bias, g, config, interpret)
    return states, (states, drive, w_lat, scale, bias)


def _fused_states_bwd(g, config, interpret, residuals, g_states):
    states, drive, w_lat, scale, bias = residuals
    zeros = jax.tree_util.tree_map(jnp.zeros_like, (drive, w_lat, scale, bias))

    def back(carry, xs):
        g_next, acc = carry  # ∂L/∂a(t) flowing back from loop t+1; accumulated parameter cotangents
        a_prev, g_out = xs
        _, vjp = jax.vjp(functools.partial(_reference_step, config=config), a_prev, drive, w_lat, scale, bias)
        g_prev, *g_params = vjp(g_out + g_next)
        return (g_prev, jax.tree_util.tree_map(jnp.add, acc, tuple(g_params))), None

    unroll = True if jax.default_backend() == "cpu" else 1  # jax#12868: XLA:CPU conv gradients in a loop
    (g_a0, (g_d, g_w, g_s, g_b)), _ = jax.lax.scan(
        back, (jnp.zeros_like(states[0]), zeros), (states[:-1], g_states[1:]), reverse=True, unroll=unroll
    )
    return g_a0 + g_states[0], g_d, g_w, g_s, g_b


_fused_states.defvjp(_fused_states_fwd, _fused_states_bwd)


def loop_states(
    params: rec.LateralParams,
    drive: jax.Array,
    a0: jax.Array,
    *,
    num_steps: int,
    config: rec.LateralConfig,
    interpret: bool | None = None,
) -> jax.Array:
    """``a(0..T)`` as ``[T+1, B, H, W, C]``, the loops run by the fused kernel; ``a0 = a(0)``.

    Equal (up to float reassociation) to the XLA loop of :func:`lateral_jax.recurrence.recur`, and
    differentiable in ``a0``, ``drive``, ``W_lat`` and the loop norm's parameters.  ``interpret``:
    run Pallas's interpreter (default: everywhere but on a GPU).
    """
    check_supported(drive.shape, config, params.w_inh is not None)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    g = geometry(drive.shape, config, num_steps)
    c = g.channels
    if params.loop_norm is not None:
        scale, bias = params.loop_norm.scale, params.loop_norm.bias
    else:
        scale, bias = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    return _fused_states(a0, drive, params.w_lat, scale, bias, g, config, bool(interpret))


__all__ = ["LoopGeometry", "check_supported", "geometry", "loop_states"]
