"""Writes the result tables of the README and the documentation from the committed result files,
so they cannot go stale.

Usage::

  python -m benchmarks.readme          # rewrites the generated regions of every page
  python -m benchmarks.readme --check  # changes nothing; exits 1, naming each stale region

The pages are ``README.md`` and ``docs/*.md`` (``PAGES``). A region is the text between
``<!-- generated from SOURCE -->`` and ``<!-- end generated -->``; SOURCE is a result file,
relative to the repository:

- a ``.md`` table, inserted as it is (``adafactor-compare`` writes them next to its JSON);
- a JSON file that ``RENDERERS`` names, rendered by its function:
  ``benchmarks/results/results.json`` (``python -m benchmarks.run``), the speed and memory
  table; ``benchmarks/results/memory.json`` (``python -m benchmarks.memory``), the
  largest-model table; ``benchmarks/results/memory_tpu.json`` (``python -m benchmarks.memory
  --topology ...``), the largest model by the TPU compiler; ``benchmarks/results/tpu.json``
  (``python -m benchmarks.run --topology ...``), the update's bytes on TPU compilers;
  ``benchmarks/results/tpu_groups.json`` (the same with ``--trees`` of many small leaves and
  ``--optimizers`` with ``adafactor_jax_in_groups``, copied from ``--out``), the step in groups;
  ``benchmarks/results/tpu_scalar_out.json`` (the same trees and optimizers with
  ``--scalar-out``), the step that also returns a scalar.

A source in ``PENDING`` may not exist yet; its region then reads ``PENDING[source]``. To add a
table: write a function from the file's parsed JSON to Markdown, add it to ``RENDERERS`` under
the file's name, put an empty region for the file where the table goes, and run this module.
``tests/test_readme.py`` fails when a region differs from what its file gives.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks import memory, memory_tpu, run

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REGION = re.compile(
  r"(<!-- generated from (?P<source>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL
)
# A JSON result file's name, and the function that renders its parsed content as Markdown.
RENDERERS: dict[str, Callable[[dict], str]] = {
  "results.json": run.readme_table,
  "memory.json": memory.readme_table,
  "tpu.json": run.tpu_readme_table,
  "tpu_groups.json": run.tpu_readme_table,
  "tpu_scalar_out.json": run.tpu_readme_table,
  "memory_tpu.json": memory_tpu.readme_table,
}
# Sources that are still to be measured, and what their region says until they are.
PENDING: dict[str, str] = {}


def pages() -> list[Path]:
  """The pages whose generated regions this module writes: README.md and docs/*.md."""
  return [README, *sorted((ROOT / "docs").glob("*.md"))]


def render(source: str) -> str:
  """The text a region shows for its result file."""
  path = ROOT / source
  if not path.exists() and source in PENDING:
    return PENDING[source] + "\n"
  if path.suffix == ".md":
    return path.read_text().strip() + "\n"
  if path.suffix == ".json" and path.name in RENDERERS:
    return RENDERERS[path.name](json.loads(path.read_text())) + "\n"
  raise ValueError(
    f"{source}: a generated region's source must be a .md result file or a JSON file named in "
    f"benchmarks/readme.py's RENDERERS ({', '.join(RENDERERS)})."
  )


def regenerate(text: str) -> tuple[str, list[str]]:
  """A page's text with every region rendered anew, and the sources whose region changed."""
  stale = []

  def replace(match: re.Match) -> str:
    body = render(match["source"])
    if body != match["body"]:
      stale.append(match["source"])
    return match.group(1) + body + match.group(4)

  return REGION.sub(replace, text), stale


def sources() -> dict[str, list[str]]:
  """Each page's region sources, by the page's path relative to the repository."""
  return {
    str(page.relative_to(ROOT)): [m["source"] for m in REGION.finditer(page.read_text())]
    for page in pages()
  }


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
  args = parser.parse_args(argv)
  if not any(sources().values()):
    print("No page has a generated region.", file=sys.stderr)
    return 1
  any_stale = False
  for page in pages():
    name = page.relative_to(ROOT)
    text = page.read_text()
    new, stale = regenerate(text)
    any_stale |= bool(stale)
    if args.check:
      for source in stale:
        print(f"{name}: the region generated from {source} is stale.", file=sys.stderr)
    elif stale:
      page.write_text(new)
      print(f"{name}: {len(stale)} region(s) rewritten ({', '.join(stale)}).")
  if not args.check and not any_stale:
    print("Every generated region is up to date.")
  return 1 if args.check and any_stale else 0


if __name__ == "__main__":
  sys.exit(main())
