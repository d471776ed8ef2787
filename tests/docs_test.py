"""Every Python block of README.md and docs/*.md runs exactly as written, and what it prints is
what its comments say; the docs do not cite documents that are not in the repository."""

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks():
    for path in DOCS:
        for i, match in enumerate(BLOCK.finditer(path.read_text())):
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}#{i}")


def expected_prints(code: str) -> list[str]:
    """The ``# ...`` comment after each ``print(...)`` line that has one."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", code, re.M)]


@pytest.mark.parametrize("code", list(python_blocks()))
def test_python_block_runs_as_written(code):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})
    printed = out.getvalue().splitlines()
    for expected in expected_prints(code):
        assert expected in printed, f"printed {printed}, the comment says {expected!r}"


def test_docs_cite_only_what_is_in_the_repository():
    """No reference to a design document outside the repository, and every linked file exists."""
    for path in DOCS:
        text = path.read_text()
        assert "DESIGN §" not in text, path
        for target in re.findall(r"\]\(([^)#]+)\)", text):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.name} links {target}, which does not exist"


def test_tutorial_runs_in_short_mode():
    """docs/tutorial.py (jupytext) runs top to bottom with 3 training steps and prints its results."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LATERAL_JAX_TUTORIAL_STEPS": "3"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "tutorial.py")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "T = 0: final training loss" in done.stdout and "T = 4: final training loss" in done.stdout
    assert "spectral radius of the loop Jacobian" in done.stdout and "relative change per loop" in done.stdout
