"""The field's benchmark: Pathfinder by the published procedure (lateral_jax.training.data.pathfinder)
at 32 × 32 (the Long Range Arena size), one contour length per config variant (6, 9 or 14).

Command:  python -m experiments.main --config experiments/configs/pathfinder_published.py:14 \\
            --workdir runs/pathfinder14 --only fcnn,fcnn_matched,lccnn_T4,lccnn_T8,lceicnn_T4,hgru_T8,hgru_T8_crbp
Smoke:    --config experiments/configs/pathfinder_published.py:smoke

Models as the embedded tasks' (widths 8/16/16, GroupNorm) plus the hGRU (``hgru``: a 5 × 5 stem to
``widths[0] = 8`` channels, 5 × 5 horizontal kernels, T = 8 loops, global max pool).  The examples
are generated once, in parallel, and cached (``$LATERAL_JAX_DATA``); the same data for every seed.
"""

from experiments.configs import base

LENGTHS = ("6", "9", "14")
# The benchmark's hGRU settings (also the study's, experiments/study.py): 5 x 5 horizontal kernels, a
# bounded state (tanh), so the implicit (C-RBP) solve cannot run away.
HGRU = {"kernel_size": 5, "num_groups": 4, "activation": "tanh"}


def get_config(variant: str = "14"):
    base.check_variant(variant, ("", "smoke", *LENGTHS))
    c = base.synthetic_config("pathfinder_published", "smoke" if variant == "smoke" else "")
    length = 6 if variant in ("", "smoke") else int(variant)
    c.data.task = {"contour_length": length, "image_size": 32}
    c.model.hgru.update(HGRU)
    if variant != "smoke":
        c.data.num_train = 8192
        c.data.num_validation = 1024
        c.num_epochs = 8.0
    return c
