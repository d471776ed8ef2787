"""Sphinx configuration: Markdown pages (MyST) and an API reference generated from the docstrings.

Build (as CI does, warnings are errors):  python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import lateral_jax

project = "lateral_jax"
author = "The lateral_jax authors"
copyright = "The lateral_jax authors"  # noqa: A001
release = lateral_jax.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

autodoc_default_options = {"member-order": "bysource", "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_mock_imports = ["tensorflow_datasets", "PIL", "scipy", "matplotlib", "tensorboardX"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]
html_theme = "alabaster"
html_static_path = []
