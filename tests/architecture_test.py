"""The package's shape: one-way dependencies between its parts (core, kernels, training, neuro), no
import cycle, no import deferred into a function to dodge one, and modules small enough to read."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lateral_jax"
MAX_MODULE_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> tuple[set[str], set[str]]:
    """``(top-level, inside functions)`` lateral_jax modules imported by the file at ``path``."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        names = [n for n in names if n.startswith("lateral_jax")]
        if names:
            (top if node.col_offset == 0 else nested).update(names)
    return top, nested


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    return {name: {n for n in imports(path)[0] if n in MODULES and n != name} for name, path in MODULES.items()}


def test_core_imports_neither_training_nor_neuro_and_neuro_only_the_data_of_training():
    for name, deps in graph().items():
        if name.startswith("lateral_jax.core"):
            assert not {d for d in deps if d.startswith(("lateral_jax.training", "lateral_jax.neuro"))}, name
        if name.startswith("lateral_jax.neuro"):
            training = {d for d in deps if d.startswith("lateral_jax.training")}
            assert all(d.startswith("lateral_jax.training.data") for d in training), (name, training)


def test_no_import_cycle():
    g = graph()
    done, active = set(), []

    def visit(node):
        if node in active:
            raise AssertionError("import cycle: " + " -> ".join([*active[active.index(node) :], node]))
        if node in done:
            return
        active.append(node)
        for dep in g.get(node, ()):
            if not dep.endswith("__init__") and dep != "lateral_jax":
                visit(dep)
        active.pop()
        done.add(node)

    for node in g:
        if node != "lateral_jax":
            visit(node)


def test_no_lateral_jax_import_is_deferred_into_a_function():
    deferred = {name: sorted(imports(path)[1]) for name, path in MODULES.items() if imports(path)[1]}
    assert deferred == {}


def test_modules_are_small_enough_to_read():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


def test_only_the_plan_asks_jax_for_the_backend_inside_the_core():
    """Run policy is resolved once (``lateral_jax.core.plan``): the maths never reads the backend,
    so the same pure function traces the same program wherever it is traced."""
    readers = sorted(
        name
        for name, path in MODULES.items()
        if name.startswith(("lateral_jax.core", "lateral_jax.kernels")) and "default_backend" in path.read_text()
    )
    assert readers == ["lateral_jax.core.plan"]


CONVOLUTION_KERNELS = tuple(f"lateral_jax.kernels.{m}" for m in ("batching", "winograd", "convolution"))
LOOP_KERNELS = ("lateral_jax.kernels.fused", "lateral_jax.kernels.fused_kernels")


def test_kernels_sit_beneath_the_maths_and_the_fused_loop_is_called_by_recurrence_alone():
    """The convolution kernels see only the core's types; the fused loop kernel implements the
    cell and is reached only through ``core.recurrence``; no kernel imports training or neuro."""
    g = graph()
    for name in CONVOLUTION_KERNELS:
        core = {d for d in g[name] if d.startswith("lateral_jax.core")}
        assert core <= {"lateral_jax.core.config"}, (name, core)
    for name, deps in g.items():
        if name.startswith("lateral_jax.kernels"):
            assert not {d for d in deps if d.startswith(("lateral_jax.training", "lateral_jax.neuro"))}, name
        users = {d for d in deps if d.startswith(LOOP_KERNELS)}
        if users and not name.startswith("lateral_jax.kernels"):
            assert name == "lateral_jax.core.recurrence", (name, users)
