"""Does a run fit? The job's train step compiled ahead of time, for a TPU pod this machine lacks.

``adafactor-train --config NAME --topology v5e:16x16 --compile_only`` builds the mesh of
``config.mesh`` over a TPU topology's devices (``jax.experimental.topologies``, with libtpu:
``pip install -e '.[tpu]'``; no TPU needed), and compiles the very train step a run would use
(fused or not, any optimizer) from shapes alone, as MaxText's ``train_compile.py`` does. It
prints, per chip, the parameters, the optimizer state, the largest temporaries, the peak, the
HBM available and the compile time, and writes them to ``compile.json`` in the workdir, which
is all it writes. Without ``--topology`` it compiles for the devices there are.

A step that does not fit is refused by the compiler (``RESOURCE_EXHAUSTED``):
:class:`DoesNotFit` then says, in one line, how much HBM the step needs and has, its largest
buffers, and what would help; nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from adafactor_jax._topology import (
  TopologyError,
  largest_buffers,
  libtpu_version,
  topology_devices,
)
from adafactor_jax.training import train

__all__ = ["DoesNotFit", "TopologyError", "compile_train_step", "main", "topology_devices"]

GIB = 1024**3
HBM_AVAILABLE = {
  "TPU v5 lite": 15.75 * GIB,
  "TPU v6 lite": 31.25 * GIB,
  "TPU v4": 15.25 * GIB,  # libtpu's v4 device is a TensorCore, half a chip
  "TPU v5": 95.74 * GIB,
}
"""HBM per device that libtpu lets a program use, by device kind: the figures of its own
refusals ('exceeds available HBM (15.75G)'), a little under what the chips are sold with."""


class DoesNotFit(Exception):
  """The compiler refused the step for want of HBM; the message is the one line to show."""


def _per_device_bytes(tree: Any, shardings: Any) -> int:
  return sum(
    x.dtype.itemsize * math.prod(s.shard_shape(x.shape))
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
  )


def _total_bytes(tree: Any) -> int:
  return sum(x.dtype.itemsize * x.size for x in jax.tree.leaves(tree))


def compile_train_step(
  config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None
) -> dict[str, Any]:
  """Compiles the job's train step for ``devices`` (default: those there are) from shapes
  alone and returns its figures per device (what :func:`main` writes to compile.json).

  Raises:
    ConfigError: for a config, mesh or optimizer the job refuses.
    DoesNotFit: when the compiler refuses the step for want of memory.
  """
  job = train.setup(config, devices)
  config, shardings = job.config, job.shardings
  train_step: Any = train.make_steps(job.graphdef, job.tx, shardings)[0]  # jitted
  opt_state = jax.eval_shape(job.tx.init, job.abstract_params)
  batch_shape = (config.data.batch_size, config.data.seq_len + 1)
  args = (
    train.abstract(job.abstract_params, shardings.params),
    train.abstract(opt_state, shardings.opt_state),
    jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=shardings.batch),
  )
  device = job.mesh.devices.flat[0]
  available = HBM_AVAILABLE.get(device.device_kind)
  began = time.perf_counter()
  with tempfile.TemporaryDirectory() as dump:
    # The buffer assignment that XLA dumps is the one place that names the largest buffers.
    lowered = train_step.lower(*args)
    try:
      compiled = lowered.compile({"xla_dump_to": dump})
    except Exception as error:  # the compiler's refusal is a JaxRuntimeError
      if "RESOURCE_EXHAUSTED" not in str(error):
        raise
      raise DoesNotFit(_refusal(str(error), config, job.mesh, largest_buffers(dump))) from None
    largest = largest_buffers(dump)
  seconds = time.perf_counter() - began
  memory = compiled.memory_analysis()
  per_device = {
    "params": _per_device_bytes(job.abstract_params, shardings.params),
    "opt_state": _per_device_bytes(opt_state, shardings.opt_state),
    "arguments": int(memory.argument_size_in_bytes),
    "outputs": int(memory.output_size_in_bytes),
    "aliased": int(memory.alias_size_in_bytes),
    "temporaries": int(memory.temp_size_in_bytes),
    "generated_code": int(memory.generated_code_size_in_bytes),
  }
  per_device["peak"] = (
    per_device["arguments"]
    + per_device["outputs"]
    - per_device["aliased"]
    + per_device["temporaries"]
    + per_device["generated_code"]
  )
  totals = {"params": _total_bytes(job.abstract_params), "opt_state": _total_bytes(opt_state)}
  return {
    "device_kind": device.device_kind,
    "devices": job.mesh.devices.size,
    "mesh": dict(job.mesh.shape),
    "optimizer": config.optimizer.name,
    "fused_backward": config.optimizer.fused_backward,
    "param_count": sum(x.size for x in jax.tree.leaves(job.abstract_params)),
    "per_device": per_device,
    "hbm_available": None if available is None else int(available),
    "totals": totals,
    # The state is sharded like the parameters, but for the factored statistics, replicated
    # along the axes they average over: the devices that share out each byte, on average.
    "opt_state_devices": totals["opt_state"] / max(per_device["opt_state"], 1),
    "largest_temporaries": largest,
    "compile_seconds": round(seconds, 1),
    "jax": jax.__version__,
    "libtpu": libtpu_version(),
  }


def _gib(n: float) -> str:
  for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def describe_buffers(buffers: Sequence[dict[str, Any]]) -> str:
  return "; ".join(f"{_gib(b['bytes'])} {b['shape']} ({b['op']})" for b in buffers)


def _refusal(
  message: str, config: ml_collections.ConfigDict, mesh: Any, buffers: list[dict[str, Any]]
) -> str:
  """The one line for a step the compiler refused: HBM needed and available, the largest
  buffers, and what would help."""
  needed = re.search(r"required for [^(]*\(([\d.]+[KMGT]?)\)", message) or re.search(
    r"Used ([\d.]+[KMGT]?) of", message
  )
  available = re.search(r"available HBM \(([\d.]+[KMGT]?)\)", message) or re.search(
    r"of ([\d.]+[KMGT]?) hbm", message
  )
  if needed and available:
    what = f"needs {needed[1]} of HBM per chip where {available[1]} is available"
  else:
    what = f"does not fit: {message.strip().splitlines()[0][:300]}"
  helps = []
  rules = dict(config.mesh.logical_axis_rules)
  if rules.get("embed") != "data" or mesh.shape["data"] == 1:
    helps.append("FSDP: 'embed' -> 'data' in mesh.logical_axis_rules over a larger 'data' axis")
  opt = config.optimizer
  if not opt.fused_backward and opt.name == "adafactor":
    helps.append("--config.optimizer.fused_backward=True (with --config.model.scan_layers=True)")
  if opt.get("momentum") and opt.get("momentum_dtype") in (None, "float32"):
    helps.append("--config.optimizer.momentum_dtype=bfloat16")
  if not config.model.remat:
    helps.append("--config.model.remat=True")
  helps.append(f"a smaller --config.data.batch_size (now {config.data.batch_size})")
  largest = f" Largest buffers: {describe_buffers(buffers)}." if buffers else ""
  helped = "; ".join(helps)
  return f"the train step {what} (mesh {dict(mesh.shape)}).{largest} Would help: {helped}."


def _count(n: int) -> str:
  return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n:,}"


def summary_lines(report: dict[str, Any]) -> list[str]:
  """What ``--compile_only`` prints."""
  per, totals = report["per_device"], report["totals"]
  available = report["hbm_available"]
  lines = [
    f"compiled the train step for {report['devices']} x {report['device_kind']} "
    f"(mesh {report['mesh']}) in {report['compile_seconds']:.1f} s: "
    f"{_count(report['param_count'])} parameters, {report['optimizer']}"
    f"{', fused backward' if report['fused_backward'] else ''}. Per chip:",
    f"  parameters     {_gib(per['params'])} (of {_gib(totals['params'])})",
    f"  optimizer      {_gib(per['opt_state'])} (of {_gib(totals['opt_state'])}: sharded "
    f"{report['opt_state_devices']:.1f} ways on average)",
    f"  temporaries    {_gib(per['temporaries'])}",
    f"  peak           {_gib(per['peak'])} of "
    + ("an HBM size not known for this device" if available is None else f"{_gib(available)}"),
  ]
  if report["largest_temporaries"]:
    lines.append("  largest temporaries:")
    lines += [f"    {describe_buffers([b])}" for b in report["largest_temporaries"]]
  return lines


def main(
  config: ml_collections.ConfigDict, workdir: str, topology: str | None, num_slices: int
) -> dict[str, Any]:
  """Compiles, prints the figures and writes ``compile.json`` to ``workdir`` (only then).

  Raises:
    ConfigError, TopologyError: refusals before compiling.
    DoesNotFit: the compiler's refusal; nothing is written.
  """
  devices = None if topology is None else topology_devices(topology, num_slices)
  report = compile_train_step(config, devices)
  report = {"topology": topology, "num_slices": num_slices, **report}
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "compile.json"), "w") as f:
    json.dump(report, f, indent=1)
  print("\n".join(summary_lines(report)), flush=True)
  return report
