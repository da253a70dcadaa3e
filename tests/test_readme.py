"""The README's quick start trains as written, and its result tables are the result files'."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks import readme
from tests.readme import code_blocks


def test_the_quick_start_trains_as_written():
  """Its step on a linear regression it can fit: the loss falls 25-fold in 200 steps (measured
  2.00 -> 0.080; from zeros, where the relative step's floor of 1e-3 rules, 0.99 -> 0.86)."""
  quick_start = code_blocks("python")[0]
  namespace: dict = {}
  exec(compile(quick_start, "README.md", "exec"), namespace)
  params, opt_state, step = namespace["params"], namespace["opt_state"], namespace["step"]
  x = jax.random.normal(jax.random.key(1), (1024, 512))
  y = x @ (jax.random.normal(jax.random.key(2), (512, 256)) / 512**0.5)
  losses = []
  for _ in range(200):
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
  assert jnp.all(jnp.isfinite(params["w"]))


def test_the_readmes_result_tables_are_those_of_the_committed_result_files():
  """`python -m benchmarks.readme` writes them; a hand edit or a rerun not written back fails."""
  text = readme.README.read_text()
  sources = [m["source"] for m in readme.REGION.finditer(text)]
  assert "benchmarks/results/results.json" in sources
  expected = {
    "docs/results/fair_default.md",
    "docs/results/fair_4x.md",
    "docs/results/compare_paper.md",
  }
  assert expected | {"docs/results/compare_switch.md"} <= set(sources)
  _, stale = readme.regenerate(text)
  assert stale == [], f"run python -m benchmarks.readme: {stale}"
