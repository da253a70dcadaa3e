"""The largest model that fits: peak memory of a whole train step, compiled abstractly.

Usage::

  python -m benchmarks.memory [--sizes all] [--optimizers sgd,optax_adamw,...]
      [--dtypes float32,bfloat16] [--out benchmarks/results] [--topology v5e:2x2,...]

For GPT-2-like decoders of growing size (``benchmarks/gpt.py``: layers stacked and
scanned, each rematerialized; a fixed batch of 4 sequences of 512 tokens), each optimizer's
whole train step (forward, backward, update; parameters and state donated) is lowered on
``jax.ShapeDtypeStruct``s and compiled, nothing allocated, and XLA's
``compiled.memory_analysis()`` gives its peak: arguments + temporaries + outputs - the
outputs aliased to donated arguments. The largest model that fits a budget is interpolated
linearly in parameters between the two sizes around it. Writes ``memory.json`` and
``memory.png`` to ``--out``; ``python -m benchmarks.readme`` writes the README's table
from the JSON. With ``--topology v5e:2x2,...`` the step is compiled by the TPU compiler for
one device of each topology instead (``benchmarks/memory_tpu.py``: ``memory_tpu.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adafactor_jax
from benchmarks import gpt, tpu
from benchmarks.run import environment, parse_names, sgd

GIB = 2**30
BUDGETS = {"16 GiB": 16 * GIB, "80 GiB": 80 * GIB}
BATCH, SEQ_LEN = 4, 512

SIZES: dict[str, gpt.Config] = {
  f"{name}": gpt.Config(d_model=d, n_layers=n, batch=BATCH, seq_len=SEQ_LEN)
  for name, d, n in (
    ("d768-L12", 768, 12),
    ("d1536-L16", 1536, 16),
    ("d2048-L20", 2048, 20),
    ("d2560-L24", 2560, 24),
    ("d3072-L28", 3072, 28),
    ("d4096-L32", 4096, 32),
    ("d5120-L40", 5120, 40),
    ("d6144-L48", 6144, 48),
    ("d8192-L64", 8192, 64),
  )
}
"""GPT-like shapes, 0.12B to 52B parameters (vocabulary 50304, 512 positions)."""


def _adafactor(**kwargs: Any) -> optax.GradientTransformation:
  return adafactor_jax.adafactor(learning_rate=1e-2, factor_dims=gpt.factor_dims, **kwargs)


def _adafactor_layer(**kwargs: Any) -> optax.GradientTransformation:
  return adafactor_jax.adafactor(learning_rate=1e-2, **kwargs)


OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  "sgd": sgd,
  "optax_adamw": lambda: optax.adamw(1e-3),
  "optax_adafactor": lambda: optax.adafactor(1e-2),
  "adafactor_jax": _adafactor,
  "adafactor_jax_bf16_momentum": lambda: _adafactor(momentum=0.9, momentum_dtype=jnp.bfloat16),
  "adafactor_jax_int8_momentum": lambda: _adafactor(momentum=0.9, momentum_dtype=jnp.int8),
  "adafactor_jax_fused": _adafactor_layer,
}
"""The optimizers, by name; ``*_fused`` ones run in ``adafactor_jax.fused_train_step``."""

LABELS = {
  "sgd": "SGD",
  "optax_adamw": "optax.adamw",
  "optax_adafactor": "optax.adafactor",
  "adafactor_jax": "adafactor_jax",
  "adafactor_jax_bf16_momentum": "adafactor_jax, bf16 momentum",
  "adafactor_jax_int8_momentum": "adafactor_jax, int8 momentum",
  "adafactor_jax_fused": "**adafactor_jax, fused into the backward pass**",
}


def unfused_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
  """The usual train step: the whole gradient, then the update."""

  def step(params: Any, state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(gpt.loss)(params, tokens)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def compile_train_step(
  name: str, config: gpt.Config, dtype: Any, device: Any = None
) -> jax.stages.Compiled:
  """The named optimizer's whole train step for ``config``, compiled from shapes alone, for
  the default backend or, given one of a topology's devices (``tpu.devices``), for it."""
  tx = OPTIMIZERS[name]()

  def place(tree: Any) -> Any:
    return tree if device is None else tpu.on_device(tree, device)

  layers, rest = place(gpt.param_shapes(config, dtype))
  tokens = place(gpt.batch_shape(config))
  if name.endswith("_fused"):
    fused = adafactor_jax.fused_train_step(tx, embed=gpt.embed, layer=gpt.layer, head=gpt.head)
    state = place(jax.eval_shape(fused.init, layers, rest))
    jitted = jax.jit(fused.step, donate_argnums=(0, 1, 2))
    return jitted.lower(layers, rest, state, tokens).compile()
  state = place(jax.eval_shape(tx.init, (layers, rest)))
  jitted = jax.jit(unfused_step(tx), donate_argnums=(0, 1))
  return jitted.lower((layers, rest), state, tokens).compile()


def peak_bytes(compiled: jax.stages.Compiled) -> dict[str, int]:
  """XLA's figures of a compiled step and its peak, in bytes."""
  analysis = compiled.memory_analysis()
  figures = {
    "arguments": int(analysis.argument_size_in_bytes),
    "temporaries": int(analysis.temp_size_in_bytes),
    "outputs": int(analysis.output_size_in_bytes),
    "aliased": int(analysis.alias_size_in_bytes),
  }
  figures["peak"] = (
    figures["arguments"] + figures["temporaries"] + figures["outputs"] - figures["aliased"]
  )
  return figures


def largest_that_fits(points: Sequence[tuple[int, int]], budget: float) -> dict[str, Any]:
  """From (params, peak) per size, increasing: the largest size at or under ``budget``, and
  the parameter count where the peak reaches it, linear between the sizes around it."""
  fitting = [(n, peak) for n, peak in points if peak <= budget]
  result: dict[str, Any] = {"largest_size_params": fitting[-1][0] if fitting else None}
  interpolated = None
  for (n0, p0), (n1, p1) in zip(points, points[1:], strict=False):
    if p0 <= budget < p1:
      interpolated = n0 + (n1 - n0) * (budget - p0) / (p1 - p0)
  if fitting and fitting[-1] == points[-1]:
    interpolated = None  # beyond the largest size measured
  result["params_at_budget"] = interpolated
  return result


def run(sizes: Sequence[str], optimizers: Sequence[str], dtypes: Sequence[str]) -> dict[str, Any]:
  """Every figure: peak per size, dtype and optimizer, and the largest that fits."""
  results: dict[str, Any] = {
    "environment": environment(),
    "settings": {"batch": BATCH, "seq_len": SEQ_LEN, "vocab": gpt.Config(1, 1).vocab},
    "budgets": BUDGETS,
    "sizes": {name: {**SIZES[name]._asdict(), "params": SIZES[name].params} for name in sizes},
    "peaks": {},
    "largest": {},
  }
  for dtype in dtypes:
    results["peaks"][dtype] = {}
    for name in optimizers:
      per_size = {}
      for size in sizes:
        start = time.perf_counter()
        per_size[size] = peak_bytes(compile_train_step(name, SIZES[size], jnp.dtype(dtype)))
        print(
          f"{dtype} {name} {size}: peak {per_size[size]['peak'] / GIB:.2f} GiB "
          f"({time.perf_counter() - start:.1f} s)",
          file=sys.stderr,
          flush=True,
        )
      results["peaks"][dtype][name] = per_size
  for dtype, per_optimizer in results["peaks"].items():
    results["largest"][dtype] = {}
    for name, per_size in per_optimizer.items():
      points = [(SIZES[s].params, per_size[s]["peak"]) for s in sizes]
      results["largest"][dtype][name] = {
        budget: largest_that_fits(points, value) for budget, value in BUDGETS.items()
      }
  return results


def _params(n: float | None) -> str:
  if n is None:
    return "—"
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def _machine(env: dict[str, Any]) -> str:
  """' on <cpu> (<n> cores)', where the JSON records the machine."""
  if not env.get("cpu"):
    return ""
  return f" on {env['cpu']} ({env['cpu_count']} cores)"


def readme_table(results: dict[str, Any]) -> str:
  """The README's table: per dtype and optimizer, the largest model at each budget and its
  ratio to AdamW's and SGD's, then the peak at the smallest size."""
  env, settings = results["environment"], results["settings"]
  sizes = list(results["sizes"])
  smallest = sizes[0]
  lines = [
    f"Computed {env['date'].replace('T', ' ')[:16]} UTC{_machine(env)} with jax {env['jax']} "
    f"(XLA:{env['platform'].upper()}'s memory analysis; nothing allocated), batch "
    f"{settings['batch']} x {settings['seq_len']} tokens, {len(sizes)} sizes from "
    f"{_params(results['sizes'][sizes[0]]['params'])} to "
    f"{_params(results['sizes'][sizes[-1]]['params'])} parameters:",
    "",
  ]
  budgets = list(results["budgets"])
  header = "| params | optimizer | " + " | ".join(
    f"largest at {b} | × AdamW | × SGD" for b in budgets
  )
  header += f" | peak at {_params(results['sizes'][smallest]['params'])} |"
  lines += [header, "|---|---|" + "--:|--:|--:|" * len(budgets) + "--:|"]
  for dtype, per_optimizer in results["largest"].items():
    first = dtype
    for name, by_budget in per_optimizer.items():
      cells = [first, LABELS.get(name, name)]
      for budget in budgets:
        n = by_budget[budget]["params_at_budget"]
        cells.append(_params(n))
        for reference in ("optax_adamw", "sgd"):
          ref = per_optimizer.get(reference, {}).get(budget, {}).get("params_at_budget")
          cells.append("—" if n is None or not ref else f"{n / ref:.2f}")
      peak = results["peaks"][dtype][name][smallest]["peak"]
      cells.append(f"{peak / GIB:.2f} GiB")
      lines.append("| " + " | ".join(cells) + " |")
      first = ""
  return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
  """Peak against parameters, a line per optimizer, one panel per dtype; budgets as lines."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  dtypes = list(results["peaks"])
  fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
  params = {name: size["params"] for name, size in results["sizes"].items()}
  for ax, dtype in zip(axes[0], dtypes, strict=True):
    for name, per_size in results["peaks"][dtype].items():
      xs = [params[s] for s in per_size]
      ys = [per_size[s]["peak"] / GIB for s in per_size]
      # SGD's line lies under adafactor_jax's: drawn dotted, on top.
      style = {"color": "black", "linestyle": ":", "zorder": 3} if name == "sgd" else {}
      ax.loglog(xs, ys, marker="o", label=LABELS.get(name, name).strip("*"), **style)
    for budget, value in results["budgets"].items():
      ax.axhline(value / GIB, color="black", linestyle="--", linewidth=0.8)
      ax.text(min(params.values()), value / GIB * 1.05, budget, fontsize=8)
    ax.set_xlabel("parameters")
    ax.set_ylabel("peak memory of the train step (GiB)")
    ax.set_title(f"{dtype} parameters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  settings = results["settings"]
  fig.suptitle(
    f"Whole train step, GPT-2-like, batch {settings['batch']} x {settings['seq_len']}, "
    f"jax {results['environment']['jax']}",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(
    prog="python -m benchmarks.memory", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--sizes", default="all", help=f"comma list of {', '.join(SIZES)}")
  parser.add_argument("--optimizers", default="all", help=f"comma list of {', '.join(OPTIMIZERS)}")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="parameter dtypes")
  parser.add_argument(
    "--out", default=os.path.join(os.path.dirname(__file__), "results"), help="output directory"
  )
  parser.add_argument(
    "--topology",
    help="comma list of TPU topologies (e.g. v5e:2x2,v4:2x2x1): compile for one chip of each "
    "with libtpu instead of XLA:CPU and write memory_tpu.json (benchmarks/memory_tpu.py)",
  )
  args = parser.parse_args(argv)
  sizes = parse_names(args.sizes, list(SIZES), "--sizes", parser)
  sizes.sort(key=lambda s: SIZES[s].params)
  optimizers = parse_names(args.optimizers, list(OPTIMIZERS), "--optimizers", parser)
  dtypes = parse_names(args.dtypes, ["float32", "bfloat16"], "--dtypes", parser)
  if args.topology:
    from benchmarks import memory_tpu

    try:
      for topology in args.topology.split(","):
        tpu.devices(topology)
    except tpu.TopologyError as error:
      parser.error(str(error))
    return memory_tpu.main(args.topology.split(","), sizes, optimizers, dtypes, args.out)
  results = run(sizes, optimizers, dtypes)
  print(readme_table(results))
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "memory.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(args.out, "memory.png"))
  print(f"wrote {os.path.join(args.out, 'memory.json')} and memory.png", file=sys.stderr)
  return results


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
