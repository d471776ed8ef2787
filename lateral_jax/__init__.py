"""lateral_jax: visual-cortex-style lateral connections for CNNs, in pure JAX.

Three parts, with dependencies flowing one way (training and neuro use core, never the reverse):

* :mod:`lateral_jax.core` — the pure layer (:mod:`~lateral_jax.core.recurrence`), E/I separation
  (:mod:`~lateral_jax.core.ei`), Flax Linen layers and models, fast convolution and loop kernels;
* :mod:`lateral_jax.training` — data, jitted data-parallel steps, checkpoints, resumable runs;
* :mod:`lateral_jax.neuro` — stimuli, probes and the neurophysiology statistics.

The names below are the public API (the Flax classes among them are the Linen ones); the two Flax
faces are :mod:`lateral_jax.linen` and :mod:`lateral_jax.nnx` (the same layer and model names in
each), and ``from lateral_jax import recurrence, ei, layers, models`` also works.
"""

from lateral_jax.core import ei, layers, models, recurrence
from lateral_jax.core.cell import Unrolled
from lateral_jax.core.config import LateralConfig, LoopOptions
from lateral_jax.core.ei import diagnostics as ei_diagnostics
from lateral_jax.core.ei import ei_penalty, mixed_sign_penalty, project_dale
from lateral_jax.core.layers import LateralConv, LateralRecurrence
from lateral_jax.core.models import FCNN, LCCNN, LCEICNN, LateralCNN, LateralResNet, ModelOutput, UnsharedCNN
from lateral_jax.core.params import LateralParams, init_params
from lateral_jax.core.recurrence import recur, step, unroll, unroll_unshared

__version__ = "0.2.0"

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
    "LoopOptions",
    "ModelOutput",
    "UnsharedCNN",
    "Unrolled",
    "ei",
    "ei_diagnostics",
    "ei_penalty",
    "init_params",
    "layers",
    "mixed_sign_penalty",
    "models",
    "project_dale",
    "recur",
    "recurrence",
    "step",
    "unroll",
    "unroll_unshared",
]
