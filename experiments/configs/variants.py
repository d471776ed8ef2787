"""Model variants by name: a base kind plus optional suffixes, so each variant is defined once.

  <kind>[_T<n>][_l<λ>][_param|_proj][_k<n>][_crbp]

``kind`` is a ``ModelConfig.kind`` (fcnn, fcnn_matched, lccnn, lceicnn, unshared, lateral_resnet);
``_T<n>`` sets T = n lateral loops; ``lceicnn`` is the mixed-sign E/I penalty with λ_EI = 1e-3,
``_l<λ>`` sets λ_EI, ``_param`` / ``_proj`` use the parametrised or projected E/I form instead (no
loss term), ``_k<n>`` makes the lateral kernels n × n (``{"lateral": {"lateral_size": n}}``, merged
into the config's ``LateralConfig``), ``_crbp`` trains in implicit mode with C-RBP's contraction
penalty (``{"loop": {"grad_mode": "implicit", "implicit_max_steps": 30}, "contractor_weight": 1.0}``;
the weight and the step bound are ours).
``hgru`` is the hGRU model (:class:`lateral_jax.core.hgru_models.HGRUNet`).  Examples: ``lccnn_T2``,
``lceicnn_T4_l1e-2``, ``lceicnn_param``, ``unshared_T4``, ``lccnn_T4_k7``, ``hgru_T8``, ``hgru_T8_crbp``.
"""

from __future__ import annotations

import re
from typing import Any

from lateral_jax.training.config import MODEL_KINDS

KINDS = MODEL_KINDS  # the registry (lateral_jax.training.config.MODEL_KIND_FAMILIES)
_ONE_SUFFIX = r"_(T\d+|l[0-9.]+(?:e-?\d+)?|param|proj|k\d+|crbp)"
# C-RBP's penalty weight in the ``_crbp`` variants (ours: the 2020 paper's code scales it per task)
CONTRACTOR_WEIGHT = 1.0
# ... and the solver's step bound: C-RBP runs a fixed, small number of forward and adjoint steps
# (an untrained hGRU is not yet contractive, and 100 steps per solve made training 10x slower)
CRBP_SOLVER_STEPS = 30
_LONGEST_FIRST = sorted(KINDS, key=len, reverse=True)  # "fcnn_matched" before "fcnn"
_NAME = re.compile(r"^(?P<kind>" + "|".join(_LONGEST_FIRST) + r")(?P<suffixes>(?:" + _ONE_SUFFIX + r")*)$")
_SUFFIX = re.compile(_ONE_SUFFIX)

# The paper's three models and the two controls (the main job trains the first three).
STANDARD = ("fcnn", "lccnn", "lceicnn", "lceicnn_param", "lceicnn_proj", "fcnn_matched", "unshared")


def overrides(name: str) -> dict[str, Any]:
    """The ``ModelConfig`` fields that variant ``name`` sets (raises ``ValueError`` for a bad name)."""
    match = _NAME.match(name)
    if match is None:
        raise ValueError(
            f"variant {name!r} is not a valid name: <kind>[_T<n>][_l<lambda>][_param|_proj][_k<n>][_crbp] with "
            f"kind one of {', '.join(KINDS)} (e.g. {', '.join(STANDARD)})."
        )
    out: dict[str, Any] = {"kind": match["kind"]}
    if match["kind"] == "lceicnn":
        out.update(ei_mode="mixed_sign", ei_weight=1e-3)
    for suffix in _SUFFIX.findall(match["suffixes"]):
        if suffix == "crbp":
            loop = {"grad_mode": "implicit", "implicit_max_steps": CRBP_SOLVER_STEPS}
            out.update(loop=loop, contractor_weight=CONTRACTOR_WEIGHT)
        elif suffix.startswith("T"):
            out["num_steps"] = int(suffix[1:])
        elif suffix.startswith("k"):
            out["lateral"] = {"lateral_size": int(suffix[1:])}
        elif suffix.startswith("l"):
            out["ei_weight"] = float(suffix[1:])
        else:
            out.update(ei_mode="parametrise" if suffix == "param" else "project", ei_weight=0.0)
    return out
