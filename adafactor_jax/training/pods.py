"""Which decoder fits a TPU pod, per optimizer: ``python -m adafactor_jax.training.pods``.

Usage::

  python -m adafactor_jax.training.pods [--topologies v5e:16x16,v5p:4x4x4] [--optimizers ...]
      [--out runs/pods]

The job's own train step (``adafactor-train --compile_only``: ``adafactor_jax/training/
compile_only.py``) compiled by libtpu, no TPU needed, for the 1B and 8B decoders
(``configs/decoder_1b.py``, ``configs/decoder_8b.py``) on each topology with each optimizer
of :data:`OPTIMIZERS`: HBM per chip (parameters, optimizer state, temporaries, peak) or the
compiler's refusal. Then, on the first topology, the largest decoder of :data:`LADDER` whose
step compiles per optimizer, at the 8B config's global batch and mesh. Writes ``pods.json``
(with each compile's seconds), ``pods.md`` (:func:`readme_table`) and ``pods_summary.md``
(:func:`summary_table`) to ``--out``; the documentation's copies are in ``docs/results/``.
About 25 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax

from adafactor_jax.training import compile_only
from adafactor_jax.training.configs import decoder_1b, decoder_8b

TOPOLOGIES = ("v5e:16x16", "v5p:4x4x4")
"""v5e-256 (256 chips of 16 GiB) and v5p-128 (64 chips of 95 GiB: a v5p-N has N/2 chips)."""

CONFIGS: dict[str, Callable[[], ml_collections.ConfigDict]] = {
  "decoder_1b": decoder_1b.get_config,
  "decoder_8b": decoder_8b.get_config,
}

OPTIMIZERS: dict[str, dict[str, Any]] = {
  "adafactor": {},
  "adafactor_fused": {"fused_backward": True},
  "adafactor_bf16_momentum": {"momentum": 0.9, "momentum_dtype": "bfloat16"},
  "adafactor_int8_momentum": {"momentum": 0.9, "momentum_dtype": "int8"},
  "optax_adafactor": {"name": "optax_adafactor", "telemetry": False},
  "adamw": {"name": "adamw", "telemetry": False},
}
"""The job's optimizer section for each row (over the config's): this library's Adafactor
(unfused and fused, bf16 and int8 momentum), optax.adafactor and AdamW."""

LABELS = {
  "adafactor": "adafactor_jax",
  "adafactor_fused": "adafactor_jax, fused backward",
  "adafactor_bf16_momentum": "adafactor_jax, bf16 momentum",
  "adafactor_int8_momentum": "adafactor_jax, int8 momentum",
  "optax_adafactor": "optax.adafactor",
  "adamw": "optax.adamw",
}

LADDER: dict[str, tuple[int, int, int]] = {
  "8B": (4096, 32, 21504),
  "13B": (5120, 40, 20736),
  "39B": (8192, 48, 33024),
  "78B": (8192, 80, 43008),
  "174B": (12288, 96, 49152),
  "465B": (16384, 126, 79872),
}
"""Decoders by (d_model, layers, MLP width), heads of 128: Llama 3 8B, Llama 2 13B, Code Llama
34B and Llama 2 70B with their SwiGLU width times 1.5 (two matrices for three), GPT-3 175B
(whose MLP is this model's), Llama 3.1 405B likewise; named by this model's parameter count
(a byte vocabulary: nearly all in the blocks)."""


def config_for(
  base: Callable[[], ml_collections.ConfigDict], optimizer: dict[str, Any]
) -> ml_collections.ConfigDict:
  config = base()
  config.optimizer.update(optimizer)
  return config


def ladder_config(size: str, optimizer: dict[str, Any]) -> ml_collections.ConfigDict:
  """The 8B config (batch, sequence, mesh) with the decoder of ``LADDER[size]``."""
  config = config_for(decoder_8b.get_config, optimizer)
  d_model, layers, mlp = LADDER[size]
  config.model.update(d_model=d_model, num_layers=layers, mlp_dim=mlp, num_heads=d_model // 128)
  return config


def measure(config: ml_collections.ConfigDict, devices: Sequence[Any], label: str) -> dict:
  """The compiled step's figures (``compile_only.compile_train_step``), or ``refused`` with the
  compiler's one line; logged to stderr."""
  try:
    report = compile_only.compile_train_step(config, devices)
    figures = {key: report[key] for key in ("param_count", "per_device", "totals")}
    figures["opt_state_devices"] = report["opt_state_devices"]
    figures["compile_s"] = report["compile_seconds"]
    shown = f"peak {figures['per_device']['peak'] / compile_only.GIB:.2f} GiB"
  except compile_only.DoesNotFit as refusal:
    figures = {"refused": str(refusal)}
    shown = "refused"
  print(f"{label}: {shown}", file=sys.stderr, flush=True)
  return figures


def environment() -> dict[str, Any]:
  """When, and the versions that decide the figures (deterministic for a jax and a libtpu)."""
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "jax": jax.__version__,
    "libtpu": compile_only.libtpu_version(),
    "optax": optax.__version__,
  }


def walk(compile_size: Callable[[str], dict[str, Any]], start: str) -> dict[str, dict]:
  """From ``start``, up the ladder while sizes compile, down while they are refused: the sizes
  compiled, smallest first, the largest that fits next to the smallest refused."""
  sizes = list(LADDER)
  results: dict[str, dict] = {}
  i, step = sizes.index(start), 0
  while 0 <= i < len(sizes):
    results[sizes[i]] = compile_size(sizes[i])
    fits = "refused" not in results[sizes[i]]
    if step == 0:
      step = 1 if fits else -1
    elif fits != (step == 1):  # crossed from fitting to refused, or back
      break
    i += step
  return {size: results[size] for size in sizes if size in results}


def run(
  topologies: Sequence[str],
  optimizers: Sequence[str],
  save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  results: dict[str, Any] = {
    "environment": environment(),
    "topologies": {},
    "ladder": {},
  }
  for topology in topologies:
    devices = compile_only.topology_devices(topology)
    entry = results["topologies"][topology] = {
      "device_kind": devices[0].device_kind,
      "chips": len(devices),
      "hbm_available": compile_only.HBM_AVAILABLE.get(devices[0].device_kind),
      "configs": {},
    }
    for name, base in CONFIGS.items():
      entry["configs"][name] = {}
      for optimizer in optimizers:
        config = config_for(base, OPTIMIZERS[optimizer])
        figures = measure(config, devices, f"{topology} {name} {optimizer}")
        entry["configs"][name][optimizer] = figures
        if save is not None:
          save(results)
  ladder_topology = topologies[0]
  devices = compile_only.topology_devices(ladder_topology)
  results["ladder"] = {"topology": ladder_topology, "sizes": {}, "optimizers": {}}
  for optimizer in optimizers:

    def compile_size(size: str, optimizer: str = optimizer) -> dict:
      config = ladder_config(size, OPTIMIZERS[optimizer])
      return measure(config, devices, f"{ladder_topology} {size} {optimizer}")

    per_size = walk(compile_size, "78B")
    results["ladder"]["optimizers"][optimizer] = per_size
    for size, figures in per_size.items():
      if "param_count" in figures:
        results["ladder"]["sizes"][size] = figures["param_count"]
    if save is not None:
      save(results)
  return results


def _gib(n: float) -> str:
  return f"{n / compile_only.GIB:.2f}"


def readme_table(results: dict[str, Any]) -> str:
  """Per topology and config, per optimizer: per chip parameters, state (and the ways it is
  sharded), temporaries and peak, or the refusal; then the ladder's largest decoder."""
  env = results["environment"]
  lines = [
    f"Compiled {env['date'].replace('T', ' ')[:16]} UTC by libtpu {env['libtpu']} (jax "
    f"{env['jax']}), no TPU: `adafactor-train --config <config> --topology <topology> "
    "--compile_only` with each optimizer. Per chip, GiB: parameters, optimizer state in MiB "
    "(its total over the number of chips that share it out, on average: the factored "
    "statistics are replicated along the axes they average over), temporaries, and the peak "
    "against the HBM the compiler allows:",
    "",
    "| topology | config | optimizer | parameters | optimizer state (total MiB / chips) "
    "| temporaries | peak | fits |",
    "|---|---|---|--:|--:|--:|--:|---|",
  ]
  for topology, entry in results["topologies"].items():
    hbm = entry["hbm_available"]
    where = f"{topology} ({entry['chips']} x {entry['device_kind']}, {_gib(hbm)} GiB)"
    for name, per_optimizer in entry["configs"].items():
      for optimizer, f in per_optimizer.items():
        label = LABELS.get(optimizer, optimizer)
        if "refused" in f:
          lines.append(f"| {where} | {name} | {label} | | | | | no: {f['refused'][:120]} |")
        else:
          per, totals = f["per_device"], f["totals"]
          mib = 1024**2
          state = (
            f"{per['opt_state'] / mib:.1f} MiB ({totals['opt_state'] / mib:,.0f} / "
            f"{f['opt_state_devices']:.1f})"
          )
          lines.append(
            f"| {where} | {name} | {label} | {_gib(per['params'])} | {state} | "
            f"{_gib(per['temporaries'])} | {_gib(per['peak'])} | yes |"
          )
        where = ""
  ladder = results["ladder"]
  if ladder.get("optimizers"):
    lines += [
      "",
      f"The largest decoder whose step compiles on {ladder['topology']}, at the 8B config's "
      "batch (256 x 2048 tokens) and mesh (data x model = chips/4 x 4), of "
      + ", ".join(
        f"{s} ({ladder['sizes'][s] / 1e9:.1f}B)" if s in ladder["sizes"] else s for s in LADDER
      )
      + " (`adafactor_jax/training/pods.py`'s LADDER), and the next size up, refused:",
      "",
      "| optimizer | largest that fits (peak GiB per chip) | next size up |",
      "|---|---|---|",
    ]
    for optimizer, per_size in ladder["optimizers"].items():
      fitting = [s for s, f in per_size.items() if "refused" not in f]
      refused = [s for s, f in per_size.items() if "refused" in f]
      fits = "none"
      if fitting:
        fits = f"{fitting[-1]} ({_gib(per_size[fitting[-1]]['per_device']['peak'])})"
      lines.append(
        f"| {LABELS.get(optimizer, optimizer)} | {fits} | "
        f"{refused[0] + ' refused' if refused else 'all compiled'} |"
      )
  return "\n".join(lines)


def summary_table(results: dict[str, Any]) -> str:
  """The README's: per optimizer, the peak HBM per chip of each config on each topology (or
  'does not fit'), and the largest decoder that fits on the ladder's topology."""
  topologies = results["topologies"]
  ladder = results["ladder"]
  columns = [(t, c) for t, entry in topologies.items() for c in entry["configs"]]
  header = [f"{c.removeprefix('decoder_')} on {t}" for t, c in columns]
  lines = [
    "| optimizer | " + " | ".join(header) + f" | largest on {ladder.get('topology', '-')} |",
    "|---|" + "--:|" * len(columns) + "---|",
  ]
  optimizers = list(dict.fromkeys(o for t, c in columns for o in topologies[t]["configs"][c]))
  for optimizer in optimizers:
    cells = []
    for topology, config in columns:
      f = topologies[topology]["configs"][config].get(optimizer)
      if f is None:
        cells.append("-")
      elif "refused" in f:
        cells.append("does not fit")
      else:
        cells.append(f"{_gib(f['per_device']['peak'])} GiB")
    per_size = ladder.get("optimizers", {}).get(optimizer, {})
    fitting = [s for s, f in per_size.items() if "refused" not in f]
    cells.append(fitting[-1] if fitting else "-")
    lines.append(f"| {LABELS.get(optimizer, optimizer)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
  parser.add_argument("--out", default=os.path.join("runs", "pods"))
  args = parser.parse_args(argv)
  optimizers = args.optimizers.split(",")
  unknown = [o for o in optimizers if o not in OPTIMIZERS]
  if unknown:
    parser.error(f"--optimizers: unknown {unknown}; known: {', '.join(OPTIMIZERS)}")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "pods.json")

  def save(results: dict[str, Any]) -> None:
    with open(path, "w") as f:
      json.dump(results, f, indent=1)

  try:
    results = run(args.topologies.split(","), optimizers, save)
  except compile_only.TopologyError as error:
    parser.exit(2, f"{parser.prog}: error: {error}\n")
  save(results)
  write_tables(results, args.out)
  print(readme_table(results))
  print(f"wrote {path}, pods.md and pods_summary.md", file=sys.stderr)
  return 0


def write_tables(results: dict[str, Any], out: str) -> None:
  """``pods.md`` and ``pods_summary.md`` in ``out``, from the results."""
  for name, render in (("pods.md", readme_table), ("pods_summary.md", summary_table)):
    with open(os.path.join(out, name), "w") as f:
      f.write(render(results) + "\n")


if __name__ == "__main__":
  sys.exit(main())
