"""A fair comparison of optimizers: bracketed learning-rate sweeps, seeds, sensitivity.

The protocol (``adafactor-compare --suite fair``), the same for every optimizer:

* The same data, steps, batch and model, and the same schedule family: linear warmup
  (``WARMUP_FRACTION`` of the run), then cosine decay.
* Selection: each tuned row sweeps its learning rate, on ``SELECTION_SEED`` alone, on a log
  grid a factor ``GRID_FACTOR`` apart, starting from ``INITIAL_POINTS`` points around its own
  centre, and extends the grid one point at a time past whichever edge holds the best eval
  loss, until the best is inside (bracketed) or the row has ``MAX_POINTS``. A run that
  diverges counts as the worst.
* Evaluation, apart from selection: the chosen learning rate is rerun with every seed of
  ``SEEDS`` (initialisation and data order), which excludes the selection seed, so that the
  run that won the sweep is not among those reported; the table gives their mean and spread
  (the selection run's loss stays in the JSON, as ``selection_loss``).
* A difference is stated with a test whose error rate is known: the table gives each row's
  difference of means from the reference row (the AdamW row, optax's or StableAdamW, whose
  selection run ended lowest) and the two-sided p-value of Welch's t-test on the two rows'
  per-seed eval losses, marked where p < ``P_VALUE``.
* Sensitivity: the band of learning rates whose eval loss (on the selection seed) is within
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
from scipy import stats  # jax's own dependency, so every install of the job has it

from adafactor_jax.training.config import ConfigError
from adafactor_jax.training.configs import adamw, big_vision, default, paper

GRID_FACTOR = 2.0
INITIAL_POINTS = 3
MAX_POINTS = 9
SELECTION_SEED = 0
SEEDS = (1, 2, 3)
"""The evaluation seeds: the selection seed is not among them."""
P_VALUE = 0.05
NEAR_BEST = 0.02
WARMUP_FRACTION = 0.05
REFERENCE_OPTIMIZERS = ("adamw", "stable_adamw")
"""The optimizers whose rows may be the table's reference: the AdamWs."""

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, Any]]
"""``(config, run name) -> result`` with at least ``final_eval_loss``: trains or reuses a run,
or raises :class:`MissingRun`."""


class MissingRun(LookupError):
  """Raised by a TrainFn that has no result for a run and may not train it (``adafactor-compare
  --from_ledger``): :func:`run_protocol` leaves that run's row out."""


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
  Row("adafactor_clip", _tuned(default.get_config, clip_global_norm=1.0), 4e-2),
  Row(
    "adafactor_bf16_momentum",
    _tuned(default.get_config, momentum=0.9, momentum_dtype="bfloat16"),
    4e-2,
  ),
  Row("big_vision", _tuned(big_vision.get_config), 3e-3),
  Row("adamw_b2_0.95", _tuned(adamw.get_config, b2=0.95), 8e-3),
  Row("adamw_b2_0.999", _tuned(adamw.get_config, b2=0.999), 8e-3),
  Row(
    "adamw_clip_b2_0.95_wd0.1",
    _tuned(adamw.get_config, b2=0.95, clip_global_norm=1.0, weight_decay=0.1),
    8e-3,
  ),
  Row("adamw_clip_b2_0.95", _tuned(adamw.get_config, b2=0.95, clip_global_norm=1.0), 8e-3),
  Row(
    "adamw_clip_b2_0.999_wd0.1",
    _tuned(adamw.get_config, b2=0.999, clip_global_norm=1.0, weight_decay=0.1),
    8e-3,
  ),
  Row("adamw_clip_b2_0.999", _tuned(adamw.get_config, b2=0.999, clip_global_norm=1.0), 8e-3),
  Row("stable_adamw", _tuned(adamw.get_config, name="stable_adamw", weight_decay=0.1), 8e-3),
  Row(
    "optax_adafactor",
    _tuned(default.get_config, name="optax_adafactor", telemetry=False),
    4e-2,
  ),
)
"""Adafactor at the paper's defaults (the untuned reference); this library's Adafactor tuned
(learning rate times the parameter scale, no momentum; the same with the gradient clipped to a
global norm of 1 before it, on top of its update clipping; with bfloat16 momentum); the Big
Vision variant; AdamW with either β2; AdamW as nanoGPT and MaxText run it, the gradient clipped
to a global norm of 1, with either β2, with weight decay 0.1 (those recipes', and Flax lm1b's)
and without (weight decay alone, set against the unclipped rows); StableAdamW
(adafactor_jax.presets.stable_adamw) at its paper's β2 = 0.99, without gradient clipping (its
update clipping is meant to replace it), with the clipped AdamW recipes' weight decay 0.1;
optax.adafactor tuned the same way. The centres come from single runs on the default job
(issue 14's table: Adafactor best at 5e-2 of 1e-2..1e-1, AdamW at 1e-2 of 1e-3..4e-2; the
fair suite then found AdamW's best at 8e-3 there and 2e-3 at 4x the parameters); they only save
runs, since every sweep is extended until bracketed. The rows issue 30 added (the clipped ones
and StableAdamW) left the others' configs as they were, so that their finished runs are reused."""


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
  """Sweeps one row's learning rate on the selection seed until bracketed, then reruns the best
  on every evaluation seed (an untuned row: runs those seeds alone).

  ``configure`` adjusts each run's config before it trains (steps, model size).
  """

  def run(learning_rate: float | None, seed: int) -> dict[str, Any]:
    config = _run_config(row, learning_rate, seed)
    configure(config)
    label = "paper" if learning_rate is None else f"lr{learning_rate:.4g}"
    return train(config, f"{row.name}/{label}_seed{seed}")

  if row.centre is None:  # nothing to select
    seeds = [run(None, seed) for seed in SEEDS]
    return _row_result(row, None, {}, None, seeds, bracketed=None)
  half = INITIAL_POINTS // 2
  points = {k: run(row.centre * GRID_FACTOR**k, SELECTION_SEED) for k in range(-half, half + 1)}
  while True:
    best = min(points, key=lambda k: (_loss(points[k]), k))
    edge = min(points) if best == min(points) else max(points) if best == max(points) else None
    if edge is None or len(points) >= MAX_POINTS:
      break
    k = edge - 1 if edge == min(points) else edge + 1
    points[k] = run(row.centre * GRID_FACTOR**k, SELECTION_SEED)
  best_lr = row.centre * GRID_FACTOR**best
  seeds = [run(best_lr, seed) for seed in SEEDS]
  curve = {row.centre * GRID_FACTOR**k: points[k] for k in sorted(points)}
  bracketed = min(points) < best < max(points)
  return _row_result(row, best_lr, curve, points[best], seeds, bracketed)


def _row_result(
  row: Row,
  learning_rate: float | None,
  curve: dict[float, dict[str, Any]],
  selection: dict[str, Any] | None,
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
    "selection_seed": SELECTION_SEED,
    "selection_loss": None if selection is None else _loss(selection),
    "seeds": list(SEEDS),
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
  """The rows of ROWS named in ``rows`` (default: all, in order) through :func:`sweep`; a row
  for which ``train`` raises :class:`MissingRun` is left out."""
  names = [row.name for row in ROWS]
  unknown = sorted(set(rows or ()) - set(names))
  if unknown:
    raise ConfigError(
      f"--rows: no row named {', '.join(map(repr, unknown))}; the rows are {names}."
    )
  results = []
  for row in ROWS:
    if rows is None or row.name in rows:
      try:
        results.append(sweep(row, train, configure))
      except MissingRun:
        continue
  return results


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
  r"""Welch's unequal-variances t-test of two samples' means: (t, degrees of freedom, p).

  .. math::
    t = \frac{\bar a - \bar b}{\sqrt{s_a^2/n_a + s_b^2/n_b}},\qquad
    \nu = \frac{(s_a^2/n_a + s_b^2/n_b)^2}{\frac{(s_a^2/n_a)^2}{n_a - 1}
    + \frac{(s_b^2/n_b)^2}{n_b - 1}},

  with the sample variances :math:`s^2` (Welch–Satterthwaite degrees of freedom), and the
  two-sided :math:`p = 2\,P(T_\nu > |t|)` from Student's t (scipy). Where a sample has fewer
  than two values or a value that is not finite, or both are constant, all three are NaN.

  References:
    Welch, `The generalization of "Student's" problem when several different population
    variances are involved <https://doi.org/10.2307/2332510>`_, Biometrika, 1947.
  """
  if min(len(a), len(b)) < 2 or not all(map(math.isfinite, [*a, *b])):
    return math.nan, math.nan, math.nan
  va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
  if va + vb == 0:
    return math.nan, math.nan, math.nan
  t = (statistics.fmean(a) - statistics.fmean(b)) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
  return t, df, float(2 * stats.t.sf(abs(t), df))


def _selection_loss(r: dict[str, Any]) -> float:
  """The eval loss of a tuned row's selection run: the selection seed at its chosen learning
  rate (in results from before it was recorded, the same run: its sweep's best point)."""
  if "selection_loss" in r:
    return r["selection_loss"]
  return min(loss for _, loss in r["sweep"])


def reference_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """The row the table tests the others against: of the AdamW rows (REFERENCE_OPTIMIZERS),
  the one whose selection run ended lowest, so that the reference too is chosen without the
  evaluation seeds; without AdamW rows, of the tuned rows; without those, the first row."""
  tuned = [r for r in rows if r["learning_rate"] is not None]
  adamws = [r for r in tuned if r["optimizer"] in REFERENCE_OPTIMIZERS]
  return min(adamws or tuned, key=_selection_loss) if adamws or tuned else rows[0]


def _seeds_label(rows: list[dict[str, Any]]) -> str:
  """'seeds 1, 2, 3', or where the rows do not record their seeds (results from before they
  did, whose seeds included the selection seed) '3 seeds'."""
  recorded = {tuple(r["seeds"]) for r in rows if "seeds" in r}
  if len(recorded) == 1 and all("seeds" in r for r in rows):
    (seeds,) = recorded
    return "seeds " + ", ".join(map(str, seeds))
  return f"{max(len(r['seed_losses']) for r in rows)} seeds"


def _p_value(p: float) -> str:
  if math.isnan(p):
    return "—"
  marker = " *" if p < P_VALUE else ""
  return ("< 0.001" if p < 0.001 else f"{p:.3f}") + marker


def table(rows: list[dict[str, Any]]) -> str:
  """The protocol's markdown table: each row's difference of means from the reference row
  (:func:`reference_row`), and the p-value of Welch's t-test of it on the per-seed eval losses
  (:func:`welch_t_test`), marked ``*`` where it is below ``P_VALUE``."""
  reference = reference_row(rows)
  name = reference["name"]
  lines = [
    f"| row | learning rate | points swept | eval loss, mean ± std over {_seeds_label(rows)} "
    f"| vs {name}: difference of means | Welch's t-test vs {name}: p (* p < {P_VALUE:g}) "
    f"| within {NEAR_BEST:.0%} of best: LR band | state / AdamW's |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
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
    difference = r["mean"] - reference["mean"]
    gap = (r["mean"] / reference["mean"] - 1) * 100
    p = math.nan if r is reference else welch_t_test(r["seed_losses"], reference["seed_losses"])[2]
    lines.append(
      f"| {r['name']} | {lr} | {swept} | {r['mean']:.4f} ± {r['std']:.4f} "
      f"| {difference:+.4f} ({gap:+.2f}%) | {_p_value(p)} "
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
