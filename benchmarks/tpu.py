"""Compiling for a TPU topology on a machine without a TPU: the TPU compiler's own figures.

JAX compiles ahead of time for any TPU topology once libtpu is installed (``pip install -e
'.[tpu]'``): :func:`devices` gives a topology's devices, inputs go in as
``jax.ShapeDtypeStruct``s placed on one of them, and ``jax.jit(f).lower(...).compile()`` runs
the real TPU compiler. The compiled program answers ``cost_analysis()`` (``bytes accessed``,
and on v5p ``optimal_seconds``, the compiler's time estimate) and ``memory_analysis()``
(temporaries, the peak per chip); a program that does not fit is refused with
``RESOURCE_EXHAUSTED``. An optimizer update is bound by memory traffic, so its bytes are its
time.

``bytes accessed`` is the compiler's count of every read and write by the program's
operations, in HBM and in on-chip memory alike: where the compiler prefetches a buffer that
fits on chip (its memory-space assignment), the copy and the on-chip accesses count too, so
figures for small leaves exceed the HBM traffic (even SGD's). :func:`hbm_bytes` counts the
HBM traffic alone, from the memory space the compiled program gives each buffer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax

from adafactor_jax._topology import (
  TopologyError,
  largest_buffers,
  libtpu_version,
  topology_devices,
)

__all__ = [
  "TopologyError",
  "devices",
  "libtpu_version",
  "on_device",
  "figures",
  "hbm_bytes",
  "compile_for",
]

TOPOLOGIES = ("v5e:2x2", "v4:2x2x1", "v5p:2x2x1", "v6e:2x2")
"""The topologies the benchmarks compile for by default, one of each chip."""

CHIPS = {"v5e": "TPU v5e", "v4": "TPU v4", "v5p": "TPU v5p", "v6e": "TPU v6e"}


def devices(topology: str) -> list[Any]:
  """The devices of a TPU topology such as 'v5e:2x2', for compiling only.

  Raises TopologyError, with one line, when libtpu is missing or the name is unknown.
  """
  return topology_devices(topology)


def on_device(tree: Any, device: Any) -> Any:
  """Every array or ShapeDtypeStruct of a tree as a ShapeDtypeStruct placed on ``device``."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def figures(
  compiled: jax.stages.Compiled, n_params: int, param_bytes: int, *, dump: str | None = None
) -> dict[str, Any]:
  """The compiled program's own figures: bytes accessed and HBM bytes (in all and per
  parameter), its temporaries (bytes and % of the parameters' bytes), and the compiler's time
  estimate where it gives a usable one (v5p; on other chips it comes out negative).

  With the folder ``compiled`` was dumped to (:func:`compile_for`'s ``dump``), also its largest
  temporary buffer (bytes, shape, the operation that made it): the TPU compiler puts each
  temporary value, down to the 32-byte handle of an asynchronous copy, at a 16 KiB-aligned
  offset, so a program of many prefetches has megabytes of temporaries and no large array."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0]
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  seconds = cost.get("optimal_seconds")
  hbm = hbm_bytes(compiled.as_text())
  return {
    "bytes_accessed": float(cost["bytes accessed"]),
    "bytes_per_param": float(cost["bytes accessed"]) / n_params,
    "hbm_bytes": hbm,
    "hbm_bytes_per_param": hbm / n_params,
    "temp_bytes": temp,
    "temp_pct_of_params": 100 * temp / param_bytes,
    "optimal_ms": None if seconds is None or seconds <= 0 else 1e3 * float(seconds),
    **({} if dump is None else {"largest_temp": next(iter(largest_buffers(dump, 1)), None)}),
  }


_DTYPE_BITS = {
  "pred": 8,
  **{f"{kind}{bits}": bits for kind in "suf" for bits in (4, 8, 16, 32, 64)},
  "bf16": 16,
  "f8e4m3fn": 8,
  "f8e5m2": 8,
}
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\](?:\{([^}]*)\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier"}
_NESTED = {"while", "call", "conditional"}


def _arrays(shape: str) -> list[tuple[int, int]]:
  """(bytes, memory space) of each array in an HLO shape, a tuple's in order; memory space
  0 is HBM, the others the chip's on-chip memories (``S(n)`` in the layout)."""
  found = []
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype in _DTYPE_BITS:
      size = math.prod(int(d) for d in dims.split(",") if d)
      space = re.search(r"S\((\d+)\)", layout)
      found.append((size * _DTYPE_BITS[dtype] // 8, int(space.group(1)) if space else 0))
  return found


def _operand_names(arguments: str) -> list[str]:
  """The operands named in an instruction's text after its opcode's parenthesis."""
  depth = 1
  for end, char in enumerate(arguments):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return re.findall(r"%([\w.\-]+)", arguments[:end])
  raise ValueError(f"unbalanced HLO operands: {arguments[:80]!r}")


def hbm_bytes(hlo_text: str) -> int:
  """The bytes a compiled TPU program reads from and writes to HBM, from its text
  (``compiled.as_text()``): each operation of the entry computation counts its operands and
  results that live in HBM; an asynchronous copy counts its HBM end once (an on-chip buffer's
  prefetch reads HBM once, its eviction writes it once), a sliced prefetch its slice; every
  other operation is taken to read its operands whole, as an optimizer update's fusions do.

  ``bytes accessed`` counts the on-chip side too, and both ends of every copy. Raises
  ValueError on a program this count does not read right: one with loops, calls or an
  asynchronous operation other than a copy or a slice.
  """
  entry = hlo_text[hlo_text.index("\nENTRY") :]
  shapes: dict[str, str] = {}
  total = 0
  for line in entry[: entry.index("\n}")].splitlines()[1:]:
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    name, shape, opcode, arguments = match.groups()
    shapes[name] = shape
    if opcode in _NO_TRAFFIC or opcode.endswith("-done"):
      continue
    if opcode in _NESTED:
      raise ValueError(f"hbm_bytes cannot count a program with {opcode!r} ({name})")
    results = _arrays(shape)
    operands = [a for o in _operand_names(arguments) for a in _arrays(shapes[o])]
    if opcode == "copy-start":  # results: (destination, source, semaphore)
      results = results[:1]
    elif opcode == "slice-start":  # results: ((source), slice, semaphore); reads the slice
      results, operands = results[1:2], [(results[1][0], space) for _, space in operands]
    elif opcode.endswith("-start"):
      raise ValueError(f"hbm_bytes cannot count the asynchronous {opcode!r} ({name})")
    total += sum(size for size, space in results + operands if space == 0)
  return total


def compile_for(
  step: Callable[..., Any],
  args: tuple[Any, ...],
  donate_argnums: tuple[int, ...],
  *,
  dump: str | None = None,
  options: Mapping[str, Any] | None = None,
) -> jax.stages.Compiled:
  """``step`` jitted with those arguments donated and compiled for the devices the
  arguments' shardings name (a topology's, from :func:`on_device`); with ``dump``, XLA writes
  the compiled program and its buffer assignment to that folder; ``options`` are the
  compiler's (e.g. ``{"xla_tpu_sliced_prefetch_max_slices": 0}``)."""
  lowered = jax.jit(step, donate_argnums=donate_argnums).lower(*args)
  options = {**(options or {}), **({} if dump is None else {"xla_dump_to": dump})}
  return lowered.compile(options or None)


def environment() -> dict[str, Any]:
  """The versions that decide the figures: they are deterministic for a jax and a libtpu."""
  import jaxlib
  import optax

  return {
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "libtpu": libtpu_version(),
    "optax": optax.__version__,
  }
