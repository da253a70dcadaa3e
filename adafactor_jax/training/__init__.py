"""The training application: trainer, model, input pipeline, comparison and their CLI.

It needs the ``[train]`` extra (flax, orbax-checkpoint, ml_collections, absl-py,
matplotlib, tqdm, tensorboardX): ``pip install -e '.[train]'`` in a checkout. The library
(``adafactor_jax`` itself) never imports it. This module imports nothing of it
either, so that the console scripts can say which extra is missing.
"""

from __future__ import annotations

import sys

# The top-level modules of the [train] extra's packages.
TRAIN_EXTRA_MODULES = frozenset(
  {
    "flax",
    "orbax",
    "ml_collections",
    "absl",
    "matplotlib",
    "tqdm",
    "tensorboardX",
    "etils",
    "tensorstore",
  }
)


def _run(prog: str, module: str) -> None:
  import importlib

  try:
    main = importlib.import_module(module).main
  except ModuleNotFoundError as e:
    missing = (e.name or "").split(".")[0]
    if missing not in TRAIN_EXTRA_MODULES:
      raise
    print(
      f"{prog}: error: the training application needs the [train] extra (no module "
      f"{missing!r}): in a checkout, pip install -e '.[train]'; from a wheel, pip install "
      "'<the wheel>[train]'",
      file=sys.stderr,
    )
    sys.exit(1)
  sys.exit(main())


def train_cli() -> None:
  """The ``adafactor-train`` console script."""
  _run("adafactor-train", "adafactor_jax.training.main")


def compare_cli() -> None:
  """The ``adafactor-compare`` console script."""
  _run("adafactor-compare", "adafactor_jax.training.compare")
