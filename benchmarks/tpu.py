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
figures for small leaves exceed the HBM traffic (even SGD's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from adafactor_jax._topology import TopologyError, libtpu_version, topology_devices

__all__ = ["TopologyError", "devices", "libtpu_version", "on_device", "figures", "compile_for"]

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


def figures(compiled: jax.stages.Compiled, n_params: int, param_bytes: int) -> dict[str, Any]:
  """The compiled program's own figures: bytes accessed (in all and per parameter), its
  temporaries (bytes and % of the parameters' bytes), and the compiler's time estimate where
  it gives a usable one (v5p; on other chips it comes out negative)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax: one dict per program
    cost = cost[0]
  temp = int(compiled.memory_analysis().temp_size_in_bytes)
  seconds = cost.get("optimal_seconds")
  return {
    "bytes_accessed": float(cost["bytes accessed"]),
    "bytes_per_param": float(cost["bytes accessed"]) / n_params,
    "temp_bytes": temp,
    "temp_pct_of_params": 100 * temp / param_bytes,
    "optimal_ms": None if seconds is None or seconds <= 0 else 1e3 * float(seconds),
  }


def compile_for(
  step: Callable[..., Any], args: tuple[Any, ...], donate_argnums: tuple[int, ...]
) -> jax.stages.Compiled:
  """``step`` jitted with those arguments donated and compiled for the devices the
  arguments' shardings name (a topology's, from :func:`on_device`)."""
  return jax.jit(step, donate_argnums=donate_argnums).lower(*args).compile()


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
