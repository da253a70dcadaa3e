"""int8 against float32 momentum on the default job: the loss curves of two seeds each.

The four runs are the default job at the paper's defaults with momentum 0.9 stored in float32
and in int8, seeds 0 and 1, each in ``<runs>/<dtype>_seed<seed>``::

  for seed in 0 1; do for dtype in float32 int8; do
    adafactor-train --config paper:defaults --workdir runs/int8_momentum/${dtype}_seed${seed} \
      --config.seed=$seed \
      --config.optimizer.momentum=0.9 --config.optimizer.momentum_dtype=$dtype
  done; done
  python -m benchmarks.int8_momentum --runs runs/int8_momentum

The last command reads their ``metrics.jsonl`` and ``summary.json`` and writes the train and
eval curves to ``docs/int8_momentum.png`` and the final losses to
``docs/results/int8_momentum.{json,md}`` (the README's table is generated from the .md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "int8")
SEEDS = (0, 1)
MOMENTUM = 0.9  # the runs' --config.optimizer.momentum, for the chart's title


def read_run(workdir: Path) -> dict:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  summary = json.loads((workdir / "summary.json").read_text())
  return {
    "train": [(r["step"], r["train_loss"]) for r in records if "train_loss" in r],
    "eval": [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r],
    "final_train_loss": summary["final_train_loss"],
    "final_eval_loss": summary["final_eval_loss"],
    "optimizer_state_bytes": summary["optimizer_state_bytes"],
  }


def plot(runs: dict[tuple[str, int], dict], path: Path) -> None:
  """The curves (int8's drawn over float32's, which they hide), then int8 − float32 against
  the seeds' spread, where a difference would show."""
  fig = Figure(figsize=(15, 4))
  train_ax, eval_ax, diff_ax = fig.subplots(1, 3)
  colors = {"float32": "tab:blue", "int8": "tab:orange"}
  styles = {0: "-", 1: "--"}
  for (dtype, seed), run in runs.items():
    label = f"{dtype} momentum, seed {seed}"
    for ax, key, marker in ((train_ax, "train", ""), (eval_ax, "eval", "o")):
      steps, losses = zip(*run[key], strict=True)
      ax.plot(steps, losses, styles[seed], marker=marker, color=colors[dtype], label=label, ms=3)
  for key, color in (("eval", "tab:green"), ("train", "tab:purple")):
    for seed in SEEDS:
      steps = [t for t, _ in runs["int8", seed][key]]
      diff = [
        b - a
        for (_, a), (_, b) in zip(runs["float32", seed][key], runs["int8", seed][key], strict=True)
      ]
      diff_ax.plot(steps, diff, styles[seed], color=color, label=f"{key}, seed {seed}")
    spread = [
      abs(b - a)
      for (_, a), (_, b) in zip(runs["float32", 0][key], runs["float32", 1][key], strict=True)
    ]
    diff_ax.fill_between(steps, [-x for x in spread], spread, color=color, alpha=0.1)
  train_ax.set(title="train loss (mean of 50 steps)", xlabel="step", ylabel="loss (nats/byte)")
  eval_ax.set(title="eval loss (held-out files)", xlabel="step")
  diff_ax.set(
    title="int8 − float32 (shaded: ± float32's seed 1 − seed 0)", xlabel="step", ylabel="nats/byte"
  )
  for ax in (train_ax, eval_ax, diff_ax):
    ax.grid(alpha=0.3)
  eval_ax.legend(fontsize=8)
  diff_ax.legend(fontsize=8)
  fig.suptitle(f"Adafactor on the default job, momentum {MOMENTUM} stored in float32 or int8")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def table(runs: dict[tuple[str, int], dict]) -> str:
  """Final losses by seed, int8 against float32, and the seeds' spread beside it."""
  lines = [
    "| seed | final eval loss, float32 momentum | int8 momentum | int8 − float32 "
    "| final train loss, float32 momentum | int8 momentum | int8 − float32 |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for seed in SEEDS:
    cells = []
    for key in ("final_eval_loss", "final_train_loss"):
      f32, int8 = runs["float32", seed][key], runs["int8", seed][key]
      cells += [f"{f32:.4f}", f"{int8:.4f}", f"{int8 - f32:+.4f}"]
    lines.append(f"| {seed} | " + " | ".join(cells) + " |")
  cells = []
  for key in ("final_eval_loss", "final_train_loss"):
    spreads = [runs[dtype, SEEDS[1]][key] - runs[dtype, SEEDS[0]][key] for dtype in DTYPES]
    cells += [f"{spreads[0]:+.4f}", f"{spreads[1]:+.4f}", ""]
  lines.append(f"| seed {SEEDS[1]} − seed {SEEDS[0]} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="runs/int8_momentum", help="the runs' parent directory")
  parser.add_argument("--out", default=str(ROOT / "docs"), help="where the chart and results go")
  args = parser.parse_args(argv)
  root, out = Path(args.runs), Path(args.out)
  runs = {}
  for seed in SEEDS:
    for dtype in DTYPES:
      runs[dtype, seed] = read_run(root / f"{dtype}_seed{seed}")
  (out / "results").mkdir(parents=True, exist_ok=True)
  plot(runs, out / "int8_momentum.png")
  results = {f"{dtype}_seed{seed}": run for (dtype, seed), run in runs.items()}
  (out / "results" / "int8_momentum.json").write_text(json.dumps(results, indent=2) + "\n")
  (out / "results" / "int8_momentum.md").write_text(table(runs))


if __name__ == "__main__":
  main()
