"""Sphinx configuration of the documentation site.

Build it (offline: nothing is fetched) with warnings as errors, as CI does::

  pip install -e '.[docs]'
  python -m sphinx -W --keep-going -b html docs docs/_build/html

The pages are MyST Markdown. ``quickstart.md`` is a MyST notebook whose cells myst-nb executes
at every build (they are small: a few seconds on a CPU); the other pages' ```` ```python ````
and ```` ```bash ```` blocks are run by the tests instead (tests/readme.py). The regions between
``<!-- generated from ... -->`` and ``<!-- end generated -->`` are written by
``python -m benchmarks.readme`` from the committed result files.
"""

import importlib.util
import os

import adafactor_jax

# With libtpu installed (the [tpu] extra), jax probes for a TPU when the executed pages first use
# it, and logs warnings into the build's output; the examples run on the CPU.
if importlib.util.find_spec("libtpu") is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "adafactor_jax"
author = "adafactor_jax authors"
copyright = "the adafactor_jax authors, Apache-2.0"
release = version = adafactor_jax.__version__

extensions = [
  "myst_nb",  # MyST Markdown pages, and executed notebooks
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",  # the docstrings' Google style (Args:, Returns:)
]

# The generated result tables (docs/results/*.md) are sources of the pages' generated regions,
# not pages of their own.
exclude_patterns = ["_build", "results"]

# Links to headings: [text](page.md#a-heading), as on GitHub.
myst_heading_anchors = 3

# Executed examples: run at every build, in a fresh kernel, with no cache; an error fails it.
nb_execution_mode = "force"
nb_execution_timeout = 120
nb_execution_raise_on_error = True
nb_execution_show_tb = True

autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"adafactor_jax {release}"
html_static_path: list[str] = []
