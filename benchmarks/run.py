"""Benchmark one jitted, donated optimizer step per parameter tree and optimizer.

Usage::

  python -m benchmarks.run [--trees t5_small,gpt2_124m,vit_b16,stacked] [--no-sweep]
      [--sweep-max-params 5.2e8] [--rounds 5] [--steps-per-round 3] [--sweep-rounds 3]
      [--out benchmarks/results] [--optimizers adafactor_jax,optax_adamw,sgd,...]
  python -m benchmarks.run --topology v5e:2x2,v4:2x2x1,v5p:2x2x1,v6e:2x2   # or all

With ``--topology`` nothing runs: the step is compiled for one chip of each TPU topology
(``benchmarks/tpu.py``; needs ``pip install -e '.[tpu]'``) and the TPU compiler's bytes
accessed per parameter and temporaries are written to ``tpu.json``, by topology (a run for
one topology keeps the others' figures when the versions are the same).

For each tree the optimizers run in one process, interleaved round-robin (each round
times a few steps of every optimizer, starting from a different one each round), and
the median over all rounds is reported, since a shared machine is noisy. Prints a
markdown table per tree and for the scaling sweep, and writes ``results.json`` and
``benchmark.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adafactor_jax
from benchmarks import tpu
from benchmarks import trees as trees_lib

Tree = trees_lib.Tree


def sgd(learning_rate: float = 1e-3) -> optax.GradientTransformation:
  """Stateless in-place SGD, ``-learning_rate * g``: the memory-bandwidth floor of a step."""

  def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
    del params
    return jax.tree.map(lambda g: -learning_rate * g, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "adafactor_jax": lambda: adafactor_jax.adafactor(learning_rate=1e-2),
  "adafactor_jax_telemetry": lambda: adafactor_jax.adafactor(learning_rate=1e-2, telemetry=True),
  "adafactor_jax_bf16_momentum": lambda: adafactor_jax.adafactor(
    learning_rate=1e-2, momentum=0.9, momentum_dtype=jnp.bfloat16
  ),
  "adafactor_jax_int8_momentum": lambda: adafactor_jax.adafactor(
    learning_rate=1e-2, momentum=0.9, momentum_dtype=jnp.int8
  ),
  "optax_adafactor": lambda: optax.adafactor(1e-2),
  "optax_adamw": lambda: optax.adamw(1e-3),
  "sgd": sgd,
}
"""The JAX optimizers, by column name."""

TPU_OPTIMIZERS: dict[str, tuple[Callable[[], optax.GradientTransformation], Any]] = {
  **{name: (build, jnp.float32) for name, build in OPTIMIZERS.items()},
  "optax_adafactor_bf16_momentum": (
    lambda: optax.adafactor(1e-2, momentum=0.9, dtype_momentum=jnp.bfloat16),
    jnp.float32,
  ),
  "adafactor_jax_bf16_params": (OPTIMIZERS["adafactor_jax"], jnp.bfloat16),
  "adafactor_jax_in_groups": (OPTIMIZERS["adafactor_jax"], jnp.float32),
}
"""``--topology``'s optimizers: (builder, parameter dtype) by name."""

IN_GROUPS = {"adafactor_jax_in_groups": 3}
"""``--topology``'s rows whose step is ``adafactor_jax.update_and_apply`` in that many
groups, where the others' is ``tx.update`` and ``optax.apply_updates``."""

TPU_TREES = ("large", "large_stacked", *trees_lib.TREES)
"""``--topology``'s default trees: those of large leaves first (see trees.large_matrices)."""

TORCH = "torch_adafactor"
ALL_OPTIMIZERS = (*OPTIMIZERS, TORCH)
SWEEP_OPTIMIZERS = ("adafactor_jax", "optax_adamw", "sgd", "optax_adafactor")
SWEEP_OPTAX_ADAFACTOR_MAX_PARAMS = 70e6
"""optax.adafactor is several times slower: the sweep runs it up to this size only."""

RATIOS = {"x_sgd": "sgd", "x_optax_adamw": "optax_adamw", "x_optax_adafactor": "optax_adafactor"}
"""Ratio columns: the median step time over that of the named optimizer, same tree."""

BUFFERS = {
  "adafactor_jax": 1.1,
  "adafactor_jax_telemetry": 1.1,
  "adafactor_jax_bf16_momentum": 1.6,
  "adafactor_jax_int8_momentum": 1.4,
  "optax_adafactor": 3.0,
  "optax_adamw": 3.0,
  "sgd": 1.0,
  TORCH: 2.2,
}
"""Parameter-sized buffers each optimizer holds (its params, state and XLA temporaries),
for the memory estimate of the sweep; the gradients add one more, shared."""


class Runner(NamedTuple):
  """One optimizer, ready to run: ``step()`` runs a step and returns its seconds."""

  step: Callable[[], float]
  figures: dict[str, Any]


def _step(tx: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _step_in_groups(
  tx: optax.GradientTransformation, groups: int
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
  def step(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
    return adafactor_jax.update_and_apply(
      tx, grads=grads, opt_state=state, params=params, groups=groups
    )

  return step


def _with_scalar_out(
  step: Callable[[Any, Any, Any], tuple[Any, Any]],
) -> Callable[[Any, Any, Any], tuple[Any, Any, jax.Array]]:
  """``step`` that also returns a scalar (one gradient element), as a train step returns its
  loss beside the parameters and state: then not every output is a donated input, and on
  trees of many small leaves the TPU compiler schedules the update otherwise (docs/tpu.md)."""

  def with_scalar(params: Any, state: Any, grads: Any) -> tuple[Any, Any, jax.Array]:
    return (*step(params, state, grads), jax.tree.leaves(grads)[0].ravel()[0])

  return with_scalar


def compile_step(tx: optax.GradientTransformation, param_shapes: Tree) -> jax.stages.Compiled:
  """The jitted step (params and state donated) compiled from shapes alone, nothing allocated.

  Gradients have the parameters' shapes; ``memory_analysis()`` of the result gives XLA's
  temporary bytes.
  """
  state_shapes = jax.eval_shape(tx.init, param_shapes)
  jitted = jax.jit(_step(tx), donate_argnums=(0, 1))
  return jitted.lower(param_shapes, state_shapes, param_shapes).compile()


def temp_bytes(compiled: jax.stages.Compiled) -> int | None:
  """XLA's temporary bytes of a compiled step, or None where the backend does not say."""
  analysis = compiled.memory_analysis()
  return None if analysis is None else int(analysis.temp_size_in_bytes)


def random_tree(shapes: Tree, seed: int, scale: float = 0.02) -> Tree:
  """Random normals times ``scale`` as device arrays, of the given shapes and dtypes."""
  rng = np.random.default_rng(seed)

  def normal(x: jax.ShapeDtypeStruct) -> jax.Array:
    values = rng.standard_normal(x.shape, dtype=np.float32)
    values *= scale
    return jnp.asarray(values, x.dtype)

  return jax.tree.map(normal, shapes)


def jax_runner(
  tx: optax.GradientTransformation, params: Tree, grads: Tree, copy: bool = True
) -> Runner:
  """Compiles the step, inits the state and runs one warm-up step, on a copy of the params
  (or, with ``copy=False``, on the params themselves: they are donated)."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  compiled = compile_step(tx, shapes)
  carry = [jax.tree.map(jnp.copy, params) if copy else params, None]
  carry[1] = tx.init(carry[0])
  figures = {"temp_bytes": temp_bytes(compiled), "state_bytes": trees_lib.tree_bytes(carry[1])}

  def step() -> float:
    start = time.perf_counter()
    carry[:] = compiled(carry[0], carry[1], grads)
    jax.block_until_ready(carry)
    return time.perf_counter() - start

  step()
  return Runner(step, figures)


def torch_note() -> str | None:
  """Why torch.optim.Adafactor cannot run here, or None when it can."""
  try:
    import torch
  except ImportError:
    return "torch is not installed: the torch_adafactor column is omitted."
  if not hasattr(torch.optim, "Adafactor"):
    return f"torch {torch.__version__} has no optim.Adafactor (needs >= 2.5): column omitted."
  return None


def torch_runner(params: Tree, grads: Tree) -> Runner:
  """torch.optim.Adafactor(lr=1e-2) on CPU tensors copied from the params, ``.grad`` set."""
  import torch

  tensors = [torch.nn.Parameter(torch.from_numpy(np.array(p))) for p in jax.tree.leaves(params)]
  for tensor, grad in zip(tensors, jax.tree.leaves(grads), strict=True):
    tensor.grad = torch.from_numpy(np.array(grad))
  optimizer = torch.optim.Adafactor(tensors, lr=1e-2)

  def step() -> float:
    start = time.perf_counter()
    optimizer.step()
    return time.perf_counter() - start

  step()
  state_bytes = sum(
    value.numel() * value.element_size()
    for state in optimizer.state.values()
    for value in state.values()
    if torch.is_tensor(value)
  )
  return Runner(step, {"temp_bytes": None, "state_bytes": state_bytes})


def measure(
  steps: dict[str, Callable[[], float]], rounds: int, steps_per_round: int
) -> dict[str, list[float]]:
  """Step times in ms, interleaved: each round times ``steps_per_round`` steps of every
  optimizer in turn, starting one further along each round."""
  names = list(steps)
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names) :] + names[: r % len(names)]:
      times[name] += [1e3 * steps[name]() for _ in range(steps_per_round)]
  return times


def benchmark_tree(
  shapes: Tree, optimizers: Sequence[str], rounds: int, steps_per_round: int, seed: int = 0
) -> dict[str, Any]:
  """All figures of one tree: per optimizer the median step ms, its ratios, and bytes."""
  n_params, n_bytes = trees_lib.param_count(shapes), trees_lib.tree_bytes(shapes)
  params, grads = random_tree(shapes, seed), random_tree(shapes, seed + 1)
  # torch copies the params first; the last JAX optimizer takes them without a copy.
  order = sorted(optimizers, key=lambda name: name != TORCH)
  runners = {}
  for i, name in enumerate(order):
    if name == TORCH:
      runners[name] = torch_runner(params, grads)
    else:
      runners[name] = jax_runner(OPTIMIZERS[name](), params, grads, copy=i < len(order) - 1)
  del params
  runners = {name: runners[name] for name in optimizers}
  times = measure({name: r.step for name, r in runners.items()}, rounds, steps_per_round)
  medians = {name: statistics.median(t) for name, t in times.items()}
  results = {}
  for name, runner in runners.items():
    temp = runner.figures["temp_bytes"]
    results[name] = {
      "median_ms": medians[name],
      **{
        col: medians[name] / medians[ref] if ref in medians else None for col, ref in RATIOS.items()
      },
      "ms_per_mparam": medians[name] / (n_params / 1e6),
      "temp_bytes": temp,
      "temp_pct_of_params": None if temp is None else 100 * temp / n_bytes,
      "state_bytes": runner.figures["state_bytes"],
      "times_ms": times[name],
    }
  del runners
  release_memory()
  return {"params": n_params, "param_bytes": n_bytes, "optimizers": results}


def release_memory() -> None:
  """Collects garbage and returns the C heap's free pages to the system (glibc), so that
  the next tree, and the memory estimate, start from what is really in use."""
  gc.collect()
  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass


def available_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (bytes), or None where unknown."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def run_sweep(
  optimizers: Sequence[str], max_params: float, rounds: int, steps_per_round: int
) -> tuple[list[dict[str, Any]], list[str]]:
  """The scaling sweep over GPT-like trees; returns (one entry per size, notes)."""
  entries, notes = [], []
  for dims in trees_lib.SWEEP:
    shapes = trees_lib.sweep_tree(*dims)
    n_params, n_bytes = trees_lib.param_count(shapes), trees_lib.tree_bytes(shapes)
    if n_params > max_params:
      notes.append(f"sweep: {n_params / 1e6:.0f}M params skipped (--sweep-max-params).")
      continue
    names = [
      name
      for name in SWEEP_OPTIMIZERS
      if name in optimizers
      and (name != "optax_adafactor" or n_params <= SWEEP_OPTAX_ADAFACTOR_MAX_PARAMS)
    ]
    if not names:
      notes.append("sweep: none of the chosen optimizers is swept; sweep skipped.")
      break
    needed, free = n_bytes * (1 + sum(BUFFERS[name] for name in names)), available_bytes()
    if free is not None and needed > 0.8 * free:
      notes.append(
        f"sweep: {n_params / 1e6:.0f}M params skipped: needs ~{needed / 2**30:.1f} GiB, "
        f"{free / 2**30:.1f} GiB available."
      )
      continue
    print(f"sweep: {n_params / 1e6:.1f}M params ...", file=sys.stderr, flush=True)
    result = benchmark_tree(shapes, names, rounds, steps_per_round)
    entries.append({"dims": dict(zip(("d_model", "n_layers", "vocab"), dims, strict=True))})
    entries[-1] |= result
  return entries, notes


def scaling_slopes(sweep: list[dict[str, Any]], min_params: float = 10e6) -> dict[str, float]:
  """Per optimizer, the log-log slope of ms against params over sizes >= ``min_params``
  (1 is linear)."""
  slopes = {}
  for name in SWEEP_OPTIMIZERS:
    points = [
      (math.log(e["params"]), math.log(e["optimizers"][name]["median_ms"]))
      for e in sweep
      if e["params"] >= min_params and name in e["optimizers"]
    ]
    if len(points) >= 2:
      slopes[name] = float(np.polyfit(*zip(*points, strict=True), 1)[0])
  return slopes


def _fmt(value: float | None, spec: str) -> str:
  return "—" if value is None else format(value, spec)


def _bytes(value: int | None) -> str:
  if value is None:
    return "—"
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if value >= size:
      return f"{value / size:.1f} {unit}"
  return f"{value} B"


def tree_table(name: str, result: dict[str, Any]) -> str:
  """A markdown table of one tree: a row per optimizer."""
  lines = [
    f"### {name}: {result['params'] / 1e6:.2f}M params, {_bytes(result['param_bytes'])}",
    "",
    "| optimizer | median ms | x SGD | x optax.adamw | x optax.adafactor | temp bytes "
    "| temp % of params | state bytes |",
    "|---|--:|--:|--:|--:|--:|--:|--:|",
  ]
  for opt, f in result["optimizers"].items():
    cells = [
      opt,
      _fmt(f["median_ms"], ".1f"),
      *(_fmt(f[col], ".2f") for col in RATIOS),
      _bytes(f["temp_bytes"]),
      _fmt(f["temp_pct_of_params"], ".2f"),
      _bytes(f["state_bytes"]),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def sweep_table(sweep: list[dict[str, Any]], slopes: dict[str, float]) -> str:
  """A markdown table of the sweep: a row per size, ms and ms per million params."""
  names = [n for n in SWEEP_OPTIMIZERS if any(n in e["optimizers"] for e in sweep)]
  header = "| params | " + " | ".join(f"{n} ms | {n} ms/M" for n in names) + " |"
  lines = ["### scaling sweep", "", header, "|--:|" + "--:|--:|" * len(names)]
  for entry in sweep:
    cells = [f"{entry['params'] / 1e6:.1f}M"]
    for n in names:
      f = entry["optimizers"].get(n, {})
      cells += [_fmt(f.get("median_ms"), ".2f"), _fmt(f.get("ms_per_mparam"), ".3f")]
    lines.append("| " + " | ".join(cells) + " |")
  if slopes:
    fitted = ", ".join(f"{n} {s:.2f}" for n, s in slopes.items())
    lines += ["", f"log-log slope of ms vs params over sizes >= 10M (1 = linear): {fitted}"]
  return "\n".join(lines)


LABELS = {
  "adafactor_jax": "**adafactor_jax**",
  "adafactor_jax_telemetry": "adafactor_jax, telemetry on",
  "adafactor_jax_bf16_momentum": "adafactor_jax, bf16 momentum",
  "adafactor_jax_int8_momentum": "adafactor_jax, int8 momentum",
  "optax_adafactor": "optax.adafactor",
  "optax_adafactor_bf16_momentum": "optax.adafactor, bf16 momentum",
  "adafactor_jax_bf16_params": "adafactor_jax, bfloat16 parameters",
  "adafactor_jax_in_groups": "adafactor_jax, update_and_apply (3 groups)",
  "optax_adamw": "optax.adamw",
  "sgd": "SGD",
  TORCH: "torch.optim.Adafactor",
}
"""How the README's table names each optimizer."""

TREE_LABELS = {
  "t5_small": "T5-small",
  "gpt2_124m": "GPT-2",
  "vit_b16": "ViT-B/16",
  "stacked": "GPT-2, layers stacked",
  "large": "eight 4096², a 32768×1024 embedding",
  "large_stacked": "the same, the 4096² stacked",
}


def readme_table(results: dict[str, Any]) -> str:
  """The README's table: where and when, then a row per tree and optimizer, then the sweep."""
  env = results["environment"]
  versions = ", ".join(
    f"{name} {env[name]}" for name in ("jax", "optax", "torch") if env.get(name) is not None
  )
  lines = [
    f"Measured {env['date'].replace('T', ' ')[:16]} UTC on {env['cpu']} "
    f"({env['cpu_count']} cores, {env['platform']}), {versions}, "
    f"`--rounds {results['settings']['rounds']}`:",
    "",
    "| tree (params) | optimizer | step ms | × SGD | × AdamW | × optax.adafactor "
    "| XLA temporaries | optimizer state |",
    "|---|---|--:|--:|--:|--:|--:|--:|",
  ]
  for tree, result in results["trees"].items():
    first = f"{TREE_LABELS.get(tree, tree)} ({result['params'] / 1e6:.1f}M)"
    for opt, f in result["optimizers"].items():
      temp = _bytes(f["temp_bytes"])
      if f["temp_pct_of_params"] is not None and f["temp_bytes"]:
        temp += f" ({f['temp_pct_of_params']:.2f}%)"
      bold = "**" if opt == "adafactor_jax" else ""
      cells = [
        first,
        LABELS.get(opt, opt),
        f"{bold}{_fmt(f['median_ms'], '.1f')}{bold}",
        *(_fmt(f[col], ".2f") for col in RATIOS),
        temp,
        _bytes(f["state_bytes"]),
      ]
      lines.append("| " + " | ".join(cells) + " |")
      first = ""
  sweep = results.get("sweep") or []
  if sweep:
    ranges = []
    for name in SWEEP_OPTIMIZERS:
      per = [
        e["optimizers"][name]["ms_per_mparam"]
        for e in sweep
        if name in e["optimizers"] and e["params"] >= 10e6
      ]
      if per:
        ranges.append(f"{LABELS.get(name, name).strip('*')} {min(per):.2f}–{max(per):.2f}")
    slopes = ", ".join(f"{n} {v:.2f}" for n, v in results.get("scaling_slopes", {}).items())
    lines += [
      "",
      f"Scaling sweep ({sweep[0]['params'] / 1e6:.0f}M to {sweep[-1]['params'] / 1e6:.0f}M "
      f"parameters), ms per million parameters above 10M: {'; '.join(ranges)}. Log-log slope "
      f"of time against size above 10M (1 is linear): {slopes}.",
    ]
  return "\n".join(lines)


def environment() -> dict[str, Any]:
  """Where and when the figures were taken."""
  cpu = platform.processor() or None
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(
        (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu
      )
  except OSError:
    pass
  device = jax.devices()[0]
  env = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "device_kind": device.device_kind,
    "platform": device.platform,
    "cpu": cpu,
    "cpu_count": os.cpu_count(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "optax": optax.__version__,
    "numpy": np.__version__,
    "adafactor_jax": adafactor_jax.__version__,
  }
  if torch_note() is None:
    import torch

    env["torch"] = torch.__version__
  return env


def plot(results: dict[str, Any], path: str) -> None:
  """Bars of step time relative to SGD per tree and optimizer; the sweep, log-log."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sweep = results["sweep"]
  fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(13 if sweep else 7, 4.5), squeeze=False)
  ax = axes[0, 0]
  trees = results["trees"]
  relative = all("sgd" in t["optimizers"] for t in trees.values())
  names = [
    n
    for n in ALL_OPTIMIZERS
    if any(n in t["optimizers"] for t in trees.values()) and not (relative and n == "sgd")
  ]
  width = 0.8 / max(len(names), 1)
  for i, name in enumerate(names):
    key = "x_sgd" if relative else "median_ms"
    heights = [t["optimizers"].get(name, {}).get(key) or 0.0 for t in trees.values()]
    ax.bar(np.arange(len(trees)) + (i - (len(names) - 1) / 2) * width, heights, width, label=name)
  ax.set_xticks(np.arange(len(trees)), list(trees))
  ax.set_ylabel("step time / in-place SGD" if relative else "median step ms")
  if relative:
    ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_title("One donated optimizer step")
  ax.legend(fontsize=8)
  if sweep:
    ax = axes[0, 1]
    for name in SWEEP_OPTIMIZERS:
      points = [
        (e["params"], e["optimizers"][name]["median_ms"]) for e in sweep if name in e["optimizers"]
      ]
      if points:
        ax.loglog(*zip(*points, strict=True), marker="o", label=name)
    largest = max(sweep, key=lambda e: e["params"])
    linear = np.array([min(e["params"] for e in sweep), largest["params"]])
    ms = min(f["median_ms"] for f in largest["optimizers"].values())
    ax.loglog(linear, ms * linear / linear[-1], "k--", linewidth=0.8, label="∝ params")
    ax.set_xlabel("parameters")
    ax.set_ylabel("median step ms")
    ax.set_title("Scaling sweep (GPT-like trees)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  env = results["environment"]
  fig.suptitle(f"{env['cpu']} ({env['cpu_count']} cores), jax {env['jax']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def compile_for_topology(
  topology: str,
  tree_names: Sequence[str],
  optimizers: Sequence[str],
  *,
  scalar_out: bool = False,
  compiler_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Per tree and optimizer, the figures of the donated step compiled for one chip of a TPU
  topology (:func:`benchmarks.tpu.figures`), nothing run; with ``scalar_out``, of the step
  that also returns a scalar, as a train step returns its loss; ``compiler_options`` go to
  the compiler."""
  device = tpu.devices(topology)[0]
  builders = trees_lib.TREES | trees_lib.EXTRA_TREES
  results: dict[str, Any] = {"chip": device.device_kind, "trees": {}}
  for tree in tree_names:
    shapes = builders[tree]()
    n_params = trees_lib.param_count(shapes)
    per_optimizer = {}
    for name in optimizers:
      build, dtype = TPU_OPTIMIZERS[name]
      params = tpu.on_device(
        jax.tree.map(lambda x, d=dtype: jax.ShapeDtypeStruct(x.shape, d), shapes), device
      )
      tx = build()
      state = tpu.on_device(jax.eval_shape(tx.init, params), device)
      start = time.perf_counter()
      step = _step_in_groups(tx, IN_GROUPS[name]) if name in IN_GROUPS else _step(tx)
      if scalar_out:
        step = _with_scalar_out(step)
      with tempfile.TemporaryDirectory() as dump:
        compiled = tpu.compile_for(
          step, (params, state, params), (0, 1), dump=dump, options=compiler_options
        )
        per_optimizer[name] = tpu.figures(
          compiled, n_params, trees_lib.tree_bytes(params), dump=dump
        ) | {"compile_s": time.perf_counter() - start}
      print(
        f"{topology} {tree} {name}: {per_optimizer[name]['hbm_bytes_per_param']:.2f} HBM, "
        f"{per_optimizer[name]['bytes_per_param']:.2f} accessed B/param",
        file=sys.stderr,
        flush=True,
      )
    results["trees"][tree] = {"params": n_params, "optimizers": per_optimizer}
  return results


def tpu_readme_table(results: dict[str, Any]) -> str:
  """Per tree, a row per optimizer and a column per chip: HBM bytes and bytes accessed per
  parameter by the TPU compiler, with the temporaries as % of the parameters' bytes where over
  0.05%."""
  env = results["environment"]
  topologies = list(results["topologies"])
  chips = [tpu.CHIPS.get(t.split(":")[0], results["topologies"][t]["chip"]) for t in topologies]
  lines = [
    f"Compiled with jax {env['jax']} and libtpu {env['libtpu']} for one chip of "
    f"{', '.join(f'`{t}`' for t in topologies)} ({env['date'][:10]}); "
    + (
      "the update and a scalar returned beside it, as a train step returns its loss "
      "(`--scalar-out`; "
      if results.get("scalar_out")
      else "the update alone ("
    )
    + "`tx.update` and `optax.apply_updates`, parameters and state donated). Per parameter, "
    "the bytes read from and written to HBM / the compiler's bytes accessed, which add the "
    "on-chip side of buffers it prefetches (temporaries as % of the parameters' bytes where "
    "above 0.05%):",
  ]
  first = results["topologies"][topologies[0]]["trees"]
  for tree, entry in first.items():
    header = ["optimizer", *chips]
    lines += [
      "",
      f"**{TREE_LABELS.get(tree, tree)}** ({entry['params'] / 1e6:.1f}M parameters)",
      "",
      "| " + " | ".join(header) + " |",
      "|---|" + "--:|" * (len(header) - 1),
    ]
    for name in entry["optimizers"]:
      cells = [LABELS.get(name, name)]
      for t in topologies:
        f = results["topologies"][t]["trees"][tree]["optimizers"][name]
        temp = f" ({f['temp_pct_of_params']:.1f}%)" if f["temp_pct_of_params"] > 0.05 else ""
        cells.append(f"{f['hbm_bytes_per_param']:.1f} / {f['bytes_per_param']:.1f}{temp}")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_topologies(
  topologies: Sequence[str],
  tree_names: Sequence[str],
  optimizers: Sequence[str],
  out: str,
  *,
  scalar_out: bool = False,
) -> dict[str, Any]:
  """Compiles for each topology and writes ``tpu.json`` to ``out``, keeping the figures of
  topologies not compiled this time when the versions that decide them, and the step's
  outputs (``scalar_out``), are the same."""
  path = os.path.join(out, "tpu.json")
  env = tpu.environment() | {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  }
  results: dict[str, Any] = {"environment": env, "scalar_out": scalar_out, "topologies": {}}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    versions = ("jax", "jaxlib", "libtpu", "optax")
    if (
      all(previous["environment"].get(k) == env[k] for k in versions)
      and previous.get("scalar_out", False) == scalar_out
    ):
      results["topologies"] = previous["topologies"]
  for topology in topologies:
    results["topologies"][topology] = compile_for_topology(
      topology, tree_names, optimizers, scalar_out=scalar_out
    )
  os.makedirs(out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f, indent=1)
  print(tpu_readme_table(results), flush=True)
  print(f"wrote {path}", file=sys.stderr)
  return results


def parse_names(
  text: str, known: Sequence[str], flag: str, parser: argparse.ArgumentParser
) -> list[str]:
  if text == "all":
    return list(known)
  names = [n.strip() for n in text.split(",") if n.strip()]
  unknown = [n for n in names if n not in known]
  if unknown or not names:
    parser.error(f"{flag}: unknown {unknown or text!r}; choose from {', '.join(known)}.")
  return names


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark, prints the tables, writes results.json and benchmark.png."""
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.run", description=__doc__.split("\n")[0]
  )
  parser.add_argument(
    "--trees",
    default=",".join(trees_lib.TREES),
    help=f"comma list of {', '.join([*trees_lib.TREES, *trees_lib.EXTRA_TREES])}",
  )
  parser.add_argument(
    "--optimizers",
    default=",".join(ALL_OPTIMIZERS),
    help=f"comma list of {', '.join(ALL_OPTIMIZERS)}",
  )
  parser.add_argument(
    "--topology",
    default=None,
    help="compile for one chip of each of these TPU topologies instead of timing here "
    f"(comma list, or 'all' for {','.join(tpu.TOPOLOGIES)}; needs '.[tpu]'); writes tpu.json",
  )
  parser.add_argument(
    "--scalar-out",
    action="store_true",
    help="with --topology: compile the step that also returns a scalar, as a train step "
    "returns its loss",
  )
  parser.add_argument("--no-sweep", action="store_true", help="skip the scaling sweep")
  parser.add_argument(
    "--sweep-max-params", type=float, default=5.2e8, help="largest sweep size (params)"
  )
  parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per tree")
  parser.add_argument("--steps-per-round", type=int, default=3, help="timed steps per round")
  parser.add_argument(
    "--sweep-rounds", type=int, default=3, help="interleaved rounds per sweep size"
  )
  parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results"), help="output directory"
  )
  args = parser.parse_args(argv)
  if args.scalar_out and args.topology is None:
    parser.error("--scalar-out: only with --topology (it changes the compiled step, not a timing).")
  if args.topology is not None:
    topologies = list(tpu.TOPOLOGIES) if args.topology == "all" else args.topology.split(",")
    known_optimizers = list(TPU_OPTIMIZERS)
    trees_given = args.trees != parser.get_default("trees")
    tree_names = parse_names(
      args.trees if trees_given else ",".join(TPU_TREES),
      [*trees_lib.TREES, *trees_lib.EXTRA_TREES],
      "--trees",
      parser,
    )
    names = args.optimizers
    optimizers = parse_names(
      ",".join(known_optimizers) if names == parser.get_default("optimizers") else names,
      known_optimizers,
      "--optimizers",
      parser,
    )
    try:
      return run_topologies(
        topologies, tree_names, optimizers, args.out, scalar_out=args.scalar_out
      )
    except tpu.TopologyError as error:
      parser.exit(2, f"{parser.prog}: {error}\n")
  tree_names = parse_names(
    args.trees, [*trees_lib.TREES, *trees_lib.EXTRA_TREES], "--trees", parser
  )
  optimizers = parse_names(args.optimizers, ALL_OPTIMIZERS, "--optimizers", parser)
  if args.rounds < 1 or args.steps_per_round < 1 or args.sweep_rounds < 1:
    parser.error("--rounds, --sweep-rounds and --steps-per-round must be >= 1.")

  notes = []
  if TORCH in optimizers and (note := torch_note()) is not None:
    optimizers.remove(TORCH)
    notes.append(note)
  if not optimizers:
    parser.error("no optimizer left to run: " + " ".join(notes))
  builders = trees_lib.TREES | trees_lib.EXTRA_TREES
  results: dict[str, Any] = {"environment": environment(), "trees": {}, "sweep": [], "notes": notes}
  results["settings"] = {k: v for k, v in vars(args).items() if k not in ("out",)}
  for name in tree_names:
    print(f"{name} ...", file=sys.stderr, flush=True)
    results["trees"][name] = benchmark_tree(
      builders[name](), optimizers, args.rounds, args.steps_per_round
    )
    print(tree_table(name, results["trees"][name]) + "\n", flush=True)
  if not args.no_sweep:
    sweep, sweep_notes = run_sweep(
      optimizers, args.sweep_max_params, args.sweep_rounds, args.steps_per_round
    )
    results["sweep"], results["scaling_slopes"] = sweep, scaling_slopes(sweep)
    notes += sweep_notes
    if sweep:
      print(sweep_table(sweep, results["scaling_slopes"]) + "\n", flush=True)
  for note in notes:
    print(f"note: {note}")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(args.out, "benchmark.png"))
  print(f"wrote {os.path.join(args.out, 'results.json')} and benchmark.png", file=sys.stderr)
  return results


if __name__ == "__main__":
  main()
