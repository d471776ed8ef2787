"""lateral_jax: visual-cortex-style lateral connections for CNNs, in pure JAX.

The core (:mod:`lateral_jax.recurrence`, :mod:`lateral_jax.ei`) is pure functions over pytrees;
:mod:`lateral_jax.layers` and :mod:`lateral_jax.models` are thin Flax Linen wrappers.
"""

from lateral_jax import ei, recurrence
from lateral_jax.ei import diagnostics as ei_diagnostics
from lateral_jax.ei import ei_penalty, mixed_sign_penalty, project_dale
from lateral_jax.layers import LateralConv, LateralRecurrence
from lateral_jax.models import FCNN, LCCNN, LCEICNN, LateralCNN, LateralResNet, ModelOutput, UnsharedCNN
from lateral_jax.recurrence import LateralConfig, LateralParams, Unrolled, init_params, recur, unroll

__version__ = "0.1.0"

__all__ = [
    "FCNN",
    "LCCNN",
    "LCEICNN",
    "LateralCNN",
    "LateralConfig",
    "LateralConv",
    "LateralParams",
    "LateralRecurrence",
    "LateralResNet",
    "ModelOutput",
    "UnsharedCNN",
    "Unrolled",
    "ei",
    "ei_diagnostics",
    "ei_penalty",
    "init_params",
    "mixed_sign_penalty",
    "project_dale",
    "recur",
    "recurrence",
    "unroll",
]
