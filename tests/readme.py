"""The code blocks of the README and of the documentation's pages, for the tests that run them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
_TOCTREE = re.compile(r"^```\{toctree\}\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def pages() -> list[Path]:
  """README.md, then docs/index.md and the pages of its tables of contents, in their order."""
  names = []
  for toctree in _TOCTREE.findall((DOCS / "index.md").read_text()):
    names += [line.strip() for line in toctree.splitlines() if line.strip() and ":" not in line]
  return [README, DOCS / "index.md", *(DOCS / f"{name}.md" for name in names)]


def code_blocks(language: str) -> list[str]:
  """The fenced blocks of a language, in order: the README's first, then the pages'."""
  pattern = re.compile(rf"^```{language}\n(.*?)^```$", re.MULTILINE | re.DOTALL)
  return [block for page in pages() for block in pattern.findall(page.read_text())]
