"""Convolution dispatch: which algorithm computes a stride-1 SAME convolution of the layer.

``conv_algorithm="xla"`` is the reference, ``lax.conv_general_dilated``.  ``"winograd"`` is
:func:`lateral_jax.kernels.winograd.conv3x3` (full-mixing 3×3 kernels only; reverse-mode
differentiation only).  ``"auto"`` takes Winograd where it is faster and XLA everywhere else:

* on CPU (the backend's plan, :func:`lateral_jax.core.plan.resolve`, makes ``"auto"`` ``"xla"``
  elsewhere before the layer runs; this module never asks for the backend), in float32/float64,
  for full-mixing 3×3 kernels;
* with at least :data:`WINOGRAD_MIN_CHANNELS` input channels (thinner matmuls do not pay);
* when ``batch·H·W·C_in·C_out ≥`` :data:`WINOGRAD_MIN_SIZE` (smaller convolutions do not repay the
  extra compile time of the chunked, hand-differentiated Winograd path).

The thresholds and the tile rule of :func:`winograd_tile` come from the measurements in
docs/performance.md.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lateral_jax.core.config import ConvAlgorithm
from lateral_jax.kernels import winograd

WINOGRAD_MIN_CHANNELS = 16
WINOGRAD_MIN_SIZE = 1 << 27
# F(4×4, 3×3) on maps at least this large in both dimensions ...
WINOGRAD_TILE4_MIN_SIZE = 32
# ... and on any map (with sides divisible by 4) between layers of at least this many channels.
WINOGRAD_TILE4_MIN_CHANNELS = 256


def winograd_tile(height: int, width: int, in_channels: int = 0, out_channels: int = 0) -> int:
    """The F(m×m, 3×3) output tile ``m`` (2 or 4) used for a ``height × width`` map from
    ``in_channels`` to ``out_channels`` channels: 4 when both sides are divisible by 4 and either
    the map is at least :data:`WINOGRAD_TILE4_MIN_SIZE` or both channel counts are at least
    :data:`WINOGRAD_TILE4_MIN_CHANNELS`; else 2."""
    if height % 4 or width % 4:
        return 2
    wide = min(in_channels, out_channels) >= WINOGRAD_TILE4_MIN_CHANNELS
    return 4 if wide or min(height, width) >= WINOGRAD_TILE4_MIN_SIZE else 2


def winograd_eligible(x: jax.Array, w: jax.Array, *, depthwise: bool = False) -> bool:
    """Whether ``"auto"`` may take Winograd for this input and kernel at all: full-mixing 3×3, float32/64."""
    return w.shape[:2] == (3, 3) and not depthwise and x.dtype in (jnp.float32, jnp.float64)


def use_winograd(x: jax.Array, w: jax.Array, algorithm: ConvAlgorithm, *, depthwise: bool = False) -> bool:
    """Whether :func:`conv` takes the Winograd path for this input, kernel and ``conv_algorithm``."""
    eligible = w.shape[:2] == (3, 3) and not depthwise
    if algorithm == "winograd":
        if not eligible:
            raise ValueError(
                f"conv_algorithm='winograd' needs full-mixing 3x3 kernels; got a {w.shape[0]}x{w.shape[1]} "
                f"{'depthwise ' if depthwise else ''}kernel. Use conv_algorithm='auto' or 'xla'."
            )
        return True
    return (  # "auto" reaches here only on CPU: lateral_jax.core.plan turns it into "xla" elsewhere
        algorithm == "auto"
        and winograd_eligible(x, w, depthwise=depthwise)
        and x.shape[-1] >= WINOGRAD_MIN_CHANNELS
        and math.prod(x.shape) * w.shape[-1] >= WINOGRAD_MIN_SIZE
    )


def conv(
    x: Float[Array, "b h w ci"],
    w: Float[Array, "k k cin co"],
    *,
    depthwise: bool = False,
    algorithm: ConvAlgorithm = "xla",
) -> Float[Array, "b h w co"]:
    """Stride-1 SAME convolution, NHWC × HWIO → NHWC (depthwise when ``w`` is ``[k, k, 1, C]``)."""
    if use_winograd(x, w, algorithm, depthwise=depthwise):
        return winograd.conv3x3(x, w, tile=winograd_tile(*x.shape[1:], w.shape[-1]))
    return jax.lax.conv_general_dilated(
        x,
        w.astype(x.dtype),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1] if depthwise else 1,
    )
