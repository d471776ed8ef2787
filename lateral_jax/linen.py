"""The Flax Linen face of lateral_jax: every Linen layer and model in one namespace.

``from lateral_jax import linen as llinen``; the top-level ``lateral_jax.LateralConv``, ``LCCNN``,
... are these classes.  Their NNX twins, with the same names, are in :mod:`lateral_jax.nnx`.
"""

from lateral_jax.core.hgru_models import HGRULayer, HGRUNet
from lateral_jax.core.layers import LateralConv, LateralRecurrence
from lateral_jax.core.models import FCNN, LCCNN, LCEICNN, LateralCNN, LateralResNet, ModelOutput, UnsharedCNN

__all__ = [
    "FCNN",
    "LCCNN",
    "LCEICNN",
    "HGRULayer",
    "HGRUNet",
    "LateralCNN",
    "LateralConv",
    "LateralRecurrence",
    "LateralResNet",
    "ModelOutput",
    "UnsharedCNN",
]
