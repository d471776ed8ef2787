"""The training system: data, jitted data-parallel steps, the resumable loop, checkpoints and
runs.  Builds on :mod:`lateral_jax.core`."""

import importlib.util as _util


def _absent(name: str) -> bool:
    try:
        return _util.find_spec(name) is None
    except ImportError:
        return True


_MISSING = [name for name in ("orbax", "ml_collections", "grain", "tqdm") if _absent(name)]
if _MISSING:
    raise ImportError(
        f"lateral_jax.training needs the 'train' extra ({', '.join(_MISSING)} not installed): "
        "pip install 'lateral_jax[train]' (the layer API, lateral_jax.core, needs only the base install)."
    )
