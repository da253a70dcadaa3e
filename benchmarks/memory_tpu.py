"""The largest model that fits, by the TPU compiler: ``python -m benchmarks.memory --topology``.

Usage::

  python -m benchmarks.memory --topology v5e:2x2,v6e:2x2,v4:2x2x1,v5p:2x2x1
      [--sizes all] [--optimizers ...] [--dtypes float32,bfloat16] [--out benchmarks/results]

The same whole train step as ``benchmarks/memory.py`` (forward, backward, update;
parameters and state donated; fused and unfused) compiled by libtpu for one device of each
topology (a chip; on v4 a TensorCore, half a chip), nothing allocated and no TPU needed
(``benchmarks/tpu.py``). The compiled program's ``memory_analysis()`` gives the peak HBM
per device and its temporaries; a program that does not fit is refused by the compiler
with ``RESOURCE_EXHAUSTED``, which is recorded as the size not fitting.

A TPU compile takes minutes on a small machine, so the sizes are not all compiled: per
chip, dtype and optimizer, the walk starts from the largest size whose XLA:CPU peak
(``memory.json``) is under the chip's HBM, goes up while sizes compile and down while they
are refused, and stops with the largest size that compiles next to the smallest refused.
Writes ``memory_tpu.json`` (with each compile's seconds) and ``memory_tpu.png`` to
``--out``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax.numpy as jnp

from benchmarks import memory, tpu
from benchmarks.run import environment

GIB = memory.GIB
HBM = {"v5e": 16 * GIB, "v6e": 32 * GIB, "v4": 32 * GIB, "v5p": 95 * GIB}
"""HBM per chip, as the chips are sold; the walk's first guess. What the compiler allows is in
its refusals (:func:`available`): a little less (v5e: 15.75G), and on v4 half, since libtpu's
v4 topology has a device per TensorCore (2 a chip, 16 GiB each) where v5p's is a chip."""


def measure(name: str, dtype: str, device: Any, size: str) -> dict[str, Any]:
  """One size's figures (``memory.peak_bytes``) compiled for ``device``, or ``refused`` with
  the compiler's RESOURCE_EXHAUSTED line; ``compile_s`` either way. Logged to stderr."""
  start = time.perf_counter()
  try:
    figures: dict[str, Any] = memory.peak_bytes(
      memory.compile_train_step(name, memory.SIZES[size], jnp.dtype(dtype), device)
    )
  except Exception as error:  # the compiler's refusal is a JaxRuntimeError; others propagate
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    figures = {"refused": str(error).strip().splitlines()[0][:400]}
  figures["compile_s"] = round(time.perf_counter() - start, 1)
  shown = figures.get("refused") or f"peak {figures['peak'] / GIB:.2f} GiB"
  print(
    f"{device.device_kind} {dtype} {name} {size}: {shown} ({figures['compile_s']} s)",
    file=sys.stderr,
    flush=True,
  )
  return figures


def walk(
  compile_size: Callable[[str], dict[str, Any]], sizes: Sequence[str], start: int
) -> dict[str, dict[str, Any]]:
  """From ``sizes[start]`` (``sizes`` smallest first), up while sizes compile, down while they
  are refused: the sizes compiled, in order, with the largest that fits next to the smallest
  refused (where both exist)."""
  results: dict[str, dict[str, Any]] = {}
  i, step = start, 0
  while 0 <= i < len(sizes):
    results[sizes[i]] = compile_size(sizes[i])
    fits = "refused" not in results[sizes[i]]
    if step == 0:
      step = 1 if fits else -1
    elif fits != (step == 1):  # crossed the boundary
      break
    i += step
  return {size: results[size] for size in sizes if size in results}


def start_size(
  cpu: dict[str, Any] | None, dtype: str, name: str, sizes: Sequence[str], hbm: int
) -> int:
  """The index of the largest size whose XLA:CPU peak is at most ``hbm`` (0 without one)."""
  peaks = (cpu or {}).get("peaks", {}).get(dtype, {}).get(name, {})
  under = [i for i, s in enumerate(sizes) if s in peaks and peaks[s]["peak"] <= hbm]
  return under[-1] if under else 0


def largest(per_size: dict[str, dict[str, Any]]) -> tuple[str | None, str | None]:
  """The largest size that compiled and the smallest size refused."""
  fitting = [s for s, f in per_size.items() if "refused" not in f]
  refused = [s for s, f in per_size.items() if "refused" in f]
  return (fitting[-1] if fitting else None), (refused[0] if refused else None)


def available(entry: dict[str, Any]) -> str:
  """The HBM the compiler allows a device, from its refusals ('15.75G'), else the chip's."""
  for per_optimizer in entry["peaks"].values():
    for per_size in per_optimizer.values():
      for figures in per_size.values():
        found = re.search(r"available HBM \(([^)]+)\)", figures.get("refused", ""))
        if found:
          return f"{found[1]} available"
  return f"{entry['hbm'] // GIB} GiB"


def run(
  topologies: Sequence[str],
  sizes: Sequence[str],
  optimizers: Sequence[str],
  dtypes: Sequence[str],
  cpu: dict[str, Any] | None = None,
  save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  """Per chip, dtype and optimizer, the sizes :func:`walk` compiled; ``save`` is called with
  the results so far after each optimizer."""
  results: dict[str, Any] = {
    "environment": {**environment(), **tpu.environment()},
    "settings": {
      "batch": memory.BATCH,
      "seq_len": memory.SEQ_LEN,
      "vocab": memory.SIZES[sizes[0]].vocab,
    },
    "sizes": {s: {**memory.SIZES[s]._asdict(), "params": memory.SIZES[s].params} for s in sizes},
    "chips": {},
  }
  for topology in topologies:
    chip = topology.split(":")[0]
    device = tpu.devices(topology)[0]
    entry = results["chips"][chip] = {
      "topology": topology,
      "device_kind": device.device_kind,
      "hbm": HBM[chip],
      "peaks": {},
    }
    for dtype in dtypes:
      entry["peaks"][dtype] = {}
      for name in optimizers:
        start = start_size(cpu, dtype, name, sizes, HBM[chip])
        entry["peaks"][dtype][name] = walk(partial(measure, name, dtype, device), sizes, start)
        if save is not None:
          save(results)
  return results


def _params(size: str | None, results: dict[str, Any]) -> str:
  return memory._params(None if size is None else results["sizes"][size]["params"])


def readme_table(results: dict[str, Any]) -> str:
  """Per dtype and optimizer, per chip: the largest size that compiles, its peak HBM, and the
  next size up, which the compiler refused."""
  env, settings = results["environment"], results["settings"]
  chips = results["chips"]
  lines = [
    f"Compiled {env['date'].replace('T', ' ')[:16]} UTC by libtpu {env['libtpu']} (jax "
    f"{env['jax']}) for one device of each TPU (a chip; on v4 a TensorCore, half a chip), "
    f"nothing allocated, batch {settings['batch']} x "
    f"{settings['seq_len']} tokens. Per chip: the largest model whose whole train step "
    "compiles, its peak HBM (temporaries in brackets), and the next size up, which "
    "the compiler refused with RESOURCE_EXHAUSTED:",
    "",
    "| params | optimizer | "
    + " | ".join(f"{tpu.CHIPS.get(c, c)} ({available(e)})" for c, e in chips.items())
    + " |",
    "|---|---|" + "---|" * len(chips),
  ]
  dtypes = list(dict.fromkeys(d for e in chips.values() for d in e["peaks"]))
  for dtype in dtypes:
    first = dtype
    names = list(dict.fromkeys(n for e in chips.values() for n in e["peaks"].get(dtype, {})))
    for name in names:
      cells = [first, memory.LABELS.get(name, name)]
      for entry in chips.values():
        per_size = entry["peaks"].get(dtype, {}).get(name)
        if per_size is None:
          cells.append("not compiled")
          continue
        fits, refused = largest(per_size)
        cell = _params(fits, results)
        if fits is not None:
          f = per_size[fits]
          cell += f": {f['peak'] / GIB:.1f} GiB ({f['temporaries'] / GIB:.1f})"
        cell += f"; {_params(refused, results)} refused" if refused else "; larger not compiled"
        cells.append(cell)
      lines.append("| " + " | ".join(cells) + " |")
      first = ""
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Bars of the largest size that compiles, per chip and optimizer, one panel per dtype."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  chips = results["chips"]
  dtypes = list(dict.fromkeys(d for e in chips.values() for d in e["peaks"]))
  fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.8), squeeze=False)
  for ax, dtype in zip(axes[0], dtypes, strict=True):
    names = list(dict.fromkeys(n for e in chips.values() for n in e["peaks"].get(dtype, {})))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
      heights = []
      for entry in chips.values():
        fits, _ = largest(entry["peaks"].get(dtype, {}).get(name, {}))
        heights.append(0 if fits is None else results["sizes"][fits]["params"] / 1e9)
      xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(chips))]
      bars = ax.bar(xs, heights, width, label=memory.LABELS.get(name, name).strip("*"))
      ax.bar_label(bars, [f"{h:.2g}" if h else "" for h in heights], fontsize=6)
    ax.set_xticks(range(len(chips)))
    ax.set_xticklabels([f"{tpu.CHIPS.get(c, c)}\n{available(e)}" for c, e in chips.items()])
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.05)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_ylabel("largest model whose train step compiles (B params)")
    ax.set_title(f"{dtype} parameters")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
  env, settings = results["environment"], results["settings"]
  fig.suptitle(
    f"Whole train step, GPT-2-like, batch {settings['batch']} x {settings['seq_len']}, one chip, "
    f"libtpu {env['libtpu']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(
  topologies: Sequence[str],
  sizes: Sequence[str],
  optimizers: Sequence[str],
  dtypes: Sequence[str],
  out: str,
) -> dict[str, Any]:
  """Runs, writing ``memory_tpu.json`` after each optimizer, then the chart and the table."""
  cpu_path = os.path.join(os.path.dirname(__file__), "results", "memory.json")
  cpu = json.loads(open(cpu_path).read()) if os.path.exists(cpu_path) else None
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "memory_tpu.json")

  def save(results: dict[str, Any]) -> None:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)

  results = run(topologies, sizes, optimizers, dtypes, cpu, save)
  save(results)
  plot(results, os.path.join(out, "memory_tpu.png"))
  print(readme_table(results))
  print(f"wrote {path} and memory_tpu.png", file=sys.stderr)
  return results
