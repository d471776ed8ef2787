"""Winograd F(2×2, 3×3) convolution: a cheaper 3×3 SAME convolution for CPUs.

A stride-1 SAME 3×3 convolution ``y = w * x`` (NHWC × HWIO) computes every 2×2 output tile ``Y``
from the 4×4 input tile ``D`` around it.  Winograd's minimal filtering algorithm (Lavin & Gray
2016) writes that as::

    Y = Aᵀ [ Σ_c (G g_{c,o} Gᵀ) ⊙ (Bᵀ d_c B) ] A

    Bᵀ = [[1, 0, -1, 0],   G = [[1,    0,   0  ],   Aᵀ = [[1, 1,  1,  0],
          [0, 1,  1, 0],        [1/2,  1/2, 1/2],         [0, 1, -1, -1]]
          [0, -1, 1, 0],        [1/2, -1/2, 1/2],
          [0, 1,  0, -1]]       [0,    0,   1  ]]

so the channel contraction becomes 16 independent matmuls ``M_ξν = V_ξν U_ξν`` of shape
``[tiles, C_in] × [C_in, C_out]``: 16 multiply-adds per 4 outputs instead of 36, 2.25× fewer
FLOPs than the direct convolution.  The transforms are additions (and halvings of the kernel),
so in float32 the result matches the direct convolution to a few ulps of the output scale
(tested: ``max |Δ| / max |y| < 1e-5``).

Why it exists: XLA:CPU's direct 3×3 convolution runs well below its matmul peak, so on a CPU a
cheaper algorithm is the way to a faster convolution (docs/performance.md).  Two implementation
choices keep it fast where large elementwise passes are memory-bound:

* the batch is processed in chunks (an unrolled ``lax.scan``) so that the transformed tiles of one
  chunk (:data:`CHUNK_ELEMENTS`) stay in cache; the scan is unrolled because a rolled scan
  zero-fills its stacked output before the chunks overwrite it;
* the derivative is a ``jax.custom_jvp`` (the product rule of the bilinear map, each term a
  Winograd convolution); reverse mode is its transpose, with the kernel term rematerialised per
  chunk so that ``∂w = Gᵀ (Σ_tiles Vᵀ · A ∂Y Aᵀ) G`` is accumulated chunk by chunk without keeping
  the transformed input tiles from the forward pass.

``conv3x3(..., tile=4)`` is F(4×4, 3×3) (Lavin's 6×6 transforms): 36 multiply-adds per 16 outputs
(4× fewer than direct) with about 10× the float32 rounding error (still ≤ 1e-4 of the output
scale); :func:`lateral_jax.kernels.convolution.winograd_tile` chooses the tile.

Every mode of differentiation works: ``jax.jvp``, ``jax.linearize``, ``jax.grad``,
``jax.jacfwd`` and Hessian-vector products in both orders.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

from lateral_jax.kernels.batching import largest_divisor, merge_batch, split_batch


class _Transforms(NamedTuple):
    """The matrices of F(m×m, 3×3): input Bᵀ (α×α), kernel G (α×3), output Aᵀ (m×α), α = m + 2."""

    b_t: tuple
    g: np.ndarray
    a_t: tuple


TRANSFORMS = {
    2: _Transforms(
        b_t=((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
        g=np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        a_t=((1, 1, 1, 0), (0, 1, -1, -1)),
    ),
    4: _Transforms(
        b_t=(
            (4, 0, -5, 0, 1, 0),
            (0, -4, -4, 1, 1, 0),
            (0, 4, -4, -1, 1, 0),
            (0, -2, -1, 2, 1, 0),
            (0, 2, -1, -2, 1, 0),
            (0, 4, 0, -5, 0, 1),
        ),
        g=np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ]
        ),
        a_t=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
    ),
}
TILES = tuple(TRANSFORMS)

# Elements of the transformed tiles of one batch chunk (16 × tiles × channels): 2²¹ float32
# values = 8 MiB, which keeps a chunk's V and M within the last-level cache of a typical CPU.
CHUNK_ELEMENTS = 1 << 21


def _combine(matrix, parts: list[jax.Array]) -> list[jax.Array]:
    """``[Σ_k matrix[i][k] · parts[k] for each row i]`` with the 0/±1 coefficients folded away."""
    out = []
    for row in matrix:
        acc = None
        for coeff, part in zip(row, parts, strict=True):
            if coeff == 0:
                continue
            term = part if coeff == 1 else -part if coeff == -1 else coeff * part
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def _taps(z: jax.Array, axis: int, tiles: int, m: int) -> list[jax.Array]:
    """Row (or column) k of every input tile, ``z[k + m·p]`` for p < tiles, k = 0..m+1."""
    return [jax.lax.slice_in_dim(z, k, k + m * (tiles - 1) + 1, stride=m, axis=axis) for k in range(m + 2)]


def transform_input(x: Float[Array, "b h w c"], m: int = 2) -> Float[Array, "a p c"]:
    """``V = Bᵀ D B`` for every (m+2)² tile of the SAME-padded input (``m`` divides H and W).

    Returns ``[(m+2)², p, c]`` with p = b·h·w/m² tiles.
    """
    b, h, w, c = x.shape
    th, tw, b_t = h // m, w // m, TRANSFORMS[m].b_t
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = _combine(b_t, _taps(padded, 1, th, m))
    tiles = [jnp.stack(_combine(b_t, _taps(r, 2, tw, m))) for r in rows]
    return jnp.stack(tiles).reshape((m + 2) ** 2, b * th * tw, c)


def transform_output(mm: Float[Array, "a p co"], batch: int, height: int, width: int, m: int = 2) -> jax.Array:
    """``Y = Aᵀ M A`` for every tile, reassembled into the ``[batch, height, width, co]`` map."""
    th, tw, co, a_t, n = height // m, width // m, mm.shape[-1], TRANSFORMS[m].a_t, m + 2
    z = mm.reshape(n, n, batch, th, tw, co)
    rows = _combine(a_t, [z[i] for i in range(n)])
    y = jnp.stack([jnp.stack(_combine(a_t, [r[j] for j in range(n)])) for r in rows])
    return y.transpose(2, 3, 0, 4, 1, 5).reshape(batch, height, width, co)


def transform_output_transpose(dy: Float[Array, "b h w co"], m: int = 2) -> Float[Array, "a p co"]:
    """The adjoint of :func:`transform_output`: ``∂M = A ∂Y Aᵀ`` for every m×m output tile."""
    b, h, w, co = dy.shape
    th, tw = h // m, w // m
    a = tuple(zip(*TRANSFORMS[m].a_t, strict=True))
    z = dy.reshape(b, th, m, tw, m, co).transpose(2, 4, 0, 1, 3, 5)
    rows = _combine(a, [z[i] for i in range(m)])
    tiles = [jnp.stack(_combine(a, [r[j] for j in range(m)])) for r in rows]
    return jnp.stack(tiles).reshape((m + 2) ** 2, b * th * tw, co)


def transform_kernel(w: Float[Array, "3 3 ci co"], m: int = 2) -> Float[Array, "a ci co"]:
    """``U = G g Gᵀ`` per (input, output) channel pair."""
    g = jnp.asarray(TRANSFORMS[m].g, w.dtype)
    return jnp.einsum("ai,ijcd,bj->abcd", g, w, g).reshape((m + 2) ** 2, *w.shape[2:])


def transform_kernel_transpose(du: Float[Array, "a ci co"], m: int = 2) -> Float[Array, "3 3 ci co"]:
    """The adjoint of :func:`transform_kernel`: ``∂g = Gᵀ ∂U G``."""
    g = jnp.asarray(TRANSFORMS[m].g, du.dtype)
    return jnp.einsum("ai,abcd,bj->ijcd", g, du.reshape(m + 2, m + 2, *du.shape[1:]), g)


def _batched_matmul(v: jax.Array, u: jax.Array) -> jax.Array:
    """``M_t = V_t U_t`` for each tile component t."""
    return jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))


def chunk_size(batch: int, height: int, width: int, channels: int, elements: int | None = None) -> int:
    """The largest divisor of ``batch`` whose transformed tiles (≈ 4·h·w·c values per image) fit
    ``elements`` (default :data:`CHUNK_ELEMENTS`, read at call time)."""
    elements = CHUNK_ELEMENTS if elements is None else elements
    return largest_divisor(batch, elements // max(1, 4 * height * width * channels))


def _chunked(x: jax.Array, size: int) -> jax.Array:
    return split_batch(x, x.shape[0] // size)


def _conv_chunk(xc: jax.Array, u: jax.Array, m: int) -> jax.Array:
    """One chunk's convolution with the transformed kernel ``u``: ``Aᵀ [ (Bᵀ D B) U ] A``."""
    b, h, w, _ = xc.shape
    return transform_output(_batched_matmul(transform_input(xc, m), u), b, h, w, m)


def _forward(x: jax.Array, u: jax.Array, m: int) -> jax.Array:
    b, h, w, c = x.shape
    size = chunk_size(b, h, w, max(c, u.shape[-1]))

    def body(_, xc):
        return None, _conv_chunk(xc, u, m)

    # Unrolled: a rolled scan zero-fills its stacked output before the chunks overwrite it (one
    # more pass over memory per convolution); unrolled, XLA writes the chunks in place.
    _, y = jax.lax.scan(body, None, _chunked(x, size), unroll=True)
    return merge_batch(y)


def _input_adjoint(w: jax.Array, dy: jax.Array, m: int) -> jax.Array:
    """``∂x = flip(w)ᵀ * ∂y``: the adjoint of ``x ↦ w * x`` is a Winograd convolution itself."""
    return _forward(dy, transform_kernel(jnp.flip(w, (0, 1)).swapaxes(2, 3), m), m)


def _kernel_adjoint(x: jax.Array, dy: jax.Array, m: int) -> jax.Array:
    """``∂w = Gᵀ (Σ_tiles Vᵀ · A ∂y Aᵀ) G``: the adjoint of ``w ↦ w * x``, accumulated per chunk.

    A loop of its own so that its matmuls do not share the cache with those of the ``∂x`` chunks.
    Each chunk's product is a ``jax.checkpoint``: when JAX transposes this function (forward mode,
    then reverse mode again) it would otherwise compute ``V`` for every chunk in a loop of its own
    and keep all of them, the whole batch's transformed tiles; rematerialised, each chunk
    recomputes its ``V`` from its slice of ``x``.
    """
    b, h, wd, c = x.shape
    co = dy.shape[-1]

    @jax.checkpoint
    def chunk_product(xc, dyc):
        v, dm = transform_input(xc, m), transform_output_transpose(dyc, m)
        return jax.lax.dot_general(v, dm, (((1,), (1,)), ((0,), (0,))))

    def body(du, chunk):
        return du + chunk_product(*chunk), None

    size = chunk_size(b, h, wd, max(c, co))
    du0 = jnp.zeros(((m + 2) ** 2, c, co), dy.dtype)
    du, _ = jax.lax.scan(body, du0, (_chunked(x, size), _chunked(dy, size)))
    return transform_kernel_transpose(du, m)


def _adjoint_of(adjoint, out_like: jax.Array, value: jax.Array) -> jax.Array:
    """``L v`` for the linear map ``L`` whose adjoint ``Lᵀ`` is ``adjoint`` (``out_like``: L's output).

    Writing a tangent as the transpose of the hand-written adjoint makes reverse mode (which
    transposes tangents again) run the hand-written adjoint, as fast as a ``custom_vjp``.
    """
    (out,) = jax.linear_transpose(adjoint, jax.ShapeDtypeStruct(out_like.shape, out_like.dtype))(value)
    return out


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _conv_tiled(x: jax.Array, w: jax.Array, m: int) -> jax.Array:
    return _forward(x, transform_kernel(w, m), m)


def _conv_tiled_jvp(m, primals, tangents):
    """The product rule of a bilinear map, ``∂(w * x) = w * ∂x + ∂w * x``.

    Each term is written as the transpose of its hand-written adjoint (:func:`_adjoint_of`), so
    the tangents are linear, transposable JAX code: forward mode (``jax.jvp``, ``jax.linearize``,
    ``jax.jacfwd``) runs the transposed adjoints, reverse mode runs the adjoints themselves
    (:func:`_input_adjoint`, :func:`_kernel_adjoint`), and every higher-order combination follows.
    Zero tangents are skipped (``symbolic_zeros``): a frozen kernel or input costs nothing.
    """
    x, w = primals
    dx, dw = tangents
    y = _conv_tiled(x, w, m)
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(_adjoint_of(lambda dy: _input_adjoint(w, dy, m), y, dx))
    if not isinstance(dw, SymbolicZero):
        # Rematerialised: V(x) is recomputed chunk by chunk in the backward pass, not kept from the
        # forward pass (4× to 9× the size of x).
        kernel_term = jax.checkpoint(lambda x, dw: _adjoint_of(lambda dy: _kernel_adjoint(x, dy, m), y, dw))
        terms.append(kernel_term(x, dw))
    if not terms:
        return y, SymbolicZero(jax.core.get_aval(y).to_tangent_aval())
    return y, functools.reduce(jnp.add, terms)


_conv_tiled.defjvp(_conv_tiled_jvp, symbolic_zeros=True)


def conv3x3(x: Float[Array, "b h w ci"], w: Float[Array, "3 3 ci co"], *, tile: int = 2) -> Float[Array, "b h w co"]:
    """Stride-1 SAME 3×3 convolution (NHWC × HWIO → NHWC) by Winograd F(tile×tile, 3×3).

    Equal to ``lax.conv_general_dilated(x, w, (1, 1), "SAME", ("NHWC", "HWIO", "NHWC"))`` up to
    float rounding; differentiable in forward and reverse mode (custom JVP), jit/vmap-compatible.  Heights
    and widths that ``tile`` does not divide are zero-padded and cropped back.  ``tile=2`` costs
    16 multiply-adds per 4 outputs (2.25× fewer than direct); ``tile=4`` 36 per 16 (4× fewer) with
    larger transform constants, so about 10× the rounding error of ``tile=2`` in float32.
    """
    if tile not in TRANSFORMS:
        raise ValueError(f"tile={tile!r} is not supported; choose one of {TILES}.")
    if x.ndim != 4 or w.ndim != 4 or w.shape[:2] != (3, 3) or w.shape[2] != x.shape[-1]:
        raise ValueError(
            f"conv3x3 needs an NHWC input and a [3, 3, C_in, C_out] kernel with C_in = the input's last axis; "
            f"got x {tuple(x.shape)} and w {tuple(w.shape)}. Use conv_algorithm='xla' for other kernels."
        )
    b, h, wd, _ = x.shape
    pad_h, pad_w = -h % tile, -wd % tile
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    y = _conv_tiled(x, w.astype(x.dtype), tile)
    return y[:, :h, :wd] if (pad_h or pad_w) else y
