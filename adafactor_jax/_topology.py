"""A TPU topology's devices, to compile for ahead of time on a machine without a TPU.

Shared by the benchmarks and the training job's ``--compile_only``; it needs libtpu
(``pip install -e '.[tpu]'``) and drives no TPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from typing import Any

EXAMPLES = ("v5e:2x2", "v5e:16x16", "v4:2x2x1", "v5p:4x4x4", "v6e:2x2")


class TopologyError(ValueError):
  """A topology that cannot be compiled for here, with the one line that says why."""


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None when it is not installed."""
  try:
    return importlib.metadata.version("libtpu")
  except importlib.metadata.PackageNotFoundError:
    return None


def topology_devices(topology: str, num_slices: int = 1) -> list[Any]:
  """The devices of ``num_slices`` slices of a TPU topology such as 'v5e:16x16', to compile for.

  Raises:
    TopologyError: with one line, when libtpu is missing, the name is not a topology libtpu
      knows, or ``num_slices`` is not a positive count it can make.
  """
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(
      f"--topology {topology}: compiling for a TPU needs libtpu: pip install -e '.[tpu]'."
    )
  if num_slices < 1:
    raise TopologyError(f"--num_slices must be at least 1, got {num_slices}.")
  # libtpu locks a file so that one process at a time drives a TPU; compiling drives none.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  slices = {"num_slices": num_slices} if num_slices > 1 else {}
  try:
    description = topologies.get_topology_desc(topology, "tpu", **slices)
  except Exception as error:  # libtpu's errors are of several types, all one line here
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    raise TopologyError(
      f"--topology {topology}: not a TPU topology libtpu {libtpu_version()} can make"
      f"{f' {num_slices} slices of' if slices else ''} (e.g. {', '.join(EXAMPLES)}): {first}"
    ) from None
  return list(description.devices)
