"""A fair comparison of optimizers: bracketed learning-rate sweeps, seeds, sensitivity.

The protocol (``adafactor-compare --suite fair``), the same for every optimizer:

* The same data, steps, batch and model, and the same schedule family: linear warmup
  (``WARMUP_FRACTION`` of the run), then cosine decay.
* Each tuned row sweeps its learning rate on a log grid a factor ``GRID_FACTOR`` apart,
  starting from ``INITIAL_POINTS`` points around its own centre, and extends the grid one point
  at a time past whichever edge holds the best eval loss, until the best is inside
  (bracketed) or the row has ``MAX_POINTS``. A run that diverges counts as the worst.
* The best learning rate of each row is rerun with every seed of ``SEEDS`` (initialisation
  and data order): the table gives their mean and spread.
* Sensitivity: the band of learning rates whose eval loss (on the first seed) is within
  ``NEAR_BEST`` of the row's best, as the ratio of its ends, read off the sweep's curve
  interpolated linearly in log learning rate.

Every run has its own workdir, ``<workdir>/fair/<row>/lr<learning rate>_seed<seed>``:
rerunning the command resumes unfinished runs and reuses finished ones. So rows can train in
parallel processes (``--rows``, e.g. one process per core), and a last run of every row, which
only reads them, writes the results.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

from adafactor_jax.training.config import ConfigError
from adafactor_jax.training.configs import adamw, big_vision, default, paper

GRID_FACTOR = 2.0
INITIAL_POINTS = 3
MAX_POINTS = 9
SEEDS = (0, 1, 2)
NEAR_BEST = 0.02
WARMUP_FRACTION = 0.05

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
"""``(config, run name) -> result`` with at least ``final_eval_loss``: trains or reuses a run."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One optimizer of the comparison.

  Attributes:
    name: the row's name, and its folder.
    config: its config (any learning rate in it is replaced by the sweep's).
    centre: the middle of its first grid; None for a reference row that is not tuned.
  """

  name: str
  config: Callable[[], ml_collections.ConfigDict]
  centre: float | None


def _tuned(base: Callable[[], ml_collections.ConfigDict], **optimizer: Any) -> Callable[[], Any]:
  def config() -> ml_collections.ConfigDict:
    c = base()
    c.optimizer.schedule = "cosine"
    c.optimizer.warmup_steps, c.optimizer.warmup_fraction = 0, WARMUP_FRACTION
    c.optimizer.update(optimizer)
    return c

  return config


ROWS = (
  Row("adafactor_paper", paper.get_config, None),
  Row("adafactor", _tuned(default.get_config), 4e-2),
  Row(
    "adafactor_bf16_momentum",
    _tuned(default.get_config, momentum=0.9, momentum_dtype="bfloat16"),
    4e-2,
  ),
  Row("big_vision", _tuned(big_vision.get_config), 3e-3),
  Row("adamw_b2_0.95", _tuned(adamw.get_config, b2=0.95), 8e-3),
  Row("adamw_b2_0.999", _tuned(adamw.get_config, b2=0.999), 8e-3),
  Row(
    "optax_adafactor",
    _tuned(default.get_config, name="optax_adafactor", telemetry=False),
    4e-2,
  ),
)
"""Adafactor at the paper's defaults (the untuned reference); this library's Adafactor tuned
(learning rate times the parameter scale, no momentum; with bfloat16 momentum); the Big
Vision variant; AdamW with either β2; optax.adafactor tuned the same way. The centres come from
single runs on the default job (issue 14's table: Adafactor best at 5e-2 of 1e-2..1e-1, AdamW
at 1e-2 of 1e-3..4e-2); they only save runs, since every sweep is extended until bracketed."""


def _run_config(row: Row, learning_rate: float | None, seed: int) -> ml_collections.ConfigDict:
  config = row.config()
  config.seed = seed
  if learning_rate is not None:
    config.optimizer.learning_rate = learning_rate
  return config


def _loss(result: dict[str, Any]) -> float:
  loss = result["final_eval_loss"]
  return loss if loss is not None and math.isfinite(loss) else math.inf


def sweep(row: Row, train: TrainFn, configure: Callable[[Any], None]) -> dict[str, Any]:
  """Sweeps one row's learning rate until bracketed, then reruns the best on every seed.

  ``configure`` adjusts each run's config before it trains (steps, model size).
  """

  def run(learning_rate: float | None, seed: int) -> dict[str, Any]:
    config = _run_config(row, learning_rate, seed)
    configure(config)
    label = "paper" if learning_rate is None else f"lr{learning_rate:.4g}"
    return train(config, f"{row.name}/{label}_seed{seed}")

  if row.centre is None:
    seeds = [run(None, seed) for seed in SEEDS]
    return _row_result(row, None, {}, seeds, bracketed=None)
  half = INITIAL_POINTS // 2
  points = {k: run(row.centre * GRID_FACTOR**k, SEEDS[0]) for k in range(-half, half + 1)}
  while True:
    best = min(points, key=lambda k: (_loss(points[k]), k))
    edge = min(points) if best == min(points) else max(points) if best == max(points) else None
    if edge is None or len(points) >= MAX_POINTS:
      break
    k = edge - 1 if edge == min(points) else edge + 1
    points[k] = run(row.centre * GRID_FACTOR**k, SEEDS[0])
  best_lr = row.centre * GRID_FACTOR**best
  seeds = [points[best], *(run(best_lr, seed) for seed in SEEDS[1:])]
  curve = {row.centre * GRID_FACTOR**k: points[k] for k in sorted(points)}
  return _row_result(row, best_lr, curve, seeds, bracketed=min(points) < best < max(points))


def _row_result(
  row: Row,
  learning_rate: float | None,
  curve: dict[float, dict[str, Any]],
  seeds: list[dict[str, Any]],
  bracketed: bool | None,
) -> dict[str, Any]:
  losses = [_loss(r) for r in seeds]
  sweep_losses = {lr: _loss(r) for lr, r in curve.items()}
  return {
    "name": row.name,
    "optimizer": seeds[0]["optimizer"],
    "learning_rate": learning_rate,
    "bracketed": bracketed,
    "sweep": sorted(sweep_losses.items()),
    "seed_losses": losses,
    "mean": statistics.fmean(losses),
    "std": statistics.stdev(losses) if all(map(math.isfinite, losses)) else math.nan,
    "band": near_best_band(sweep_losses),
    "steps": seeds[0]["steps"],
    "optimizer_state_bytes": seeds[0]["optimizer_state_bytes"],
    "adamw_state_bytes": seeds[0]["adamw_state_bytes"],
  }


def near_best_band(losses: dict[float, float]) -> dict[str, Any] | None:
  """The learning rates whose loss is within NEAR_BEST of the best: ``low``, ``high``, their
  ratio ``width``, and whether each end is ``closed`` (the curve, linear in log learning
  rate, crosses the threshold inside the sweep) or open (at the sweep's edge: a lower bound).
  """
  finite = sorted((lr, loss) for lr, loss in losses.items() if math.isfinite(loss))
  if not finite:
    return None
  threshold = (1 + NEAR_BEST) * min(loss for _, loss in finite)
  points = sorted(losses.items())
  best = min(range(len(points)), key=lambda i: points[i][1])

  def edge(step: int) -> tuple[float, bool]:
    i = best
    while 0 <= i + step < len(points) and points[i + step][1] <= threshold:
      i += step
    if not 0 <= i + step < len(points):
      return points[i][0], False
    (lr_in, in_loss), (lr_out, out_loss) = points[i], points[i + step]
    if not math.isfinite(out_loss):  # diverged: the band ends at the last finite point
      return lr_in, True
    fraction = (threshold - in_loss) / (out_loss - in_loss)
    return math.exp(math.log(lr_in) + fraction * (math.log(lr_out) - math.log(lr_in))), True

  (low, low_closed), (high, high_closed) = edge(-1), edge(+1)
  return {
    "low": low,
    "high": high,
    "width": high / low,
    "closed": low_closed and high_closed,
  }


def run_protocol(
  train: TrainFn, configure: Callable[[Any], None], rows: Sequence[str] | None = None
) -> list[dict[str, Any]]:
  """The rows of ROWS named in ``rows`` (default: all, in order) through :func:`sweep`."""
  names = [row.name for row in ROWS]
  unknown = sorted(set(rows or ()) - set(names))
  if unknown:
    raise ConfigError(
      f"--rows: no row named {', '.join(map(repr, unknown))}; the rows are {names}."
    )
  return [sweep(row, train, configure) for row in ROWS if rows is None or row.name in rows]


def _best_adamw(rows: list[dict[str, Any]]) -> dict[str, Any]:
  adamws = [r for r in rows if r["optimizer"] == "adamw"]
  return min(adamws or rows, key=lambda r: r["mean"])


def table(rows: list[dict[str, Any]]) -> str:
  """The protocol's markdown table; gaps are against the best AdamW row's mean."""
  reference = _best_adamw(rows)
  lines = [
    f"| row | learning rate | points swept | eval loss, mean ± std over {len(SEEDS)} seeds "
    f"| vs {reference['name']} | within {NEAR_BEST:.0%} of best: LR band | state / AdamW's |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    if r["learning_rate"] is None:
      lr, swept, band = "paper's ρ_t", "—", "—"
    else:
      lr = f"{r['learning_rate']:.3g}" + ("" if r["bracketed"] else " (edge)")
      swept = str(len(r["sweep"]))
      band = (
        "—"
        if r["band"] is None
        else f"{'' if r['band']['closed'] else '≥ '}×{r['band']['width']:.1f}"
      )
    gap = (r["mean"] / reference["mean"] - 1) * 100
    lines.append(
      f"| {r['name']} | {lr} | {swept} | {r['mean']:.4f} ± {r['std']:.4f} | {gap:+.2f}% "
      f"| {band} | {100 * r['optimizer_state_bytes'] / r['adamw_state_bytes']:.2f}% |"
    )
  return "\n".join(lines)


def chart(rows: list[dict[str, Any]], path: str, title: str) -> None:
  """Eval loss against learning rate, a line per tuned row; the reference as a level."""
  fig = Figure(figsize=(9, 5))
  ax = fig.subplots()
  finite = []
  for r in rows:
    if r["learning_rate"] is None and math.isfinite(r["mean"]):
      ax.axhline(r["mean"], color="black", linestyle=":", label=f"{r['name']} (untuned)")
      finite.append(r["mean"])
    if r["learning_rate"] is None:
      continue
    lrs, losses = zip(*r["sweep"], strict=True)
    shown = [loss if math.isfinite(loss) else math.nan for loss in losses]
    (line,) = ax.plot(lrs, shown, "o-", markersize=4, label=r["name"])
    ax.errorbar(r["learning_rate"], r["mean"], yerr=r["std"], color=line.get_color(), capsize=4)
    finite += [loss for loss in losses if math.isfinite(loss)]
  if finite:
    ax.set_ylim(0.98 * min(finite), min(max(finite), 1.3 * min(finite)))
  ax.set_xscale("log")
  ax.set(xlabel="peak learning rate", ylabel="final eval loss (nats/byte)", title=title)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
