"""adafactor-compare: its suites, tables and the committed results."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

from adafactor_jax.training import compare, main, metrics, optimizers, train
from adafactor_jax.training import config as config_lib
from adafactor_jax.training.configs import adamw
from tests.training.test_train import (
  PROG,
  TINY,
)


def _result(name, optimizer, eval_loss, state_bytes, adamw_bytes=10_000):
  return {
    "name": name,
    "optimizer": optimizer,
    "steps": 10,
    "resumed_from": 0,
    "final_train_loss": eval_loss - 0.1,
    "final_eval_loss": eval_loss,
    "wall_time_sec": 12.0,
    "num_params": 1000,
    "param_bytes": 4000,
    "optimizer_state_bytes": state_bytes,
    "adamw_state_bytes": adamw_bytes,
    "eval_curve": [(10, eval_loss)],
  }


def test_the_switch_suite_runs_adamw_then_adafactor_cold_and_warm(tmp_path):
  """The real runs, tiny: AdamW for 8 steps, and Adafactor from its step-4 checkpoint."""
  overrides = {k: v for k, v in TINY.items() if k.startswith(("model.", "data.", "eval_"))}
  results = compare.run_suite(
    "switch", str(tmp_path), num_steps=8, progress=False, overrides=overrides
  )
  assert [r["name"] for r in results] == ["adamw", "adafactor_cold", "adafactor_warm"]
  assert results[0]["switched_from"] is None
  for r, warm in zip(results[1:], (False, True), strict=True):
    assert r["switched_from"] == {"step": 4, "switched_from": "adamw", "warm_start": warm}
    assert r["resumed_from"] == 4 and r["optimizer"] == "adafactor"
  # Every step logged; the three share steps 1-4 (AdamW's), and part after.
  curves = [dict(r["train_curve"]) for r in results]
  assert all(sorted(c) == list(range(1, 9)) for c in curves)
  assert curves[0][4] == curves[1][4] == curves[2][4]
  assert curves[1][8] != curves[0][8] != curves[2][8]
  level, jump = compare.switch_jump(results[1], 4)
  assert level == pytest.approx(np.mean([curves[1][t] for t in range(1, 5)]))
  assert jump == pytest.approx(max(curves[1][t] for t in range(5, 9)) - level)
  lines = compare.switch_table(results).splitlines()
  assert len(lines) == 5 and "step 4" in lines[0]
  compare.switch_chart(results, str(tmp_path / "switch.png"), "switch")
  assert (tmp_path / "switch.png").read_bytes().startswith(b"\x89PNG")


RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"


@pytest.mark.parametrize("suite", ["paper", "switch"])
def test_the_committed_comparison_tables_are_their_results_tables(suite):
  """docs/results/compare_<suite>.md is what adafactor-compare writes from the JSON next to it
  (and the README shows the .md: tests/test_readme.py)."""
  results = json.loads((RESULTS / f"compare_{suite}.json").read_text())
  render = compare.switch_table if suite == "switch" else compare.table
  assert (RESULTS / f"compare_{suite}.md").read_text() == render(results) + "\n"
  assert {r["name"] for r in results} == set(compare.suite_configs(suite))


def test_table_compares_with_the_best_finite_adamw():
  results = [
    _result("adafactor", "adafactor", 2.0, 50),
    _result("adamw_lr0.001", "adamw", 2.4, 10_000),
    _result("adamw_lr0.003", "adamw", 2.1, 10_000),
    _result("adamw_lr0.01", "adamw", float("nan"), 10_000),
    _result("big_vision", "big_vision", 2.2, 2_500),
  ]
  lines = compare.table(results).splitlines()
  assert len(lines) == 2 + len(results)
  assert "vs adamw_lr0.003" in lines[0]
  rows = {
    line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]
  }
  assert list(rows) == [r["name"] for r in results]
  for name in ("adamw_lr0.001", "adamw_lr0.003", "adamw_lr0.01"):
    assert rows[name][-1] == "100.00%"
  assert rows["big_vision"][-1] == "25.00%"
  assert rows["adamw_lr0.003"][1] == "+0.00%"
  assert rows["adafactor"][1] == f"{(2.0 / 2.1 - 1) * 100:+.2f}%"
  assert rows["adamw_lr0.001"][1] == f"{(2.4 / 2.1 - 1) * 100:+.2f}%"
  assert rows["adafactor"][0] == "2.0000"


def test_run_suite_shrinks_every_run_and_compare_cli_writes_results(tmp_path, monkeypatch, capsys):
  """The suite wiring, with the training itself replaced (a real run compiles for seconds)."""
  trained = {}

  def fake_train_and_evaluate(config, workdir, progress=True):
    config = config_lib.resolve_config(config)  # every shrunk config is valid ...
    tx = optimizers.create_optimizer(config.optimizer, config.num_steps)  # ... and builds
    assert workdir not in trained
    trained[workdir] = config
    loss = 2.0 + len(trained) / 10
    os.makedirs(workdir)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
      f.write(json.dumps({"step": config.num_steps, "train_loss": loss, "steps_per_sec": 1.0}))
      f.write("\n" + json.dumps({"step": config.num_steps, "eval_loss": loss}) + "\n")
    params = {"w": jax.ShapeDtypeStruct((256, 256), np.float32)}
    return {
      "optimizer": config.optimizer.name,
      "steps": config.num_steps,
      "resumed_from": 0,
      "final_train_loss": loss,
      "final_eval_loss": loss,
      "wall_time_sec": 1.0,
      "num_params": 256 * 256,
      "param_bytes": metrics.tree_bytes(params),
      "optimizer_state_bytes": metrics.tree_bytes(jax.eval_shape(tx.init, params)),
      "adamw_state_bytes": metrics.tree_bytes(jax.eval_shape(adamw_tx.init, params)),
    }

  adamw_opt = config_lib.resolve_config(adamw.get_config()).optimizer
  adamw_tx = optimizers.create_optimizer(adamw_opt, 100)
  monkeypatch.setattr(train, "train_and_evaluate", fake_train_and_evaluate)

  results = compare.run_suite(
    "default", str(tmp_path / "api"), num_steps=2, progress=False, overrides={"model.d_model": 32}
  )
  names = [r["name"] for r in results]
  assert names == [
    "adafactor",
    "adafactor_paper",
    "adamw_lr0.001",
    "adamw_lr0.003",
    "adamw_lr0.01",
    "big_vision",
  ]
  assert [os.path.basename(w) for w in trained] == names
  assert all(os.path.dirname(w) == str(tmp_path / "api" / "default") for w in trained)
  configs = list(trained.values())
  assert all(c.num_steps == 2 and c.model.d_model == 32 for c in configs)
  assert sorted(c.optimizer.learning_rate for c in configs[2:5]) == [1e-3, 3e-3, 1e-2]
  assert configs[1].optimizer.learning_rate is None  # the paper's relative step
  for result in results:
    assert result["eval_curve"] == [(2, result["final_eval_loss"])]

  trained.clear()
  cli = ["adafactor-compare", "--workdir", str(tmp_path / "cli"), "--num_steps", "2"]
  overrides = ["--config.model.d_model=48", "--config.optimizer.beta2_cap=None"]
  rc = compare.main([*cli, "--noprogress", *overrides])  # adafactor-train's style of flags
  out = capsys.readouterr().out
  assert rc == 0
  configs = list(trained.values())
  # Every run whose optimizer takes it, big_vision's beta2_cap of 0.999 included; adamw's
  # runs, whose optimizer does not, are left without it.
  assert all(c.model.d_model == 48 for c in configs)
  adafactors = [c for c in configs if c.optimizer.name != "adamw"]
  assert len(adafactors) == 3 and all(c.optimizer.beta2_cap is None for c in adafactors)
  assert all("beta2_cap" not in c.optimizer for c in configs if c.optimizer.name == "adamw")
  assert compare.main([*cli, "--config.optimizer.nme=x"]) == 2
  assert "Did you mean --config.optimizer.name?" in capsys.readouterr().err
  base = tmp_path / "cli" / "default"
  saved = json.loads(base.with_suffix(".json").read_text())
  assert [r["name"] for r in saved] == names
  assert base.with_suffix(".md").read_text().strip() == compare.table(saved)
  assert compare.table(saved) in out
  assert base.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
  adamw_rows = [line for line in out.splitlines() if line.startswith("| adamw_")]
  assert len(adamw_rows) == 3 and all(line.endswith("| 100.00% |") for line in adamw_rows)

  zero = ["adafactor-compare", "--workdir", str(tmp_path / "zero"), "--num_steps", "0"]
  assert compare.main(zero) == 2
  err = capsys.readouterr().err
  assert err.startswith("adafactor-compare: error: ") and "num_steps" in err, err
  assert not (tmp_path / "zero").exists()
  # One style of flag for both commands: the argparse spelling is refused, naming it.
  assert compare.main(["adafactor-compare", "--no-progress"]) == 2
  assert "no-progress" in capsys.readouterr().err
  assert main.main([PROG, "--noprogress", "--config.num_steps=0"]) == 2  # parsed, then refused
  assert "'num_steps' must be > 0" in capsys.readouterr().err
