"""The README's quick start runs and prints as written; it stays short and names nothing that does
not exist; and the result tables of the README and the documentation are the result files'."""

from __future__ import annotations

import contextlib
import io
import re

import jax.numpy as jnp

from benchmarks import readme
from tests import readme as pages


def test_the_quick_start_trains_and_prints_as_written():
  """A linear regression it can fit: the loss falls 25-fold in 200 steps (measured 2.00 ->
  0.080; from zeros, where the relative step's floor of 1e-3 rules, 0.99 -> 0.86), and the
  line it prints is the one the README quotes."""
  quick_start = pages.code_blocks("python")[0]
  namespace: dict = {}
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(quick_start, "README.md", "exec"), namespace)
  losses = namespace["losses"]
  assert len(losses) == 200 and losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
  assert jnp.all(jnp.isfinite(namespace["params"]["w"]))
  printed = out.getvalue().strip()
  assert printed == f"loss {losses[0]:.2f} -> {losses[-1]:.3f} in 200 steps", printed
  # The README quotes the line; another machine's float32 rounding may move the last digit.
  pattern = r"`loss ([\d.]+) -> ([\d.]+) in 200 steps`"
  ((first, last),) = re.findall(pattern, pages.README.read_text())
  assert abs(float(first) - losses[0]) < 0.01 and abs(float(last) - losses[-1]) < 0.002


def test_the_readme_fits_on_a_screen_or_two_and_begins_with_the_fresh_machine_commands():
  text = pages.README.read_text()
  assert len(text.splitlines()) <= 300
  first, second = pages.code_blocks("bash")[:2]
  assert first.endswith("pip install -e '.[train]' && adafactor-train\n"), first
  # The test command is exactly what CI runs (.ci/run).
  assert second.endswith("pip install -e '.[test,tpu]' && python -m pytest -q\n"), second
  ci = (pages.ROOT / ".ci" / "run").read_text()
  assert "pip install -q -e '.[test,tpu]'" in ci and "\npython -m pytest -q\n" in ci


def test_no_page_names_a_package_index_entry_or_a_repository_that_does_not_exist():
  """The project is installed from a checkout or a wheel built in one."""
  for page in pages.pages():
    text = page.read_text()
    assert "git+https" not in text, page
    assert not re.search(r"pip install[^\n`]*['\"]?adafactor-jax", text), page


def test_the_result_tables_are_those_of_the_committed_result_files():
  """`python -m benchmarks.readme` writes them; a hand edit or a rerun not written back fails."""
  by_page = readme.sources()
  everywhere = [source for sources in by_page.values() for source in sources]
  assert {"docs/results/fair_default.md", "docs/results/fair_default_3000.md"} <= set(
    by_page["README.md"]
  )
  assert {
    "benchmarks/results/results.json",
    "benchmarks/results/memory.json",
    "docs/results/fair_default.md",
    "docs/results/fair_default_3000.md",
    "docs/results/fair_4x.md",
    "docs/results/compare_paper.md",
    "docs/results/compare_switch.md",
    "docs/results/int8_momentum.md",
    "benchmarks/results/tpu.json",
    "docs/results/pods.md",
    "docs/results/pods_summary.md",
  } <= set(everywhere)
  for source in everywhere:
    assert (readme.ROOT / source).exists() or source in readme.PENDING, source
  for page in readme.pages():
    _, stale = readme.regenerate(page.read_text())
    assert stale == [], f"{page.name}: run python -m benchmarks.readme: {stale}"


def test_every_documentation_page_is_in_the_table_of_contents():
  """The tests that run the pages' blocks read the pages the index lists, in its order."""
  listed = set(pages.pages())
  for page in sorted(pages.DOCS.glob("*.md")):
    assert page in listed, f"{page.name} is not in docs/index.md's toctree"


def test_the_documentations_executed_quick_start_begins_with_the_readmes():
  """docs/quickstart.md's cells run at every build of the site; its first is the README's."""
  cells = re.findall(
    r"^```\{code-cell\} ipython3\n(.*?)^```$",
    (pages.DOCS / "quickstart.md").read_text(),
    re.MULTILINE | re.DOTALL,
  )
  assert cells[0] == pages.code_blocks("python")[0]
