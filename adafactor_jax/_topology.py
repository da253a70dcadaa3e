"""A TPU topology's devices, to compile for ahead of time on a machine without a TPU.

Shared by the benchmarks and the training job's ``--compile_only``; it needs libtpu
(``pip install -e '.[tpu]'``) and drives no TPU. Also what a compiled program's buffer
assignment, dumped by XLA, says its largest temporaries are.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
from collections.abc import Sequence
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


_VALUE = re.compile(r"^ value: <\d+ ([^\s{]+)\S* @[^>]*> \(size=(\d+),offset=(\d+)\): (\S+)")


def largest_buffers(dump: str, count: int = 5) -> list[dict[str, Any]]:
  """The largest buffers of the temporary allocation in an XLA dump's buffer assignment
  (``compile({"xla_dump_to": dump})``): bytes, shape, and the operation that made each (its
  JAX name), largest first. Empty when the dump has none (a compiler that writes no buffer
  assignment)."""
  assignments = sorted(glob.glob(os.path.join(dump, "*after_optimizations-buffer-assignment.txt")))
  if not assignments:
    return []
  # Values at one offset share its memory (a buffer updated in place is several values):
  # the largest of them stands for it.
  buffers: dict[tuple[str, int], tuple[int, str, str]] = {}
  allocation = ""
  with open(assignments[-1]) as f:
    for line in f:
      if line.startswith("allocation "):
        # The default memory space's temporaries: other colours are on-chip memories.
        temp = "preallocated-temp" in line and "color" not in line
        allocation = line.split(":")[0] if temp else ""
      elif allocation and (match := _VALUE.match(line)):
        name, size, offset, shape = match[1], int(match[2]), int(match[3]), match[4]
        key = (allocation, offset)
        buffers[key] = max(buffers.get(key, (0, "", "")), (size, shape.split("{")[0], name))
  largest = sorted(buffers.values(), reverse=True)[:count]
  hlo = assignments[-1].replace("-buffer-assignment.txt", ".txt")
  ops = _op_names(hlo, [name for _, _, name in largest])
  return [
    {"bytes": size, "shape": shape, "op": ops.get(name, name)} for size, shape, name in largest
  ]


def _op_names(hlo_path: str, names: Sequence[str]) -> dict[str, str]:
  """The JAX operation each named instruction of an HLO dump comes from, without the jitted
  function's name."""
  if not os.path.exists(hlo_path):
    return {}
  wanted = set(names)
  found = {}
  with open(hlo_path) as f:
    for line in f:
      match = re.match(r"\s*(?:ROOT )?%(\S+) = .*?op_name=\"([^\"]+)\"", line)
      if match and match[1] in wanted:
        found[match[1]] = re.sub(r"^jit\([^)]*\)/", "", match[2])
  return found
