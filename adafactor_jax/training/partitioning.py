"""The device mesh, parameter shardings from logical axis names, and several processes.

The job always runs on a ('data', 'model') mesh over every device of every
process; a mesh of one device is the single-device case. Parameters are sharded
by their logical axis names (``model.py``) through ``config.mesh.logical_axis_rules``,
T5X-style; a name the rules do not map is replicated.
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from adafactor_jax._checks import path_name
from adafactor_jax.training.config import MESH_AXES, ConfigError


def create_mesh(mesh: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """The ('data', 'model') mesh of ``config.mesh`` over all devices (of all processes).

  Raises:
    ConfigError: when the sizes do not use exactly the devices there are.
  """
  where = f"{jax.process_count()} process(es) x {jax.local_device_count()} local devices"
  if devices is not None:
    where = f"the topology's {devices[0].device_kind} devices"
  devices = list(jax.devices() if devices is None else devices)
  count = len(devices)
  sizes = {axis: mesh[axis] for axis in MESH_AXES}
  known = math.prod(size for size in sizes.values() if size != -1)
  for axis, size in sizes.items():
    if size == -1:
      sizes[axis] = count // known if count % known == 0 else -1
  if math.prod(sizes.values()) != count:
    given = ", ".join(f"'mesh.{axis}' = {mesh[axis]}" for axis in MESH_AXES)
    raise ConfigError(
      f"config keys {given} do not make a mesh of the {count} device(s) there are ({where}): "
      "their product must be the device count (-1 takes all the remaining devices)."
    )
  shape = tuple(sizes[axis] for axis in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  slices = len({getattr(device, "slice_index", 0) for device in devices})
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  # Several slices (multislice) are joined by the data-centre network, far slower than the
  # links inside a slice: only data parallelism ('data') crosses it.
  if sizes["data"] % slices:
    raise ConfigError(
      f"config key 'mesh.data' = {sizes['data']} must be a multiple of the {slices} slices "
      "the devices are in: only the 'data' axis spans slices."
    )
  grid = mesh_utils.create_hybrid_device_mesh(
    (sizes["data"] // slices, sizes["model"]), (slices, 1), devices
  )
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_spec(
  names: PartitionSpec | None, rules: Sequence[tuple[str, str | None]]
) -> PartitionSpec:
  """A PartitionSpec of mesh axes for a spec of logical names (unmapped names: replicated)."""
  table = dict(rules)
  return PartitionSpec(*(table.get(name) for name in (names or ())))


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def param_shardings(
  param_axes: Any, abstract_params: Any, mesh: Mesh, rules: Sequence[tuple[str, str | None]]
) -> Any:
  """NamedShardings for the params, from their logical axis names.

  Raises:
    ConfigError: naming the parameter, when a mesh axis does not divide the
      dimension the rules shard over it.
  """
  specs = jax.tree.map(lambda names: mesh_spec(names, rules), param_axes, is_leaf=_is_spec)

  def sharding(path: jax.tree_util.KeyPath, spec: PartitionSpec, param: Any) -> NamedSharding:
    for dim, axis in zip(param.shape, spec, strict=False):
      if axis is not None and dim % mesh.shape[axis]:
        raise ConfigError(
          f"parameter '{path_name(path).removesuffix('/value')}' of shape {param.shape} "
          f"cannot be sharded {spec} on a mesh {dict(mesh.shape)}: {dim} is not a multiple "
          f"of the '{axis}' axis. Change 'mesh.data'/'mesh.model', the model's size, or "
          "'mesh.logical_axis_rules'."
        )
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(sharding, specs, abstract_params, is_leaf=_is_spec)


def per_device_bytes(tree: Any) -> int:
  """Bytes that one device holds of a tree of arrays sharded evenly (as the job's are)."""
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not be brought together."""


def initialize_distributed(
  coordinator_address: str | None,
  num_processes: int | None,
  process_id: int | None,
  *,
  timeout_sec: int = 300,
) -> None:
  """``jax.distributed.initialize``, with a bounded wait for the coordinator.

  With all three arguments None, JAX discovers the processes itself (a TPU pod,
  SLURM, Open MPI...). Otherwise a process other than 0 first waits at most
  ``timeout_sec`` for the coordinator (process 0) to listen, and raises
  DistributedError if it never does: JAX itself would abort the process.
  On the CPU, collectives go over gloo.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  explicit = (coordinator_address, num_processes, process_id)
  if any(x is not None for x in explicit) and any(x is None for x in explicit):
    raise DistributedError(
      "--coordinator_address, --num_processes and --process_id go together: pass all three, "
      "or --distributed alone to let JAX discover the processes."
    )
  if coordinator_address is not None:
    assert num_processes is not None and process_id is not None
    if not 0 <= process_id < num_processes:
      raise DistributedError(
        f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}."
      )
    if process_id != 0:
      _wait_for(coordinator_address, timeout_sec)
  try:
    jax.distributed.initialize(
      coordinator_address, num_processes, process_id, initialization_timeout=timeout_sec
    )
  except (ValueError, RuntimeError) as e:
    hint = (
      ""
      if coordinator_address
      else (
        " (--distributed: JAX found no cluster to join; on other machines pass "
        "--coordinator_address, --num_processes and --process_id)"
      )
    )
    raise DistributedError(f"jax.distributed.initialize failed{hint}: {e}") from e


def _wait_for(address: str, timeout_sec: float) -> None:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address must be HOST:PORT, got {address!r}.")
  deadline = time.monotonic() + timeout_sec
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
          f"no coordinator answered at {address} within {timeout_sec:g} s ({e}). Start "
          "process 0 there (it is the coordinator), or fix --coordinator_address."
        ) from None
      time.sleep(0.5)
