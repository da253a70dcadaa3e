"""int8 against bfloat16 (or float32) momentum on the default job: the loss curves by seed.

The runs are the default job at the paper's defaults with momentum 0.9 stored in bfloat16
and in int8, seeds 0, 1 and 2, each in ``<runs>/<dtype>_seed<seed>``::

  for seed in 0 1 2; do for dtype in int8 bfloat16; do
    adafactor-train --config paper:defaults --workdir runs/int8_momentum/${dtype}_seed${seed} \
      --config.seed=$seed \
      --config.optimizer.momentum=0.9 --config.optimizer.momentum_dtype=$dtype
  done; done
  python -m benchmarks.int8_momentum --runs runs/int8_momentum

``--baseline float32`` reads float32 runs in place of bfloat16 ones, and ``--seeds`` any other
seeds (two or more; with two, the spread is signed, seed 1 − seed 0, else the largest minus the
smallest of each dtype's). It reads the runs' ``metrics.jsonl`` and ``summary.json`` and writes
the train and eval curves to ``docs/int8_momentum.png`` and the final losses to
``docs/results/int8_momentum.{json,md}`` (the documentation's table is generated from the .md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "int8")  # (baseline, int8): --baseline replaces the first
SEEDS = (0, 1, 2)
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


def plot(
  runs: dict[tuple[str, int], dict],
  path: Path,
  dtypes: tuple[str, str] = DTYPES,
  seeds: tuple[int, ...] = SEEDS,
) -> None:
  """The curves (int8's drawn over the baseline's, which they hide), then int8 − baseline
  against the baseline's seed spread, where a difference would show."""
  base = dtypes[0]
  fig = Figure(figsize=(15, 4))
  train_ax, eval_ax, diff_ax = fig.subplots(1, 3)
  colors = {base: "tab:blue", "int8": "tab:orange"}
  styles = dict(zip(seeds, ("-", "--", ":", "-."), strict=False))
  for (dtype, seed), run in runs.items():
    label = f"{dtype} momentum, seed {seed}"
    for ax, key, marker in ((train_ax, "train", ""), (eval_ax, "eval", "o")):
      steps, losses = zip(*run[key], strict=True)
      ax.plot(steps, losses, styles[seed], marker=marker, color=colors[dtype], label=label, ms=3)
  for key, color in (("eval", "tab:green"), ("train", "tab:purple")):
    for seed in seeds:
      steps = [t for t, _ in runs["int8", seed][key]]
      diff = [
        b - a for (_, a), (_, b) in zip(runs[base, seed][key], runs["int8", seed][key], strict=True)
      ]
      diff_ax.plot(steps, diff, styles[seed], color=color, label=f"{key}, seed {seed}")
    curves = [[loss for _, loss in runs[base, seed][key]] for seed in seeds]
    spread = [max(losses) - min(losses) for losses in zip(*curves, strict=True)]
    diff_ax.fill_between(steps, [-x for x in spread], spread, color=color, alpha=0.1)
  train_ax.set(title="train loss (mean of 50 steps)", xlabel="step", ylabel="loss (nats/byte)")
  eval_ax.set(title="eval loss (held-out files)", xlabel="step")
  diff_ax.set(
    title=f"int8 − {base} (shaded: ± {base}'s seed spread)", xlabel="step", ylabel="nats/byte"
  )
  for ax in (train_ax, eval_ax, diff_ax):
    ax.grid(alpha=0.3)
  eval_ax.legend(fontsize=8)
  diff_ax.legend(fontsize=8)
  fig.suptitle(f"Adafactor on the default job, momentum {MOMENTUM} stored in {base} or int8")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def table(
  runs: dict[tuple[str, int], dict],
  dtypes: tuple[str, str] = DTYPES,
  seeds: tuple[int, ...] = SEEDS,
) -> str:
  """Final losses by seed, int8 against the baseline, and the seeds' spread beside it."""
  base = dtypes[0]
  lines = [
    f"| seed | final eval loss, {base} momentum | int8 momentum | int8 − {base} "
    f"| final train loss, {base} momentum | int8 momentum | int8 − {base} |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for seed in seeds:
    cells = []
    for key in ("final_eval_loss", "final_train_loss"):
      baseline, int8 = runs[base, seed][key], runs["int8", seed][key]
      cells += [f"{baseline:.4f}", f"{int8:.4f}", f"{int8 - baseline:+.4f}"]
    lines.append(f"| {seed} | " + " | ".join(cells) + " |")
  cells = []
  for key in ("final_eval_loss", "final_train_loss"):
    if len(seeds) == 2:  # signed, as the two seeds' difference
      spreads = [runs[dtype, seeds[1]][key] - runs[dtype, seeds[0]][key] for dtype in dtypes]
      cells += [f"{spreads[0]:+.4f}", f"{spreads[1]:+.4f}", ""]
    else:
      spreads = [
        max(runs[dtype, s][key] for s in seeds) - min(runs[dtype, s][key] for s in seeds)
        for dtype in dtypes
      ]
      cells += [f"{spreads[0]:.4f}", f"{spreads[1]:.4f}", ""]
  label = f"seed {seeds[1]} − seed {seeds[0]}" if len(seeds) == 2 else "largest − smallest"
  lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="runs/int8_momentum", help="the runs' parent directory")
  parser.add_argument("--out", default=str(ROOT / "docs"), help="where the chart and results go")
  parser.add_argument("--baseline", default=DTYPES[0], help="the dtype int8 is compared with")
  parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds")
  args = parser.parse_args(argv)
  root, out = Path(args.runs), Path(args.out)
  dtypes = (args.baseline, "int8")
  seeds = tuple(int(s) for s in args.seeds.split(","))
  if len(seeds) < 2:
    parser.error("--seeds needs two seeds or more, for a spread")
  runs = {}
  for seed in seeds:
    for dtype in dtypes:
      runs[dtype, seed] = read_run(root / f"{dtype}_seed{seed}")
  (out / "results").mkdir(parents=True, exist_ok=True)
  plot(runs, out / "int8_momentum.png", dtypes, seeds)
  results = {f"{dtype}_seed{seed}": run for (dtype, seed), run in runs.items()}
  (out / "results" / "int8_momentum.json").write_text(json.dumps(results, indent=2) + "\n")
  (out / "results" / "int8_momentum.md").write_text(table(runs, dtypes, seeds))


if __name__ == "__main__":
  main()
