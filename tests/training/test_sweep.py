"""The fair comparison protocol (adafactor-compare --suite fair): bracketing, selection on one
seed and evaluation on others, Welch's t-test, the band."""

from __future__ import annotations

import json
import math
import os

import jax
import ml_collections
import numpy as np
import optax
import pytest

from adafactor_jax.training import compare, metrics, optimizers, sweep, train
from adafactor_jax.training import config as config_lib
from adafactor_jax.training.configs import default
from tests.training.test_compare import RESULTS
from tests.training.test_train import TINY

CENTRE = {row.name: row.centre for row in sweep.ROWS}
OFFSET = {  # each row's best learning rate, in grid steps from its centre: some far from it
  "adafactor": 0,
  "adafactor_clip": 0,
  "adafactor_bf16_momentum": 2,  # a point above the first grid (centre x 2^[-1, 1])
  "big_vision": -4,  # three below it
  "adamw_b2_0.95": 0,
  "adamw_b2_0.999": 1,
  "adamw_clip_b2_0.95_wd0.1": -1,
  "adamw_clip_b2_0.95": 0,
  "adamw_clip_b2_0.999_wd0.1": 0,
  "adamw_clip_b2_0.999": 1,
  "stable_adamw": -2,
  "optax_adafactor": 1,
}
FLOOR = {"adamw_b2_0.999": 1.55, "stable_adamw": 1.51}  # the clipped AdamWs 1.52, others 1.5
OPTIMUM = {row: CENTRE[row] * sweep.GRID_FACTOR**k for row, k in OFFSET.items()}
DIVERGES_ABOVE = 4 * max(OPTIMUM.values())


def fake_loss(row: str, learning_rate: float | None, seed: int) -> float:
  """A bowl in log2(learning rate) around the row's optimum, a little noise per seed."""
  if learning_rate is None:
    return 2.0 + seed / 100
  if learning_rate > DIVERGES_ABOVE:
    return math.nan
  floor = FLOOR.get(row, 1.52 if row.startswith("adamw_clip") else 1.5)
  return floor + 0.01 * math.log2(learning_rate / OPTIMUM[row]) ** 2 + seed / 1000


class Trained(dict):
  reused: list[str]

  def __init__(self):
    super().__init__()
    self.reused = []


@pytest.fixture
def fake_training(monkeypatch):
  """train_and_evaluate replaced by fake_loss; records each run's config by workdir.

  As the trainer does, a finished workdir is reused: its summary again, recorded in
  ``trained.reused`` and not trained again.
  """
  trained = Trained()
  summaries = {}

  def fake_train_and_evaluate(config, workdir, progress=True):
    config = config_lib.resolve_config(config)  # every run's config is valid ...
    tx = optimizers.create_optimizer(config.optimizer, config.num_steps)  # ... and builds
    params = {"w": jax.ShapeDtypeStruct((256, 256), np.float32)}
    if workdir in summaries:
      trained.reused.append(workdir)
      return summaries[workdir]
    trained[workdir] = config
    row = os.path.basename(os.path.dirname(workdir))
    loss = fake_loss(
      row, config.optimizer.learning_rate if row != "adafactor_paper" else None, config.seed
    )
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": config.num_steps, "eval_loss": loss}) + "\n")
    summaries[workdir] = {
      "optimizer": config.optimizer.name,
      "steps": config.num_steps,
      "final_train_loss": loss,
      "final_eval_loss": loss,
      "optimizer_state_bytes": metrics.tree_bytes(jax.eval_shape(tx.init, params)),
      "adamw_state_bytes": metrics.tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, params)),
    }
    return summaries[workdir]

  monkeypatch.setattr(train, "train_and_evaluate", fake_train_and_evaluate)
  return trained


def test_every_sweep_is_extended_until_bracketed_then_its_best_rerun_on_every_seed(
  fake_training, tmp_path
):
  """The sweep runs on the selection seed alone; the chosen learning rate is rerun on the
  evaluation seeds, which exclude it, and only those are reported."""
  assert sweep.SELECTION_SEED not in sweep.SEEDS and len(sweep.SEEDS) == 3
  rows = compare.run_suite("fair", str(tmp_path), num_steps=40, progress=False)
  assert [r["name"] for r in rows] == [row.name for row in sweep.ROWS]
  by_name = {r["name"]: r for r in rows}
  for name, optimum in OPTIMUM.items():
    r = by_name[name]
    assert r["learning_rate"] == pytest.approx(optimum), name
    assert r["bracketed"], name
    lrs = [lr for lr, _ in r["sweep"]]
    # A factor 2 apart, one point either side of the best at least.
    assert np.allclose(np.diff(np.log2(lrs)), 1.0), name
    assert lrs[0] < r["learning_rate"] < lrs[-1], name
    assert r["seed_losses"] == pytest.approx([fake_loss(name, optimum, s) for s in sweep.SEEDS])
    assert r["seeds"] == [1, 2, 3] and r["selection_seed"] == 0
    assert r["selection_loss"] == pytest.approx(fake_loss(name, optimum, 0))
    assert r["mean"] == pytest.approx(np.mean(r["seed_losses"]))
  # Extended past the first grid only while its best sat at an edge: up to the optimum, then
  # one point beyond it.
  assert len(by_name["adafactor"]["sweep"]) == sweep.INITIAL_POINTS
  assert len(by_name["adafactor_bf16_momentum"]["sweep"]) == sweep.INITIAL_POINTS + 1 + 1
  assert len(by_name["big_vision"]["sweep"]) == sweep.INITIAL_POINTS + 3 + 1
  paper = by_name["adafactor_paper"]
  assert paper["learning_rate"] is None and paper["sweep"] == []
  assert paper["seed_losses"] == [2.01, 2.02, 2.03] and paper["selection_loss"] is None
  assert paper["mean"] == pytest.approx(2.02) and paper["std"] == pytest.approx(0.01)

  configs = list(fake_training.values())
  # One protocol: the same steps, data and model for all; warmup then cosine for the tuned.
  assert {c.num_steps for c in configs} == {40}
  assert len({json.dumps(c.data.to_dict(), sort_keys=True) for c in configs}) == 1
  assert len({json.dumps(c.model.to_dict(), sort_keys=True) for c in configs}) == 1
  tuned = [c for c in configs if c.optimizer.learning_rate is not None]
  assert {
    (c.optimizer.schedule, c.optimizer.warmup_steps, c.optimizer.warmup_fraction) for c in tuned
  } == {("cosine", 0, sweep.WARMUP_FRACTION)}
  assert {c.optimizer.b2 for c in tuned if c.optimizer.name == "adamw"} == {0.95, 0.999}
  assert {c.optimizer.name for c in configs} == {
    "adafactor",
    "big_vision",
    "adamw",
    "stable_adamw",
    "optax_adafactor",
  }
  # Each (row, learning rate, seed) asked for once: the sweep's points on the selection seed,
  # the chosen learning rate on each evaluation seed.
  assert not fake_training.reused and len(fake_training) == sum(
    len(r["sweep"]) + len(sweep.SEEDS) for r in rows
  )
  for workdir, config in fake_training.items():
    name = os.path.basename(os.path.dirname(workdir))
    chosen = by_name[name]["learning_rate"]
    evaluation = chosen is None or (
      config.seed != 0 and config.optimizer.learning_rate == pytest.approx(chosen)
    )
    assert (config.seed in sweep.SEEDS) == evaluation, workdir


def test_the_rows_of_the_strongest_adamw_people_run():
  """Issue 30's rows: AdamW clipped to a global norm of 1 at either beta2, with weight decay
  0.1 and without; StableAdamW at its paper's beta2, unclipped, weight decay 0.1; Adafactor
  with the global clip on top of its update clipping. The rows before them unclipped."""
  optimizer = {row.name: config_lib.resolve_config(row.config()).optimizer for row in sweep.ROWS}
  expected = {  # name: (optimizer, b2, clip_global_norm, weight_decay)
    "adamw_b2_0.95": ("adamw", 0.95, None, None),
    "adamw_b2_0.999": ("adamw", 0.999, None, None),
    "adamw_clip_b2_0.95_wd0.1": ("adamw", 0.95, 1.0, 0.1),
    "adamw_clip_b2_0.95": ("adamw", 0.95, 1.0, None),
    "adamw_clip_b2_0.999_wd0.1": ("adamw", 0.999, 1.0, 0.1),
    "adamw_clip_b2_0.999": ("adamw", 0.999, 1.0, None),
    "stable_adamw": ("stable_adamw", 0.99, None, 0.1),
  }
  for name, (kind, b2, clip, decay) in expected.items():
    opt = optimizer[name]
    assert (opt.name, opt.b2, opt.clip_global_norm, opt.weight_decay) == (kind, b2, clip, decay)
  assert optimizer["stable_adamw"].clipping_threshold == 1.0
  clipped = optimizer["adafactor_clip"]
  assert clipped.clip_global_norm == 1.0 and clipped.clipping_threshold == 1.0
  assert {**clipped.to_dict(), "clip_global_norm": None} == optimizer["adafactor"].to_dict()
  unclipped = [name for name, opt in optimizer.items() if opt.clip_global_norm is None]
  assert set(unclipped) == {row.name for row in sweep.ROWS} - {
    "adafactor_clip",
    *(name for name in expected if "_clip_" in name),
  }
  assert [row.centre for row in sweep.ROWS if row.name in expected] == [8e-3] * len(expected)


def test_a_sweep_whose_runs_all_diverge_goes_down_and_stops_at_max_points(tmp_path):
  row = sweep.Row("adamw_b2_0.95", default.get_config, 1.0)
  learning_rates = []

  def diverging(config, name):
    learning_rates.append(config.optimizer.learning_rate)
    return {
      "final_eval_loss": math.nan,
      "optimizer": "adafactor",
      "steps": 1,
      "optimizer_state_bytes": 1,
      "adamw_state_bytes": 8,
    }

  result = sweep.sweep(row, diverging, lambda config: None)
  assert len(result["sweep"]) == sweep.MAX_POINTS and not result["bracketed"]
  assert min(learning_rates) == pytest.approx(2.0 ** -(sweep.MAX_POINTS - 2))
  assert result["band"] is None


def test_the_near_best_band_is_read_off_the_curve_linear_in_log_learning_rate():
  band = sweep.near_best_band({1.0: 1.1, 2.0: 1.0, 4.0: 1.05, 8.0: math.nan})
  # 1.02 is 0.2 of the way from 1.0 to 1.1 (towards lr 1), 0.4 of the way to 1.05 (towards 4).
  assert band["low"] == pytest.approx(2.0 * 2**-0.2)
  assert band["high"] == pytest.approx(2.0 * 2**0.4)
  assert band["width"] == pytest.approx(2**0.6) and band["closed"]
  # Within 2% at the sweep's edge: the band is open there (a lower bound on its width).
  band = sweep.near_best_band({1.0: 1.01, 2.0: 1.0, 4.0: 1.5})
  assert band["low"] == 1.0 and not band["closed"]
  # A diverged neighbour closes the band at the last finite point.
  band = sweep.near_best_band({1.0: 1.5, 2.0: 1.0, 4.0: math.inf})
  assert band["high"] == 2.0 and band["closed"]


def test_the_cli_writes_the_fair_table_chart_and_json(fake_training, tmp_path, capsys):
  argv = ["adafactor-compare", "--suite=fair", f"--workdir={tmp_path}", "--num_steps=40"]
  assert compare.main([*argv, "--noprogress"]) == 0
  out = capsys.readouterr().out
  rows = json.loads((tmp_path / "fair.json").read_text())
  text = sweep.table(rows)
  assert (tmp_path / "fair.md").read_text() == text + "\n" and text in out
  assert (tmp_path / "fair.png").read_bytes().startswith(b"\x89PNG")
  lines = text.splitlines()
  # The reference: of the AdamWs, the one whose selection run (seed 0) ended lowest.
  assert "over seeds 1, 2, 3 | vs adamw_b2_0.95: difference of means" in lines[0]
  assert "Welch's t-test vs adamw_b2_0.95: p (* p < 0.05)" in lines[0]
  cells = {
    line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
  }
  assert all(len(row) == 7 for row in cells.values())
  assert cells["adamw_b2_0.95"][3:5] == ["+0.0000 (+0.00%)", "—"]
  assert cells["adafactor_paper"][:2] == ["paper's ρ_t", "—"]
  assert cells["adafactor"][2] == f"{np.mean([1.501, 1.502, 1.503]):.4f} ± {0.001:.4f}"
  # The same seed noise on the same floor: no difference. Another floor 0.05 above, with a
  # spread of 0.001: far beyond chance. 0.01 above (the other AdamWs') likewise.
  assert cells["adafactor"][3:5] == ["+0.0000 (+0.00%)", "1.000"]
  assert cells["adamw_b2_0.999"][3:5] == ["+0.0500 (+3.33%)", "< 0.001 *"]
  assert cells["stable_adamw"][4] == "< 0.001 *"
  assert cells["adamw_b2_0.999"][-1] == "100.00%"


def test_rows_train_apart_and_a_run_of_every_row_reuses_them(fake_training, tmp_path, capsys):
  argv = ["adafactor-compare", "--suite=fair", f"--workdir={tmp_path}", "--num_steps=40"]
  part = ["adamw_b2_0.95", "adafactor_paper"]
  assert compare.main([*argv, f"--rows={','.join(part)}", "--noprogress"]) == 0
  # Only those rows trained, and only the table printed: the suite's files are the whole's.
  assert {os.path.basename(os.path.dirname(w)) for w in fake_training} == set(part)
  assert not (tmp_path / "fair.json").exists()
  lines = capsys.readouterr().out.strip().splitlines()
  assert [line.split("|")[1].strip() for line in lines[-2:]] == ["adafactor_paper", "adamw_b2_0.95"]
  # The paper's row against the only AdamW, on seeds 1-3 each: 2.02 +- 0.01 against
  # 1.502 +- 0.001.
  assert "| +0.5180 (+34.49%) | < 0.001 * |" in lines[-2]
  trained_apart = set(fake_training)
  assert compare.main([*argv, "--noprogress"]) == 0
  rows = json.loads((tmp_path / "fair.json").read_text())
  assert [r["name"] for r in rows] == [row.name for row in sweep.ROWS]
  assert {os.path.basename(os.path.dirname(w)) for w in set(fake_training) - trained_apart} == {
    row.name for row in sweep.ROWS
  } - set(part)
  assert sorted(fake_training.reused) == sorted(trained_apart)


def test_a_ledger_stands_in_for_lost_workdirs_only_where_the_config_is_the_same(
  fake_training, tmp_path, capsys
):
  ledger = tmp_path / "ledger"
  argv = ["adafactor-compare", "--suite=fair", "--num_steps=40", f"--ledger={ledger}"]
  assert compare.main([*argv, f"--workdir={tmp_path / 'a'}", "--noprogress"]) == 0
  first = json.loads((tmp_path / "a" / "fair.json").read_text())
  entries = sorted(p.relative_to(ledger).as_posix() for p in ledger.rglob("*.json"))
  assert entries == sorted(
    os.path.relpath(w, tmp_path / "a" / "fair") + ".json" for w in fake_training
  )
  # Another machine: no workdirs, the ledger alone. Nothing trains; the same tables.
  trained = set(fake_training)
  assert compare.main([*argv, f"--workdir={tmp_path / 'b'}", "--noprogress"]) == 0
  assert set(fake_training) == trained and not fake_training.reused
  assert json.loads((tmp_path / "b" / "fair.json").read_text()) == first
  assert (tmp_path / "b" / "fair.md").read_text() == (tmp_path / "a" / "fair.md").read_text()
  # A run of another config is not read from the ledger: 41 steps train every run anew.
  longer = [a.replace("--num_steps=40", "--num_steps=41") for a in argv]
  assert compare.main([*longer, f"--workdir={tmp_path / 'c'}", "--rows=adafactor"]) == 0
  assert {w for w in fake_training if "/c/" in w} == {
    str(tmp_path / "c" / "fair" / e.removesuffix(".json"))
    for e in entries
    if e.startswith("adafactor/")
  }
  capsys.readouterr()
  assert compare.main(["adafactor-compare", "--suite=switch", f"--ledger={ledger}"]) == 2
  assert "--ledger cannot stand in for --suite=switch's workdirs" in capsys.readouterr().err


def test_from_ledger_trains_nothing_and_leaves_out_the_rows_whose_runs_it_lacks(
  fake_training, tmp_path, capsys
):
  ledger = tmp_path / "ledger"
  argv = ["adafactor-compare", "--suite=fair", "--num_steps=40", f"--ledger={ledger}"]
  assert compare.main([*argv, f"--workdir={tmp_path / 'a'}", "--noprogress"]) == 0
  whole = {r["name"]: r for r in json.loads((tmp_path / "a" / "fair.json").read_text())}
  # A row with one evaluation seed's run missing, and one whose selection sweep stops short.
  (ledger / "stable_adamw" / "lr0.002_seed2.json").unlink()
  (ledger / "big_vision" / "lr0.0015_seed0.json").unlink()
  trained = dict(fake_training)
  capsys.readouterr()
  assert compare.main([*argv, f"--workdir={tmp_path / 'b'}", "--noprogress", "--from_ledger"]) == 0
  assert fake_training == trained and not fake_training.reused
  rows = json.loads((tmp_path / "b" / "fair.json").read_text())
  kept = [row.name for row in sweep.ROWS if row.name not in ("big_vision", "stable_adamw")]
  assert [r["name"] for r in rows] == kept
  assert rows == [whole[name] for name in kept]
  # The same table without those two rows (the reference, adamw_b2_0.95, is among the kept),
  # and a line under it that names them.
  table = (tmp_path / "a" / "fair.md").read_text().splitlines(keepends=True)
  trailer = "\nLeft out, their runs not all in the ledger yet: big_vision, stable_adamw.\n"
  assert (tmp_path / "b" / "fair.md").read_text() == "".join(
    line for line in table if not line.startswith(("| big_vision |", "| stable_adamw |"))
  ) + trailer
  assert trailer in capsys.readouterr().out
  # With --rows, the files of those rows alone, naming only the asked-for rows it lacks.
  part = ["--rows=adafactor,adamw_b2_0.95,stable_adamw", "--from_ledger", "--noprogress"]
  assert compare.main([*argv, f"--workdir={tmp_path / 'd'}", *part]) == 0
  rows = json.loads((tmp_path / "d" / "fair.json").read_text())
  assert rows == [whole["adafactor"], whole["adamw_b2_0.95"]]
  assert (tmp_path / "d" / "fair.md").read_text() == sweep.table(rows) + (
    "\n\nLeft out, their runs not all in the ledger yet: stable_adamw.\n"
  )
  assert (tmp_path / "d" / "fair.png").stat().st_size > 0

  assert compare.main(["adafactor-compare", "--suite=fair", "--from_ledger"]) == 2
  assert "--from_ledger reads every run from --ledger" in capsys.readouterr().err
  empty = ["adafactor-compare", "--suite=paper", f"--ledger={tmp_path / 'none'}", "--from_ledger"]
  assert compare.main([*empty, f"--workdir={tmp_path / 'c'}"]) == 2
  assert "holds no complete row of --suite=paper" in capsys.readouterr().err
  assert fake_training == trained


@pytest.mark.parametrize(
  ("flag", "message"),
  [
    ("--rows=adamw,adafactor", "--rows: no row named 'adamw'; the rows are ['adafactor_paper'"),
    ("--suite=paper", "--rows picks rows of --suite=fair, not of --suite=paper"),
  ],
)
def test_rows_refuses_what_it_cannot_run(fake_training, tmp_path, capsys, flag, message):
  argv = ["adafactor-compare", "--suite=fair", "--rows=adafactor", f"--workdir={tmp_path}", flag]
  assert compare.main(argv) == 2
  assert message in capsys.readouterr().err and not fake_training


def test_optax_adafactor_trains_in_the_job(tmp_path):
  """The comparison's anchor row, a real (tiny) run: optax.adafactor through the trainer."""
  config = default.get_config()
  for key, value in TINY.items():
    config_lib.set_config_value(config, key, value)
  config.optimizer.name, config.optimizer.learning_rate = "optax_adafactor", 1e-2
  config.optimizer.telemetry = False  # optax.adafactor records none
  summary = train.train_and_evaluate(config, str(tmp_path / "run"), progress=False)
  assert summary["optimizer"] == "optax_adafactor" and math.isfinite(summary["final_eval_loss"])
  # Nothing is factored at this size (dims < 128): one second moment (plus optax's 1-element
  # placeholders) against AdamW's two moments.
  assert summary["optimizer_state_bytes"] < 0.51 * summary["adamw_state_bytes"]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [r["train_loss"] for r in map(json.loads, f) if "train_loss" in r]
  assert losses[-1] < losses[0]


def test_the_fair_protocol_end_to_end_on_a_tiny_model(tmp_path):
  """One tuned row through real training: each run is the protocol's, and a rerun reuses all."""
  tiny = {key: value for key, value in TINY.items() if key != "num_steps"}
  (row,) = compare.run_suite("fair", str(tmp_path), 20, False, tiny, ["adafactor"])
  lrs = [lr for lr, _ in row["sweep"]]
  assert sweep.INITIAL_POINTS <= len(lrs) <= sweep.MAX_POINTS
  assert np.allclose(np.diff(np.log2(lrs)), 1.0) and row["learning_rate"] in lrs
  assert row["bracketed"] == (lrs[0] < row["learning_rate"] < lrs[-1])
  runs = sorted((tmp_path / "fair" / "adafactor").iterdir())
  assert len(runs) == len(lrs) + len(sweep.SEEDS)
  for run in runs:
    config = json.loads((run / "config.json").read_text())
    learning_rate = float(run.name.split("_seed")[0].removeprefix("lr"))
    assert config["optimizer"]["learning_rate"] == pytest.approx(learning_rate, rel=1e-3)
    opt = ml_collections.ConfigDict(config["optimizer"])
    assert (opt.schedule, opt.warmup_steps, opt.warmup_fraction) == (
      "cosine",
      0,
      sweep.WARMUP_FRACTION,
    )
    # 5% of 20 steps: one warmup step, then cosine decay from the run's learning rate.
    in_steps = ml_collections.ConfigDict({**opt.to_dict(), "warmup_steps": 1, "warmup_fraction": 0})
    schedules = [optimizers.learning_rate_schedule(o, 20) for o in (opt, in_steps)]
    values = [[float(schedule(step)) for step in range(21)] for schedule in schedules]
    assert values[0] == values[1]
    assert values[0][1] == pytest.approx(learning_rate, rel=1e-3)
    assert values[0][1] > values[0][2]
    assert config["num_steps"] == 20 and config["model"]["d_model"] == TINY["model.d_model"]
  best = [
    json.loads(
      (
        tmp_path / "fair" / "adafactor" / f"lr{row['learning_rate']:.4g}_seed{s}" / "summary.json"
      ).read_text()
    )
    for s in sweep.SEEDS
  ]
  assert row["seed_losses"] == [r["final_eval_loss"] for r in best]
  assert all(map(math.isfinite, row["seed_losses"]))
  selection = tmp_path / "fair" / "adafactor" / f"lr{row['learning_rate']:.4g}_seed0"
  selected = json.loads((selection / "summary.json").read_text())["final_eval_loss"]
  assert row["selection_loss"] == selected == min(loss for _, loss in row["sweep"])
  assert compare.run_suite("fair", str(tmp_path), 20, False, tiny, ["adafactor"]) == [row]
  assert sorted((tmp_path / "fair" / "adafactor").iterdir()) == runs


FAIR_RESULTS = sorted(path.stem for path in RESULTS.glob("fair_*.json"))


def test_the_fair_results_are_committed():
  assert {"fair_default", "fair_4x", "fair_default_2026-11-26", "fair_4x_2026-11-26"} <= set(
    FAIR_RESULTS
  )


ROWS_RUN = {
  "fair_default_3000": [
    "adafactor",
    "adafactor_bf16_momentum",
    "adamw_clip_b2_0.95_wd0.1",
    "stable_adamw",
  ]
}
"""The rows of a results file made from a part of the suite (``--from_ledger --rows``): issue 30's
best two Adafactor and best two AdamW rows of the default job, again at 3000 steps."""


@pytest.mark.parametrize("size", FAIR_RESULTS)
def test_the_committed_fair_table_is_its_results_table(size):
  """docs/results/fair_*.md are what adafactor-compare --suite fair wrote from the JSON next to
  them (and the pages show the .md: tests/test_readme.py): ROWS in their order, every row
  bracketed and evaluated on SEEDS; a table made --from_ledger while runs are missing lacks
  the rows that miss one (the pages name them)."""
  results = json.loads((RESULTS / f"{size}.json").read_text())
  if "seeds" not in results[0]:
    pytest.skip(
      f"docs/results/{size}.json was measured before issue 30's protocol (seeds 0-2, the "
      "selection seed among them, no t-test, fewer rows)"
    )
  assert (RESULTS / f"{size}.md").read_text() == (
    sweep.table(results) + compare.left_out("fair", results, ROWS_RUN.get(size)) + "\n"
  )
  names = [r["name"] for r in results]
  assert names == [row.name for row in sweep.ROWS if row.name in ROWS_RUN.get(size, names)]
  assert all(r["bracketed"] in (None, True) for r in results)
  assert all(r["seeds"] == list(sweep.SEEDS) for r in results)
  assert all(len(r["seed_losses"]) == len(sweep.SEEDS) for r in results)


SIZE_OVERRIDES = {"fair_4x": ["--config.model.d_model=256", "--config.model.mlp_dim=1024"]}
"""The model-size flags each results file's runs were trained with (the JSON records the steps)."""


@pytest.mark.parametrize("size", FAIR_RESULTS)
def test_the_committed_fair_results_are_what_the_committed_ledger_makes(size, tmp_path):
  """docs/results/fair_<size>.{json,md} come from docs/results/ledger/fair_<size>/ alone
  (--from_ledger): every run the table rests on is committed, with its config."""
  results = json.loads((RESULTS / f"{size}.json").read_text())
  ledger = RESULTS / "ledger" / size
  if "seeds" not in results[0]:
    pytest.skip(f"docs/results/{size}.json was measured before the runs were kept in a ledger")
  argv = ["adafactor-compare", "--suite=fair", f"--ledger={ledger}", "--from_ledger"]
  argv += [f"--workdir={tmp_path}", "--noprogress", *SIZE_OVERRIDES.get(size, [])]
  if results[0]["steps"] != default.get_config().num_steps:  # the flag sets more than steps
    argv.append(f"--num_steps={results[0]['steps']}")
  if size in ROWS_RUN:
    argv.append("--rows=" + ",".join(ROWS_RUN[size]))
  assert compare.main(argv) == 0
  assert json.loads((tmp_path / "fair.json").read_text()) == results
  assert (tmp_path / "fair.md").read_text() == (RESULTS / f"{size}.md").read_text()


@pytest.mark.parametrize("size", FAIR_RESULTS)
def test_results_from_before_the_seeds_were_recorded_still_make_a_table(size):
  """The notebook and the comparison page show results from before issue 30: their seeds are
  counted, and the reference AdamW is the one whose sweep (the selection seed's runs) ended
  lowest."""
  results = json.loads((RESULTS / f"{size}.json").read_text())
  if "seeds" in results[0]:
    pytest.skip(f"docs/results/{size}.json is of the current protocol")
  lines = sweep.table(results).splitlines()
  adamws = [r for r in results if r["optimizer"] == "adamw"]
  reference = min(adamws, key=lambda r: min(loss for _, loss in r["sweep"]))
  assert f"over 3 seeds | vs {reference['name']}: difference of means" in lines[0]
  assert len(lines) == 2 + len(results)


def test_welch_t_test_against_known_values():
  """R's t.test(extra ~ group, data = sleep), the Welch two-sample test of its documentation:
  t = -1.8608, df = 17.776, p-value = 0.07939."""
  group1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
  group2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
  t, df, p = sweep.welch_t_test(group1, group2)
  assert (round(t, 4), round(df, 3), round(p, 5)) == (-1.8608, 17.776, 0.07939)


@pytest.mark.parametrize(
  ("a", "b", "t", "df"),
  [
    # 3 vs 3, both variances 1: t = -3 / sqrt(2/3), df = (2/3)^2 / (2 (1/3)^2 / 2) = 4.
    ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], -3 / math.sqrt(2 / 3), 4.0),
    # 2 vs 2, both variances 0.5: t = 1 / sqrt(1/2), df = 2.
    ([2.0, 3.0], [1.0, 2.0], math.sqrt(2), 2.0),
  ],
)
def test_welch_t_test_by_hand(a, b, t, df):
  """The p-value from the closed forms of Student's t CDF for 4 and 2 degrees of freedom:
  F_4(t) = 1/2 + (3/8) x (1 - x^2/12) with x = t / sqrt(1 + t^2/4) ... written out below,
  F_2(t) = 1/2 + t / (2 sqrt(2 + t^2))."""
  got_t, got_df, p = sweep.welch_t_test(a, b)
  assert got_t == pytest.approx(t, rel=1e-12) and got_df == pytest.approx(df, rel=1e-12)
  x = abs(t)
  if df == 4.0:
    cdf = 0.5 + 3 / 8 * (x / math.sqrt(1 + x * x / 4)) * (1 - x * x / (12 * (1 + x * x / 4)))
  else:
    cdf = 0.5 + x / (2 * math.sqrt(2 + x * x))
  assert p == pytest.approx(2 * (1 - cdf), rel=1e-9)
  # The test is symmetric: the samples swapped, the same p, t negated.
  assert sweep.welch_t_test(b, a) == pytest.approx((-got_t, got_df, p))


@pytest.mark.parametrize(
  "a", [[1.0], [1.0, math.inf, 2.0], [1.0, math.nan, 2.0]], ids=["one", "inf", "nan"]
)
def test_welch_t_test_is_nan_without_two_finite_values_or_any_spread(a):
  assert all(math.isnan(x) for x in sweep.welch_t_test(a, [1.0, 2.0, 3.0]))
  assert all(math.isnan(x) for x in sweep.welch_t_test([2.0, 2.0], [3.0, 3.0, 3.0]))
