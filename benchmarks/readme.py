"""Writes the README's result tables from the committed result files, so they cannot go stale.

Usage::

  python -m benchmarks.readme          # rewrites README.md's generated regions
  python -m benchmarks.readme --check  # exits 1, naming each region that differs

A region is the text between ``<!-- generated from SOURCE -->`` and
``<!-- end generated -->``. SOURCE is a result file, relative to the repository:
a ``.md`` table, inserted as it is (``adafactor-compare`` writes them next to
its JSON), ``benchmarks/results/results.json`` (``python -m benchmarks.run``
writes it), which gives the speed and memory table, or
``benchmarks/results/memory.json`` (``python -m benchmarks.memory``), the
largest-model table, or ``benchmarks/results/memory_tpu.json`` (``python -m
benchmarks.memory --topology ...``), the largest model by the TPU compiler.
``tests/test_readme.py`` fails when a region differs from what its file gives.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks import memory, memory_tpu, run

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
REGION = re.compile(
  r"(<!-- generated from (?P<source>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.DOTALL
)


def render(source: str) -> str:
  """The text a region shows for its result file."""
  path = ROOT / source
  if path.suffix == ".md":
    return path.read_text().strip() + "\n"
  if path.name == "memory_tpu.json":
    return memory_tpu.readme_table(json.loads(path.read_text())) + "\n"
  if path.name == "memory.json":
    return memory.readme_table(json.loads(path.read_text())) + "\n"
  if path.suffix == ".json":
    return run.readme_table(json.loads(path.read_text())) + "\n"
  raise ValueError(f"{source}: a generated region's source must be a .md or .json result file.")


def regenerate(text: str) -> tuple[str, list[str]]:
  """README text with every region rendered anew, and the sources whose region changed."""
  stale = []

  def replace(match: re.Match) -> str:
    body = render(match["source"])
    if body != match["body"]:
      stale.append(match["source"])
    return match.group(1) + body + match.group(4)

  return REGION.sub(replace, text), stale


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
  args = parser.parse_args(argv)
  text = README.read_text()
  new, stale = regenerate(text)
  if not REGION.search(text):
    print("README.md has no generated regions.", file=sys.stderr)
    return 1
  if args.check:
    for source in stale:
      print(f"README.md: the region generated from {source} is stale.", file=sys.stderr)
    return 1 if stale else 0
  README.write_text(new)
  print(f"README.md: {len(stale)} region(s) rewritten ({', '.join(stale) or 'none changed'}).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
