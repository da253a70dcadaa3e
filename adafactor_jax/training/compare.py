"""Train several configs on the same data and compare them: a table, JSON and a PNG chart.

Usage::

  adafactor-compare [--suite default|paper|switch|fair] [--workdir runs/compare] [--num_steps N]
                    [--rows ROW,...] [--ledger DIR [--from_ledger]] [--noprogress]
                    [--config.<key>=<value> ...]
  python -m adafactor_jax.training.compare ...      # the same

Suites:

* ``default``: the default job's Adafactor and Adafactor at the paper's defaults, AdamW at
  three learning rates, and the Big Vision variant, on the default job: a quick look; the fair
  suite is the comparison.
* ``paper``: the ablation rows of ``configs/paper.py`` (shorter runs).
* ``switch``: AdamW for the whole job, and from its halfway checkpoint Adafactor at the
  paper's defaults, started cold and warm (``--config.optimizer.switch_from``): the jump in
  train loss after the switch, against AdamW going on.
* ``fair``: every optimizer under one protocol (:mod:`adafactor_jax.training.sweep`):
  learning-rate sweeps on seed 0 extended until bracketed, the best rerun on seeds 1, 2 and 3
  (reported, with Welch's t-test of each row against the best AdamW), the band of near-best
  learning rates; Adafactor at the paper's defaults as the untuned reference.

``--config.<key>=<value>`` sets a key of every run's config, as for
``adafactor-train``. Each run has its own workdir under ``--workdir``;
rerunning the command resumes unfinished runs and reuses finished ones. The results go to
``<workdir>/<suite>.json``, ``<suite>.md`` and ``<suite>.png``.

``--ledger DIR`` keeps each finished run's result (its config, summary and curves: a few KB,
against a workdir's megabytes of checkpoints) in ``DIR/<run name>.json``; a run whose
entry holds its exact config is read from there instead of trained. Committed, a ledger
lets another machine redo a suite's tables, or go on with its runs, without the workdirs.
``--from_ledger`` trains nothing: the suite's files from the ledger's runs alone, without the
runs it lacks (in the fair suite, without the rows that lack a run), which it names; with
``--rows``, the files of those rows alone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from typing import Any

import ml_collections
from absl import flags
from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

from adafactor_jax.training import input_pipeline, sweep, train
from adafactor_jax.training.config import (
  TRAINER_KEYS,
  ConfigError,
  flatten,
  optimizer_arguments,
  override_values,
  set_config_value,
)
from adafactor_jax.training.configs import adamw, big_vision, default, paper
from adafactor_jax.training.workdir import upgrade

ADAMW_LEARNING_RATES = (1e-3, 3e-3, 1e-2)
PAPER_STEPS = 300
SWITCH_WINDOW = 50
"""Steps before and after the switch over which the switch suite measures the loss's jump."""
SUITES = ("default", "paper", "switch", "fair")


def suite_configs(suite: str) -> dict[str, Any]:
  """Run name to config, for a suite."""
  if suite == "default":
    runs = {"adafactor": default.get_config(), "adafactor_paper": paper.get_config()}
    for lr in ADAMW_LEARNING_RATES:
      config = adamw.get_config()
      config.optimizer.learning_rate = lr
      runs[f"adamw_lr{lr:g}"] = config
    runs["big_vision"] = big_vision.get_config()
    return runs
  if suite == "paper":
    runs = {row: paper.get_config(row) for row in paper.ROWS}
    for config in runs.values():
      config.num_steps = PAPER_STEPS
      config.eval_every = 100
      config.checkpoint_every = PAPER_STEPS
    return runs
  if suite == "switch":
    # AdamW for the whole run, then Adafactor from its halfway checkpoint, cold and warm; every
    # step logged, and every checkpoint kept (the halfway one is where the switches start).
    runs = {"adamw": adamw.get_config()}
    for name, warm in (("adafactor_cold", False), ("adafactor_warm", True)):
      config = runs[name] = paper.get_config()
      config.optimizer.switch_from, config.optimizer.warm_start = "adamw", warm
    for config in runs.values():
      config.log_every, config.keep_checkpoints = 1, 4
      config.checkpoint_every = config.num_steps // 4
    return runs
  raise ValueError(f"--suite must be one of {SUITES}, got {suite!r}.")


def run_suite(
  suite: str,
  workdir: str,
  num_steps: int | None = None,
  progress: bool = True,
  overrides: dict[str, Any] | None = None,
  rows: list[str] | None = None,
  ledger: str | None = None,
  from_ledger: bool = False,
) -> list[dict[str, Any]]:
  """Trains every run of a suite (resuming where a workdir has one) and returns their results.

  Args:
    suite: one of SUITES.
    workdir: each run goes to ``<workdir>/<suite>/<run name>``.
    num_steps: if given, every run's length (warmups shrink to fit).
    progress: show progress bars and summaries.
    overrides: dotted config keys set on every run, e.g. ``{"model.d_model": 32}``; an
      optimizer's argument on the runs whose optimizer takes it.
    rows: the fair suite's rows to run (default all: ``sweep.ROWS``).
    ledger: a folder of finished runs' results, read before training a run and written after
      (``<ledger>/<run name>.json``); a run is read from it only where its config is exactly
      the one recorded.
    from_ledger: train nothing: read every run from ``ledger``, and leave out the runs it
      lacks (in the fair suite, the rows with a run it lacks).
  """
  if rows is not None and suite != "fair":
    raise ConfigError(f"--rows picks rows of --suite=fair, not of --suite={suite}.")
  if from_ledger and ledger is None:
    raise ConfigError("--from_ledger reads every run from --ledger: pass --ledger=DIR too.")
  if ledger is not None and suite == "switch":
    raise ConfigError(
      "--ledger cannot stand in for --suite=switch's workdirs: its switched runs start from "
      "the halfway checkpoint of the run they switch from."
    )

  def configure(config: Any) -> None:
    for key, value in (overrides or {}).items():
      section, _, leaf = key.partition(".")
      arguments = optimizer_arguments(config.optimizer.name)
      if section == "optimizer" and leaf not in TRAINER_KEYS and leaf not in arguments:
        continue  # an argument of the suite's other optimizers
      set_config_value(config, key, value)
    if num_steps is not None:  # short runs, for smoke tests: warmups shrink to fit
      config.num_steps = num_steps
      config.checkpoint_every = max(1, num_steps // 4) if suite == "switch" else num_steps
      config.log_every = math.gcd(config.checkpoint_every, config.log_every)
      config.eval_every = min(config.eval_every, num_steps)
      config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, num_steps // 5)

  def run(config: Any, name: str) -> dict[str, Any]:
    if progress:
      print(f"\n=== {suite}/{name}", flush=True)
    entry = None if ledger is None else os.path.join(ledger, name + ".json")
    recorded = None if entry is None else _recorded_result(entry, config)
    if recorded is not None:
      if progress:
        print(f"{entry} holds this run, finished: final eval loss {recorded['final_eval_loss']}")
      return recorded
    if from_ledger:
      raise sweep.MissingRun(name)
    run_dir = os.path.join(workdir, suite, name)
    if config.optimizer.switch_from is not None and not os.path.exists(run_dir):
      _halfway_copy(os.path.join(workdir, suite, config.optimizer.switch_from), run_dir)
    summary = train.train_and_evaluate(config, run_dir, progress=progress)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
      curve = [json.loads(line) for line in f]
    eval_curve = [(r["step"], r["eval_loss"]) for r in curve if "eval_loss" in r]
    train_curve = [(r["step"], r["train_loss"]) for r in curve if "train_loss" in r]
    result = {"name": name, **summary, "eval_curve": eval_curve, "train_curve": train_curve}
    if entry is not None:
      os.makedirs(os.path.dirname(entry), exist_ok=True)
      with open(entry + ".tmp", "w") as f:
        json.dump({"config": json.loads(config.to_json()), "result": result}, f, indent=1)
      os.replace(entry + ".tmp", entry)  # a ledger read mid-write holds the old entry or none
    return result

  if suite == "fair":
    results = sweep.run_protocol(run, configure, rows)
  else:
    results = []
    for name, config in suite_configs(suite).items():
      configure(config)
      try:
        results.append(run(config, name))
      except sweep.MissingRun:
        continue
  if from_ledger and not results:  # an empty table would say nothing
    raise ConfigError(f"--from_ledger: {ledger} holds no complete row of --suite={suite}.")
  return results


def _recorded_result(entry: str, config: Any) -> dict[str, Any] | None:
  """The result a ledger entry holds, if it exists and holds this exact config (read as this
  version writes configs, :func:`~adafactor_jax.training.workdir.upgrade`); else None."""
  try:
    with open(entry) as f:
      recorded = json.load(f)
  except FileNotFoundError:
    return None
  current = flatten(ml_collections.ConfigDict(json.loads(config.to_json())))
  if flatten(upgrade(recorded["config"])) != current:
    return None
  result = recorded["result"]
  curves = ("eval_curve", "train_curve")  # JSON has no tuples: their pairs come back as lists
  return {**result, **{k: [tuple(pair) for pair in result[k]] for k in curves}}


def _halfway_copy(source: str, destination: str) -> None:
  """A copy of a finished run's workdir as a run stopped at its halfway checkpoint leaves it."""
  steps = sorted(
    int(name) for name in os.listdir(os.path.join(source, "checkpoints")) if name.isdigit()
  )
  halfway = steps[len(steps) // 2 - 1]
  shutil.copytree(source, destination)
  for step in steps:
    if step > halfway:
      shutil.rmtree(os.path.join(destination, "checkpoints", str(step)))
  os.remove(os.path.join(destination, "summary.json"))


def switch_jump(result: dict[str, Any], switch_step: int) -> tuple[float, float]:
  """(mean train loss over the SWITCH_WINDOW steps up to the switch, the largest rise above
  it in the SWITCH_WINDOW steps after), from a run's per-step train losses (a short run: as
  many steps as there are)."""
  losses = dict(result["train_curve"])
  window = min(SWITCH_WINDOW, switch_step, max(losses) - switch_step)
  before = [losses[t] for t in range(switch_step - window + 1, switch_step + 1)]
  after = [losses[t] for t in range(switch_step + 1, switch_step + window + 1)]
  level = sum(before) / len(before)
  return level, max(after) - level


def switch_step(results: list[dict[str, Any]]) -> int:
  return next(r["switched_from"]["step"] for r in results if r.get("switched_from"))


def best_adamw(results: list[dict[str, Any]]) -> dict[str, Any] | None:
  adamws = [r for r in results if r["optimizer"] == "adamw" and _finite(r["final_eval_loss"])]
  return min(adamws, key=lambda r: r["final_eval_loss"]) if adamws else None


def _finite(x: float | None) -> bool:
  return x is not None and math.isfinite(x)


def table(results: list[dict[str, Any]]) -> str:
  """A markdown table; the gap is relative to the tuned (best) AdamW's eval loss."""
  reference = best_adamw(results) or results[0]
  rows = [
    f"| run | final eval loss | vs {reference['name']} | final train loss | wall time (s) "
    "| optimizer state (bytes) | state / AdamW's |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    gap = (r["final_eval_loss"] / reference["final_eval_loss"] - 1) * 100
    rows.append(
      f"| {r['name']} | {r['final_eval_loss']:.4f} | {gap:+.2f}% | {r['final_train_loss']:.4f} "
      f"| {r['wall_time_sec']:.0f} | {r['optimizer_state_bytes']:,} "
      f"| {100 * r['optimizer_state_bytes'] / r['adamw_state_bytes']:.2f}% |"
    )
  return "\n".join(rows)


def switch_table(results: list[dict[str, Any]]) -> str:
  """The switch suite's table: the loss's jump after the switch, against AdamW going on."""
  step = switch_step(results)
  rows = [
    f"| run | train loss, {SWITCH_WINDOW} steps to step {step} | largest jump in the "
    f"{SWITCH_WINDOW} steps after | final train loss | final eval loss | optimizer state (bytes) |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for r in results:
    level, jump = switch_jump(r, step)
    rows.append(
      f"| {r['name']} | {level:.4f} | {jump:+.4f} | {r['final_train_loss']:.4f} "
      f"| {r['final_eval_loss']:.4f} | {r['optimizer_state_bytes']:,} |"
    )
  return "\n".join(rows)


def switch_chart(results: list[dict[str, Any]], path: str, title: str) -> None:
  """Train loss around the switch: every step faint, a running mean of 10 steps bold."""
  step = switch_step(results)
  fig = Figure(figsize=(10, 4.5))
  ax = fig.subplots()
  for r, color in zip(results, ("tab:gray", "tab:red", "tab:blue"), strict=False):
    points = [(t, loss) for t, loss in r["train_curve"] if step - 100 < t <= step + 200]
    steps, losses = zip(*points, strict=True)
    ax.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
    smooth = [
      sum(losses[max(0, i - 9) : i + 1]) / len(losses[max(0, i - 9) : i + 1])
      for i in range(len(losses))
    ]
    ax.plot(steps, smooth, color=color, linewidth=1.8, label=r["name"])
  ax.axvline(step, color="black", linestyle=":", linewidth=1, label=f"switch at step {step}")
  ax.set(xlabel="step", ylabel="train loss (nats/byte)", title=title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def chart(results: list[dict[str, Any]], path: str, title: str) -> None:
  fig = Figure(figsize=(12, 4.5))
  curves, state = fig.subplots(1, 2, width_ratios=(3, 2))
  for r in results:
    if r["eval_curve"]:
      curves.plot(*zip(*r["eval_curve"], strict=True), "o-", markersize=3, label=r["name"])
  finite = [loss for r in results for _, loss in r["eval_curve"] if _finite(loss)]
  if finite:
    curves.set_ylim(min(finite) * 0.97, min(max(finite), 2.5 * min(finite)))
  curves.set(xlabel="step", ylabel="eval loss (nats/byte)", title=title)
  curves.grid(alpha=0.3)
  curves.legend(fontsize=7)
  names = [r["name"] for r in results]
  # A linear axis from zero, so that bar lengths compare; the labels give the small ones.
  shares = [100 * r["optimizer_state_bytes"] / r["adamw_state_bytes"] for r in results]
  bars = state.barh(names, shares)
  state.bar_label(bars, labels=[f"{share:.2f}%" for share in shares], fontsize=7, padding=2)
  state.set(xlim=(0, 1.15 * max(shares)), xlabel="optimizer state, % of AdamW's")
  state.invert_yaxis()
  state.tick_params(axis="y", labelsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


RENDERERS = {"switch": (switch_table, switch_chart), "fair": (sweep.table, sweep.chart)}
"""A suite's table and chart, where they are not :func:`table` and :func:`chart`."""

PROG = "adafactor-compare"


def main(argv: list[str] | None = None) -> int:
  """``adafactor-compare``: its flags in adafactor-train's style (absl: --noprogress)."""
  argv = list(sys.argv if argv is None else argv)
  flag_values = flags.FlagValues()
  flags.DEFINE_enum(
    "suite", "default", list(SUITES), "Which comparison to run.", flag_values=flag_values
  )
  flags.DEFINE_string(
    "workdir", "runs/compare", "Each run goes to <workdir>/<suite>/<run>.", flag_values=flag_values
  )
  flags.DEFINE_integer(
    "num_steps", None, "Override every run's steps.", lower_bound=1, flag_values=flag_values
  )
  flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=flag_values)
  flags.DEFINE_list(
    "rows",
    None,
    "The fair suite's rows to train, e.g. to train rows in parallel processes; only a run of "
    "every row writes the results, or a --from_ledger run, which writes those rows' alone.",
    flag_values=flag_values,
  )
  flags.DEFINE_string(
    "ledger",
    None,
    "A folder of finished runs' results (<ledger>/<run>.json), read before training a run and "
    "written after: committed, it lets another machine reuse the runs without their workdirs.",
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "from_ledger",
    False,
    "Train nothing: the suite's files from the --ledger's runs alone, leaving out the runs it "
    "lacks (in the fair suite, the rows with a run it lacks).",
    flag_values=flag_values,
  )
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv[1:]):
    print(f"{__doc__}\nFlags:\n{flag_values.get_help()}")
    return 0
  try:
    argv, overrides = override_values(argv, PROG)
    rest = flag_values(argv)
    if len(rest) > 1:
      raise flags.Error(f"unexpected argument {rest[1]!r}.")
    suite, workdir = flag_values.suite, flag_values.workdir
    rows = flag_values.rows
    results = run_suite(
      suite,
      workdir,
      flag_values.num_steps,
      flag_values.progress,
      overrides,
      rows,
      flag_values.ledger,
      flag_values.from_ledger,
    )
  except (flags.Error, ConfigError, input_pipeline.CorpusError) as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  render, draw = RENDERERS.get(suite, (table, chart))
  if rows is not None and not flag_values.from_ledger:
    # A part of the suite trained: its table, but the suite's files are the whole's. Read from
    # the ledger, the part is a table of its own (e.g. the rows run again for longer).
    print("\n" + render(results))
    return 0
  base = os.path.join(workdir, suite)
  os.makedirs(workdir, exist_ok=True)  # where a ledger held every run, nothing made it
  with open(base + ".json", "w") as f:
    json.dump(results, f, indent=2)
  # the overrides name the model size, so that charts of two sizes are told apart
  title = ", ".join(
    [f"suite {suite!r}: {results[0]['steps']} steps", *(f"{k}={v}" for k, v in overrides.items())]
  )
  text = render(results) + left_out(suite, results, rows)
  with open(base + ".md", "w") as f:
    f.write(text + "\n")
  draw(results, base + ".png", title)
  print("\n" + text)
  print(f"\nwrote {base}.json, {base}.md and {base}.png")
  return 0


def left_out(suite: str, results: list[dict[str, Any]], rows: list[str] | None = None) -> str:
  """A line under the table naming the rows it lacks (--from_ledger), or '': of ``rows`` where
  given, else of the whole suite."""
  if rows is not None:
    expected = list(rows)
  elif suite == "fair":
    expected = [row.name for row in sweep.ROWS]
  else:
    expected = list(suite_configs(suite))
  present = {r["name"] for r in results}
  missing = [name for name in expected if name not in present]
  if not missing:
    return ""
  return f"\n\nLeft out, their runs not all in the ledger yet: {', '.join(missing)}."


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
