"""The light install: ``pip install lateral_jax`` (jax, flax, optax, jaxtyping, numpy) is enough
for the layer API; the training system's packages come with the ``[train]`` extra."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Packages the base install does not have: importing the layer API must not reach them.
NOT_IN_BASE = ("ml_collections", "grain", "tqdm", "chex", "tensorflow_datasets", "scipy", "matplotlib", "tensorboardX")

LAYER_ONLY = """
import importlib.abc, sys
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not in the base install")
        return None

sys.meta_path.insert(0, Block())
import pkgutil, importlib
import jax, jax.numpy as jnp
import lateral_jax
from lateral_jax import core
for info in pkgutil.iter_modules(core.__path__):
    importlib.import_module(f"lateral_jax.core.{{info.name}}")
from lateral_jax.core import recurrence, hgru
config = lateral_jax.LateralConfig.stable()
params = recurrence.init_params(jax.random.key(0), in_channels=3, out_channels=8, config=config)
out = recurrence.unroll(params, jnp.ones((1, 8, 8, 3)), num_steps=2, config=config)
print(out.final.shape, sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
"""


def test_the_base_dependencies_are_the_layers_and_the_training_system_is_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("[")[0] for d in project["dependencies"]}
    assert base == {"jax", "flax", "optax", "jaxtyping", "numpy"}
    train = {d.split(">")[0] for d in project["optional-dependencies"]["train"]}
    assert {"orbax-checkpoint", "ml_collections", "grain", "tqdm"} <= train
    assert "train" in project["optional-dependencies"]["all"][0]


def test_the_layer_api_imports_nothing_outside_the_base_install():
    out = subprocess.run(
        [sys.executable, "-c", LAYER_ONLY.format(blocked=NOT_IN_BASE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "(1, 8, 8, 8) []"


def test_the_training_system_without_its_extra_names_the_extra():
    code = LAYER_ONLY.format(blocked=("grain",)).split("import pkgutil")[0] + "import lateral_jax.training\n"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert "lateral_jax.training needs the 'train' extra (grain not installed): pip install 'lateral_jax[train]'" in (
        out.stderr
    )
