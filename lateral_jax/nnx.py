"""The Flax NNX face of lateral_jax: every NNX layer and model in one namespace.

``from lateral_jax import nnx as lnnx``; ``lnnx.LCCNN(...)`` is the NNX twin of
:class:`lateral_jax.linen.LCCNN`: the same parameters give the same logits and gradients
(``tests/nnx_test.py``, ``tests/hgru_test.py``).  The Linen face is :mod:`lateral_jax.linen`
(which ``lateral_jax.LateralConv`` and the other top-level names are).
"""

from lateral_jax.core.nnx_hgru import HGRULayer, HGRUNet
from lateral_jax.core.nnx_models import (
    FCNN,
    LCCNN,
    LCEICNN,
    LateralCNN,
    LateralConv,
    LateralRecurrence,
    UnsharedCNN,
    load_params,
    params_dict,
)
from lateral_jax.core.nnx_resnet import LateralResNet

# The NNX model of each model kind with an NNX twin (the Linen registry: lateral_jax.core.models.MODELS).
MODELS = {"fcnn": FCNN, "lccnn": LCCNN, "lceicnn": LCEICNN, "unshared": UnsharedCNN, "lateral_resnet": LateralResNet}

__all__ = [
    "FCNN",
    "LCCNN",
    "LCEICNN",
    "MODELS",
    "HGRULayer",
    "HGRUNet",
    "LateralCNN",
    "LateralConv",
    "LateralRecurrence",
    "LateralResNet",
    "UnsharedCNN",
    "load_params",
    "params_dict",
]
