"""The library stands alone: it needs jax, optax and numpy, and never imports the training side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "adafactor_jax").glob("*.py"))
ALLOWED = {"jax", "jaxlib", "optax", "numpy", "adafactor_jax"}
TRAINING_ONLY = ("flax", "orbax", "ml_collections", "matplotlib", "tqdm")  # absl: optax needs it


def _imports(path: Path) -> set[str]:
  """Every module a file imports, by its full dotted name."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def test_the_library_imports_jax_optax_numpy_and_the_standard_library_only():
  assert len(LIBRARY) > 10
  for path in LIBRARY:
    for name in _imports(path):
      top = name.split(".")[0]
      assert top in ALLOWED or top in sys.stdlib_module_names, (path.name, name)
      assert not name.startswith("adafactor_jax.training"), (path.name, name)


@pytest.mark.parametrize("folder", ["tests", "benchmarks"], ids=["library tests", "benchmarks"])
def test_library_tests_and_benchmarks_never_import_the_training_side(folder):
  files = sorted((ROOT / folder).glob("*.py"))  # not tests/training/
  assert files
  for path in files:
    assert not any(n.startswith("adafactor_jax.training") for n in _imports(path)), path.name


def test_the_library_imports_and_runs_without_the_train_extra():
  """The [train] extra's packages made unimportable: the optimizer still builds and steps."""
  code = (
    "import sys\n"
    f"for name in {TRAINING_ONLY!r}: sys.modules[name] = None\n"
    "import jax.numpy as jnp, optax, adafactor_jax\n"
    "tx = adafactor_jax.adafactor()\n"
    "params = {'w': jnp.ones((256, 128))}\n"
    "updates, _ = tx.update(params, tx.init(params), params)\n"
    "assert float(jnp.abs(updates['w']).max()) > 0\n"
    "loaded = sorted(m for m in sys.modules if m.startswith('adafactor_jax.training'))\n"
    "assert not loaded, loaded\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
  )
  assert result.returncode == 0, result.stderr[-3000:]
