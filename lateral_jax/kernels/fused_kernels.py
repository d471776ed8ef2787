"""The Pallas programs of the fused lateral loop kernel (see :mod:`lateral_jax.kernels.fused`).

:func:`loop_kernel` runs all T loops of one example; :func:`loop_grad_kernel` runs them backwards
over the saved states.  :class:`LoopGeometry` is the static shape both are specialised to.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from lateral_jax.core.cell import activate
from lateral_jax.core.config import LateralConfig

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
    def tiles(self) -> int:
        return -(-self.pixels // self.pixel_tile)

    @property
    def padded_pixels(self) -> int:
        """``H·W`` rounded up to whole tiles; the tail rows past ``H·W`` are kept at zero."""
        return self.tiles * self.pixel_tile

    @property
    def rows(self) -> int:
        return self.margin + self.padded_pixels + self.margin


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def check_supported(drive_shape: tuple[int, ...], config: LateralConfig, has_inhibitory: bool) -> None:
    """Raises a ``ValueError`` saying why ``loop_kernel='pallas'`` cannot run this layer."""
    c = drive_shape[-1]
    problems = []
    if config.mixing != "full":
        problems.append(f"mixing={config.mixing!r} (the kernel needs 'full')")
    if has_inhibitory:
        problems.append("a second (inhibitory) lateral kernel (the two-population form)")
    if not (_is_pow2(c) and c >= 16):
        problems.append(f"{c} channels (needs a power of two >= 16)")
    if config.loop_norm == "group" and not _is_pow2(c // config.num_groups):
        problems.append(f"{c // config.num_groups} channels per group (needs a power of two)")
    if problems:
        raise ValueError(
            "loop_kernel='pallas' cannot run this layer: "
            + "; ".join(problems)
            + ". Use loop_kernel='xla' (the reference path) for it."
        )


def geometry(drive_shape: tuple[int, ...], config: LateralConfig, num_steps: int) -> LoopGeometry:
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
        pixel_tile=min(PIXEL_TILE, max(16, 1 << (h * w - 1).bit_length())),
        channel_tile=min(CHANNEL_TILE, c),
    )


def _barrier(interpret: bool) -> None:
    """Makes one pass's global-memory writes visible to the whole program before the next reads."""
    if not interpret:
        from jax.experimental.pallas import triton as plt

        plt.debug_barrier()


def _taps(g: LoopGeometry) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(-g.radius, g.radius + 1) for dx in range(-g.radius, g.radius + 1)]


def _inside(values: jax.Array, p0, g: LoopGeometry) -> jax.Array:
    """``values`` (a ``[P, ...]`` tile starting at pixel ``p0``) with its rows past ``H·W`` zeroed
    (only the last tile has such rows, and only when ``H·W`` is not a whole number of tiles)."""
    if g.padded_pixels == g.pixels:
        return values
    valid = (p0 + jnp.arange(g.pixel_tile, dtype=jnp.int32)) < g.pixels
    return jnp.where(valid.reshape(-1, *([1] * (values.ndim - 1))), values, jnp.zeros_like(values))


def _zero_margins(ref, num_slots: int, g: LoopGeometry) -> None:
    """Zeroes the margin rows of ``ref[0..num_slots)``, a ``[slots, rows, C]`` padded buffer."""
    p_tile = g.pixel_tile

    def zero_slot(t, carry):
        def one(i, carry):
            zeros = jnp.zeros((p_tile, g.channels), ref.dtype)
            ref[t, pl.ds(i * p_tile, p_tile), :] = zeros
            ref[t, pl.ds(g.margin + g.padded_pixels + i * p_tile, p_tile), :] = zeros
            return carry

        return jax.lax.fori_loop(0, g.margin // p_tile, one, carry)

    jax.lax.fori_loop(0, num_slots, zero_slot, 0)


def _conv_tile(load, w_ref, p0, c0, g: LoopGeometry, *, transpose: bool) -> jax.Array:
    """``[P, c_tile]`` fp32 block (pixels ``p0…``, channels ``c0…``) of the lateral convolution of a
    padded map read through ``load(row_slice, channel_slice)``: ``Σ_δ src[p + δ] · W[δ]``, or with
    ``transpose`` its adjoint ``Σ_δ src[p − δ] · W[δ]ᵀ``.  Taps that wrap around a row are masked."""
    p_tile, c_tile = g.pixel_tile, g.channel_tile
    col = (p0 + jnp.arange(p_tile, dtype=jnp.int32)) % g.width
    acc = jnp.zeros((p_tile, c_tile), jnp.float32)
    for tap, (dy, dx) in enumerate(_taps(g)):
        sy, sx = (-dy, -dx) if transpose else (dy, dx)
        valid = ((col + sx) >= 0) & ((col + sx) < g.width)
        start = g.margin + p0 + sy * g.width + sx
        for k in range(g.channels // c_tile):
            x = load(pl.ds(start, p_tile), pl.ds(k * c_tile, c_tile))
            x = jnp.where(valid[:, None], x, jnp.zeros_like(x))
            if transpose:
                w = w_ref[tap, pl.ds(c0, c_tile), pl.ds(k * c_tile, c_tile)].astype(x.dtype)
                acc += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            else:
                w = w_ref[tap, pl.ds(k * c_tile, c_tile), pl.ds(c0, c_tile)].astype(x.dtype)
                acc += jnp.dot(x, w, preferred_element_type=jnp.float32)
    return acc


def _pre_pass(load_prev, d_ref, w_ref, store_pre, g: LoopGeometry):
    """``pre = d + L(a(t-1))`` for every tile, written with ``store_pre(pixel_slice, channel_slice, pre)``.

    Returns the per-channel ``(Σ pre, Σ pre²)`` in fp32, one pair per channel tile, summed as loop
    carries (a read-modify-write of global memory inside the loop would race between threads)."""
    p_tile, c_tile = g.pixel_tile, g.channel_tile

    def tile(i, sums):
        p0 = i * p_tile
        new_sums = []
        for j in range(g.channels // c_tile):
            c0 = j * c_tile
            acc = _conv_tile(load_prev, w_ref, p0, c0, g, transpose=False)
            drive = d_ref[pl.ds(p0, p_tile), pl.ds(c0, c_tile)]
            pre = drive + acc.astype(drive.dtype)
            store_pre(pl.ds(p0, p_tile), pl.ds(c0, c_tile), pre)
            pre32 = _inside(pre.astype(jnp.float32), p0, g)  # moments over the image's pixels only
            s1, s2 = sums[j]
            new_sums.append((s1 + jnp.sum(pre32, axis=0), s2 + jnp.sum(pre32 * pre32, axis=0)))
        return tuple(new_sums)

    zero = jnp.zeros((c_tile,), jnp.float32)
    return jax.lax.fori_loop(0, g.tiles, tile, tuple((zero, zero) for _ in range(g.channels // c_tile)))


def _group_means(stats_ref, src_rows: tuple[int, int], dst_rows: tuple[int, int], g: LoopGeometry, rsqrt: bool):
    """Per-channel sums in ``stats[src_rows]`` → their means over each group, broadcast back to the
    group's channels in ``stats[dst_rows]``.  With ``rsqrt`` the pair is ``(Σx, Σx²)`` and the
    result ``(μ, 1/√(σ² + ε))``."""
    per_group = g.channels // g.num_groups
    count = float(g.pixels * per_group)
    for grp in range(g.num_groups):
        sl = pl.ds(grp * per_group, per_group)
        m1 = jnp.sum(stats_ref[src_rows[0], sl]) / count
        m2 = jnp.sum(stats_ref[src_rows[1], sl]) / count
        if rsqrt:
            m2 = jax.lax.rsqrt(jnp.maximum(m2 - m1 * m1, 0.0) + g.eps)
        stats_ref[dst_rows[0], sl] = jnp.full((per_group,), m1, jnp.float32)
        stats_ref[dst_rows[1], sl] = jnp.full((per_group,), m2, jnp.float32)


def _store_channel_sums(stats_ref, rows: tuple[int, int], sums, c_tile: int) -> None:
    for j, (s1, s2) in enumerate(sums):
        stats_ref[rows[0], pl.ds(j * c_tile, c_tile)] = s1
        stats_ref[rows[1], pl.ds(j * c_tile, c_tile)] = s2


def _pre_and_moments(load_prev, store_pre, d_ref, w_ref, stats_ref, g: LoopGeometry, interpret: bool) -> None:
    """:func:`_pre_pass`, then (with a loop norm) the group mean and 1/σ into ``stats[2], stats[3]``."""
    sums = _pre_pass(load_prev, d_ref, w_ref, store_pre, g)
    if g.num_groups:
        _store_channel_sums(stats_ref, (0, 1), sums, g.channel_tile)
        _barrier(interpret)
        _group_means(stats_ref, (0, 1), (2, 3), g, rsqrt=True)
    _barrier(interpret)


def _normalised(pre, stats_ref, scale_ref, bias_ref, dtype):
    """``(x̂, z)``: ``x̂ = (pre − μ)/σ`` (fp32) and the norm's output ``z = γ x̂ + β`` (in ``dtype``)."""
    xhat = (pre.astype(jnp.float32) - stats_ref[2, :][None, :]) * stats_ref[3, :][None, :]
    return xhat, (xhat * scale_ref[...][None, :] + bias_ref[...][None, :]).astype(dtype)


def loop_kernel(a0_ref, d_ref, w_ref, scale_ref, bias_ref, states_ref, stats_ref, *, g: LoopGeometry, interpret):
    """Forward, one program = one example. Refs: a0, d ``[HW, C]``; w ``[l·l, C, C]``; scale, bias
    ``[C]``; states ``[T+1, rows, C]`` (output); stats ``[4, C]`` fp32 scratch (Σpre, Σpre², μ, 1/σ)."""
    p_tile = g.pixel_tile
    dtype = states_ref.dtype
    _zero_margins(states_ref, g.num_steps + 1, g)

    def copy_a0(i, carry):
        states_ref[0, pl.ds(g.margin + i * p_tile, p_tile), :] = a0_ref[pl.ds(i * p_tile, p_tile), :]
        return carry

    jax.lax.fori_loop(0, g.tiles, copy_a0, 0)
    _barrier(interpret)

    def one_loop(t, carry):
        # Pass 1: pre = d + L(a(t-1)) into states[t], with its per-channel moments.
        def store(rows, cols, pre):
            states_ref[t, pl.ds(g.margin + rows.start, rows.size), cols] = pre

        _pre_and_moments(lambda rows, cols: states_ref[t - 1, rows, cols], store, d_ref, w_ref, stats_ref, g, interpret)

        # Pass 2: a(t) = (1-α) a(t-1) + α f(N(pre)).
        def out_tile(i, carry):
            rows = pl.ds(g.margin + i * p_tile, p_tile)
            z = states_ref[t, rows, :]
            if g.num_groups:
                z = _normalised(z, stats_ref, scale_ref, bias_ref, dtype)[1]
            new = activate(z, g.activation)
            if g.leak != 1.0:
                new = ((1.0 - g.leak) * states_ref[t - 1, rows, :] + g.leak * new).astype(dtype)
            states_ref[t, rows, :] = _inside(new, i * p_tile, g)  # tail rows stay zero padding
            return carry

        jax.lax.fori_loop(0, g.tiles, out_tile, 0)
        _barrier(interpret)
        return carry

    jax.lax.fori_loop(1, g.num_steps + 1, one_loop, 0)


class _GradRefs(NamedTuple):
    """The refs of one :func:`loop_grad_kernel` program (see its docstring)."""

    states: Any
    d: Any
    w: Any
    scale: Any
    bias: Any
    gout: Any
    gpre: Any
    ga0: Any
    gnorm: Any
    gcarry: Any
    pre: Any
    gz: Any
    stats: Any


def _dz_pass(r: _GradRefs, t, gnorm, g: LoopGeometry, dtype):
    """Pass B of loop ``t``: ``∂L/∂z = α f'(z) ḡ``; with a norm also ``Σu``, ``Σu·x̂`` (this loop,
    returned) and ``∂L/∂γ``, ``∂L/∂β`` (accumulated into ``gnorm`` over the loops)."""
    p_tile = g.pixel_tile

    def dz_tile(i, carry):
        rows = pl.ds(i * p_tile, p_tile)
        gbar = r.gcarry[rows, :] + r.gout[t, rows, :].astype(jnp.float32)
        pre = r.pre[rows, :]
        if g.num_groups:
            xhat, z = _normalised(pre, r.stats, r.scale, r.bias, dtype)
        else:
            z = pre
        act_vjp = jax.vjp(lambda v: activate(v, g.activation), z.astype(jnp.float32))[1]
        gz = _inside(g.leak * act_vjp(gbar)[0], i * p_tile, g)
        if not g.num_groups:
            r.gpre[t - 1, pl.ds(g.margin + i * p_tile, p_tile), :] = gz
            return carry
        r.gz[rows, :] = gz
        su, sux, sgg, sgb = carry
        u = gz * r.scale[...][None, :]
        return (
            su + jnp.sum(u, axis=0),
            sux + jnp.sum(u * xhat, axis=0),
            sgg + jnp.sum(gz * xhat, axis=0),
            sgb + jnp.sum(gz, axis=0),
        )

    zero = jnp.zeros((g.channels,), jnp.float32)
    return jax.lax.fori_loop(0, g.tiles, dz_tile, (zero, zero, gnorm[0], gnorm[1]))


def _dpre_pass(r: _GradRefs, t, g: LoopGeometry, dtype) -> None:
    """Pass C of loop ``t``: ``∂L/∂pre`` through the GroupNorm (group means of ``u``, ``u·x̂`` in
    stats rows 4, 5)."""
    p_tile = g.pixel_tile

    def dpre_tile(i, carry):
        rows = pl.ds(i * p_tile, p_tile)
        xhat = _normalised(r.pre[rows, :], r.stats, r.scale, r.bias, dtype)[0]
        u = r.gz[rows, :] * r.scale[...][None, :]
        dpre = (u - r.stats[4, :][None, :] - xhat * r.stats[5, :][None, :]) * r.stats[3, :][None, :]
        r.gpre[t - 1, pl.ds(g.margin + i * p_tile, p_tile), :] = _inside(dpre, i * p_tile, g)
        return carry

    jax.lax.fori_loop(0, g.tiles, dpre_tile, 0)


def _da_pass(r: _GradRefs, t, g: LoopGeometry, dtype) -> None:
    """Pass D of loop ``t``: ``∂L/∂a(t-1) = (1-α) ḡ + Wᵀ ⋆ ∂L/∂pre``, the running cotangent."""
    p_tile, c_tile = g.pixel_tile, g.channel_tile

    def da_tile(i, carry):
        p0 = i * p_tile
        for j in range(g.channels // c_tile):
            block = (pl.ds(p0, p_tile), pl.ds(j * c_tile, c_tile))
            acc = _conv_tile(
                lambda rows, cols: r.gpre[t - 1, rows, cols].astype(dtype), r.w, p0, j * c_tile, g, transpose=True
            )
            if g.leak != 1.0:
                gbar = r.gcarry[block] + r.gout[(t, *block)].astype(jnp.float32)
                acc += (1.0 - g.leak) * gbar
            r.gcarry[block] = acc
        return carry

    jax.lax.fori_loop(0, g.tiles, da_tile, 0)


def loop_grad_kernel(*refs, g: LoopGeometry, interpret):
    """Backward, one program = one example, loops ``t = T … 1``.  Refs, in order: the padded states
    ``[T+1, rows, C]``, d, w, scale, bias as forward, ``gout = ∂L/∂a(0..T)`` ``[T+1, HW, C]``;
    outputs ``gpre[t-1] = ∂L/∂pre(t)`` ``[T, rows, C]`` (padded, fp32), ``∂L/∂a(0)``, ``(∂L/∂γ,
    ∂L/∂β)`` ``[2, C]``; scratch: the running ``∂L/∂a(t)``, ``pre``, ``∂L/∂z``, stats ``[8, C]``
    (rows 0–5 used; 8 rows, a power of two, for Triton).

    Per loop, with ``ḡ = ∂L/∂a(t)``, ``z = γ x̂ + β``, ``u = γ ∂L/∂z``::

        ∂L/∂z   = α f'(z) ḡ
        ∂L/∂pre = (u − mean_g(u) − x̂ mean_g(u x̂)) / σ          (= ∂L/∂z without a norm)
        ∂L/∂a(t-1) = (1 − α) ḡ + Σ_δ ∂L/∂pre[p − δ] · W[δ]ᵀ + ∂L/∂a(t-1) from the output
    """
    r = _GradRefs(*refs)
    p_tile, c = g.pixel_tile, g.channels
    dtype = r.states.dtype
    _zero_margins(r.gpre, g.num_steps, g)

    def zero_carry(i, carry):
        r.gcarry[pl.ds(i * p_tile, p_tile), :] = jnp.zeros((p_tile, c), jnp.float32)
        return carry

    jax.lax.fori_loop(0, g.tiles, zero_carry, 0)
    _barrier(interpret)

    def one_loop(step, gnorm):
        t = g.num_steps - step

        def store(rows, cols, pre):  # Pass A: recompute pre(t) from the saved a(t-1), and its moments
            r.pre[rows, cols] = pre

        _pre_and_moments(lambda rows, cols: r.states[t - 1, rows, cols], store, r.d, r.w, r.stats, g, interpret)
        sums = _dz_pass(r, t, gnorm, g, dtype)
        if g.num_groups:
            r.stats[0, :] = sums[0]
            r.stats[1, :] = sums[1]
            gnorm = (sums[2], sums[3])
            _barrier(interpret)
            _group_means(r.stats, (0, 1), (4, 5), g, rsqrt=False)
            _barrier(interpret)
            _dpre_pass(r, t, g, dtype)
        _barrier(interpret)
        _da_pass(r, t, g, dtype)
        _barrier(interpret)
        return gnorm

    zero = jnp.zeros((c,), jnp.float32)
    gnorm = jax.lax.fori_loop(0, g.num_steps, one_loop, (zero, zero))
    r.gnorm[0, :] = gnorm[0]
    r.gnorm[1, :] = gnorm[1]

    def final_tile(i, carry):
        rows = pl.ds(i * p_tile, p_tile)
        r.ga0[rows, :] = r.gcarry[rows, :] + r.gout[0, rows, :].astype(jnp.float32)
        return carry

    jax.lax.fori_loop(0, g.tiles, final_tile, 0)
