"""The training job: resume, its outputs, switching optimizers mid-run, a rerun of a finished run.

Training is slow to compile, so few tiny runs are made, shared by session
fixtures (conftest.py): run A goes to the end through the CLI (a paper row), run B is a copy
of A with its last checkpoint deleted, resumed through the CLI (the default
config with ``--config.optimizer.clipping_threshold=None``, the same run). The helpers here
(the tiny config, run_main, ...) are shared by the other test files of the application.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from adafactor_jax.training import config as config_lib
from adafactor_jax.training import main, metrics, optimizers, train
from adafactor_jax.training.configs import adamw, default, paper, smoke
from tests.conftest import assert_bit_identical

PROG = "adafactor-train"


PAPER_FILE = paper.__file__


TINY = {
  "model.d_model": 16,
  "model.num_layers": 1,
  "model.num_heads": 2,
  "model.mlp_dim": 32,
  "data.seq_len": 16,
  "data.batch_size": 8,  # a multiple of 8 devices: the same run on any mesh of 8 or 1
  "data.max_bytes": 300_000,
  "eval_batches": 2,
  "num_steps": 8,
  "log_every": 2,
  "eval_every": 4,
  "checkpoint_every": 4,
  "keep_checkpoints": 5,
}


def tiny_flags(**changes) -> list[str]:
  """``--config.<key>=<value>`` flags for the tiny run; keyword keys use __ for dots."""
  values = {**TINY, **{k.replace("__", "."): v for k, v in changes.items()}}
  return [f"--config.{key}={value}" for key, value in values.items()]


def tiny_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  for key, value in TINY.items():
    config_lib.set_config_value(config, key, value)
  return config


def cli_command() -> list[str]:
  """The installed ``adafactor-train``, or the module where the script is not installed."""
  script = Path(sys.executable).with_name(PROG)
  return [str(script)] if script.exists() else [sys.executable, "-m", "adafactor_jax.training"]


def run_main(*args: str) -> int:
  return main.main([PROG, *args, "--progress=false"])


def read_jsonl(path: Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def restore(workdir: Path, step: int) -> dict:
  """A checkpoint's tree, on this process's first device whatever mesh wrote it."""
  handler = ocp.StandardCheckpointHandler()
  with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handler) as manager:
    assert step in manager.all_steps()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      dict(manager.item_metadata(step)),
    )
    return manager.restore(step, args=ocp.args.StandardRestore(target))


def file_hashes(root: Path) -> dict[str, str]:
  """sha256 of every file under root, by relative path."""
  return {
    str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def without_rate(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records]


def assert_refused(capsys, rc: int, fragments: list[str]) -> str:
  out, err = capsys.readouterr()
  assert rc == 2
  assert err.startswith(f"{PROG}: error: "), err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in err
  return err


def test_resumed_run_ends_bit_identical_to_uninterrupted_run(run_a, run_b):
  a, b = restore(run_a, 8), restore(run_b, 8)
  assert set(a) == set(b) == {"params", "opt_state", "pending_losses", "pending_grad_norms"}
  assert_bit_identical(a["params"], b["params"])
  assert_bit_identical(a["opt_state"], b["opt_state"])
  # The run moved: the final parameters are not the step-4 ones.
  mid = restore(run_a, 4)["params"]
  assert any(
    not np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(mid), jax.tree.leaves(a["params"]), strict=True)
  )


def test_resumed_run_reports_resume_and_keeps_metrics_without_duplicates(run_a, run_b):
  summary_a = json.loads((run_a / "summary.json").read_text())
  summary_b = json.loads((run_b / "summary.json").read_text())
  assert summary_a["resumed_from"] == 0
  assert summary_b["resumed_from"] == 4
  for key in ("final_train_loss", "final_eval_loss", "optimizer_state_bytes", "num_params"):
    assert summary_b[key] == summary_a[key]

  records_a = read_jsonl(run_a / "metrics.jsonl")
  records_b = read_jsonl(run_b / "metrics.jsonl")
  assert without_rate(records_b) == without_rate(records_a)
  kinds = [(r["step"], "eval_loss" in r) for r in records_b]
  assert len(kinds) == len(set(kinds))
  # Records up to the kept checkpoint are read back, not measured again: their
  # timings are A's own. Later ones were measured by the resumed run.
  assert [r for r in records_b if r["step"] <= 4] == [r for r in records_a if r["step"] <= 4]
  assert [r for r in records_b if r["step"] > 4] != [r for r in records_a if r["step"] > 4]
  # The checkpoint resumed from is untouched.
  assert file_hashes(run_b / "checkpoints" / "4") == file_hashes(run_a / "checkpoints" / "4")


def test_run_writes_metrics_plot_summary_and_config(run_a):
  records = read_jsonl(run_a / "metrics.jsonl")
  train_records = [r for r in records if "train_loss" in r]
  eval_records = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6, 8]  # every log_every
  assert [r["step"] for r in eval_records] == [4, 8]  # every eval_every
  # Telemetry (on by default) without clipping (this paper row): no clipped fractions; the
  # gradient's norm (no 'optimizer.clip_global_norm': no clipped share).
  telemetry = {"step_size", "beta2", "rms_update_max", "rms_update_median"}
  gradient = {"grad_norm", "grad_norm_max"}
  assert all(
    set(r) == {"step", "train_loss", "steps_per_sec", *gradient, *telemetry} for r in train_records
  )
  assert all(0 < r["grad_norm"] <= r["grad_norm_max"] for r in train_records)
  assert all(set(r) == {"step", "eval_loss"} for r in eval_records)
  # Bytes of a 256-symbol alphabet: a fresh model's loss is near ln(256).
  losses = [r["train_loss"] for r in train_records] + [r["eval_loss"] for r in eval_records]
  assert all(0 < x < 2 * math.log(256) for x in losses)
  assert all(r["steps_per_sec"] > 0 for r in train_records)

  png = (run_a / "loss.png").read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n")
  import matplotlib.image

  image = matplotlib.image.imread(run_a / "loss.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert np.ptp(image) > 0  # not a blank image

  summary = json.loads((run_a / "summary.json").read_text())
  assert set(summary) == {
    "optimizer",
    "steps",
    "resumed_from",
    "final_train_loss",
    "final_eval_loss",
    "wall_time_sec",
    "num_params",
    "param_bytes",
    "optimizer_state_bytes",
    "adamw_state_bytes",
    "mesh",
    "num_devices",
    "num_processes",
    "param_bytes_per_device",
    "optimizer_state_bytes_per_device",
    "switched_from",
  }
  assert summary["optimizer"] == "adafactor"
  assert summary["switched_from"] is None
  # One device: a mesh of one, holding everything.
  assert summary["mesh"] == {"data": 1, "model": 1}
  assert summary["num_devices"] == summary["num_processes"] == 1
  assert summary["param_bytes_per_device"] == summary["param_bytes"]
  assert summary["optimizer_state_bytes_per_device"] == summary["optimizer_state_bytes"]
  assert summary["steps"] == 8
  assert summary["final_train_loss"] == train_records[-1]["train_loss"]
  assert summary["final_eval_loss"] == eval_records[-1]["eval_loss"]
  assert summary["wall_time_sec"] > 0

  restored = restore(run_a, 8)
  params, opt_state = restored["params"], restored["opt_state"]
  assert summary["num_params"] == sum(np.size(x) for x in jax.tree.leaves(params))
  assert summary["param_bytes"] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  assert summary["optimizer_state_bytes"] == sum(
    np.asarray(x).nbytes for x in jax.tree.leaves(opt_state)
  )
  # AdamW keeps two float32 moments per parameter (and a step count).
  assert (
    2 * summary["param_bytes"] <= summary["adamw_state_bytes"] <= 2 * summary["param_bytes"] + 8
  )


def test_cli_paper_row_and_none_override_are_saved_in_config_json(run_a, run_b):
  expected = tiny_config()
  paper_step = {"learning_rate": None, "schedule": "constant", "warmup_fraction": 0.0}
  for key, value in {**paper_step, "clipping_threshold": None}.items():
    config_lib.set_config_value(expected, f"optimizer.{key}", value)
  # config.json records the optimizer's arguments the config leaves out, at their defaults.
  expected = json.loads(config_lib.resolve_config(expected).to_json())
  assert expected["optimizer"]["clipping_threshold"] is None
  # Run A came from configs/paper.py:no_clipping, run B from the default config with the
  # paper's step and --config.optimizer.clipping_threshold=None: both are this config.
  assert json.loads((run_a / "config.json").read_text()) == expected
  assert json.loads((run_b / "config.json").read_text()) == expected


def test_adafactor_state_is_under_one_percent_of_adamw_at_default_size():
  config = default.get_config()
  _, params = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  param_bytes = metrics.tree_bytes(params)
  assert param_bytes > 1_000_000  # the default model, not a toy

  def state_bytes(opt_config) -> int:  # factored by the logical names, as the job does
    tx = optimizers.create_optimizer(opt_config, config.num_steps, nnx.get_partition_spec(params))
    return metrics.tree_bytes(jax.eval_shape(tx.init, params))

  adafactor_bytes = state_bytes(config.optimizer)
  adamw_bytes = state_bytes(adamw.get_config().optimizer)
  assert adamw_bytes >= 2 * param_bytes
  assert 0 < adafactor_bytes < 0.01 * adamw_bytes


def _switched(adamw_run: Path, workdir: Path, *flags: str) -> int:
  """Adafactor from AdamW's step-4 checkpoint, as after a run killed past step 4."""
  shutil.copytree(adamw_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  (workdir / "summary.json").unlink()
  return run_main(
    *tiny_flags(), "--config.optimizer.switch_from=adamw", *flags, f"--workdir={workdir}"
  )


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_a_run_switches_from_adamw_to_adafactor_at_its_checkpoint(adamw_run, warm, tmp_path):
  workdir = tmp_path / "switched"
  assert _switched(adamw_run, workdir, f"--config.optimizer.warm_start={warm}") == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["optimizer"] == "adafactor" and summary["resumed_from"] == 4
  assert summary["switched_from"] == {"step": 4, "switched_from": "adamw", "warm_start": warm}
  records = read_jsonl(workdir / "metrics.jsonl")
  assert {"step": 4, "switched_from": "adamw", "warm_start": warm} in records
  # AdamW's records up to the switch, Adafactor's after it.
  adamw_records = read_jsonl(adamw_run / "metrics.jsonl")
  assert [r for r in records if r["step"] <= 4 and "switched_from" not in r] == [
    r for r in adamw_records if r["step"] <= 4
  ]
  final = restore(workdir, 8)
  # Adafactor's state (one second moment: the tiny model is too small to factor), and the
  # step count of the whole run when warm (4 steps of AdamW, then 4 of Adafactor), of
  # Adafactor's steps alone when cold.
  assert summary["optimizer_state_bytes"] < 0.6 * summary["adamw_state_bytes"]
  counts = [
    x for p, x in jax.tree_util.tree_leaves_with_path(final["opt_state"]) if "count" in str(p)
  ]
  assert counts and all(int(c) == (8 if warm else 4) for c in counts)
  # Rerunning the same command resumes the switched run as any run.
  assert (
    run_main(
      *tiny_flags(),
      "--config.optimizer.switch_from=adamw",
      f"--config.optimizer.warm_start={warm}",
      f"--workdir={workdir}",
    )
    == 0
  )


def test_warm_and_cold_switches_differ_and_warm_starts_from_adams_moments(adamw_run, tmp_path):
  warm_dir, cold_dir = tmp_path / "warm", tmp_path / "cold"
  assert _switched(adamw_run, warm_dir) == 0
  assert _switched(adamw_run, cold_dir, "--config.optimizer.warm_start=False") == 0
  warm, cold = restore(warm_dir, 8)["params"], restore(cold_dir, 8)["params"]
  assert any(
    not np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(warm), jax.tree.leaves(cold), strict=True)
  )


@pytest.mark.parametrize(
  ("flags", "fragments"),
  [
    (["--config.optimizer.switch_from=big_vision"], ["'big_vision'", "this one used 'adamw'"]),
    (["--config.optimizer.switch_from=adafactor"], ["'optimizer.switch_from'", "'adafactor'"]),
    (
      ["--config", "adamw", "--config.optimizer.switch_from=t5x"],
      ["'optimizer.warm_start'", "warm_start=False"],
    ),
  ],
  ids=["not_that_optimizers_run", "switch_from_itself", "warm_into_adamw"],
)
def test_a_switch_that_does_not_fit_the_workdir_is_refused_untouched(
  adamw_run, flags, fragments, tmp_path, capsys
):
  workdir = tmp_path / "a_copy"
  shutil.copytree(adamw_run, workdir)
  before = file_hashes(workdir)
  config_file = flags[:2] if flags[0] == "--config" else []
  overrides = flags[2:] if config_file else flags
  rc = run_main(*config_file, *tiny_flags(), *overrides, f"--workdir={workdir}")
  assert_refused(capsys, rc, fragments)
  assert file_hashes(workdir) == before


def test_a_switch_without_a_run_to_switch_from_is_refused(tmp_path, capsys):
  rc = run_main(
    *tiny_flags(), "--config.optimizer.switch_from=adamw", f"--workdir={tmp_path / 'new'}"
  )
  assert_refused(capsys, rc, ["'optimizer.switch_from' = 'adamw'", "holds no run"])
  assert [p.name for p in (tmp_path / "new").iterdir()] == [".lock"]
  assert (tmp_path / "new" / ".lock").read_bytes() == b""


# --------------------------------------------------------------------------- smoke run, rerun


def test_the_smoke_config_runs_and_a_rerun_of_the_finished_run_changes_nothing(tmp_path, capsys):
  """adafactor-train --config smoke: a whole run, quickly. Rerunning its finished workdir
  returns the recorded summary and writes nothing: no new summary, config or event file."""
  workdir = tmp_path / "smoke"
  assert run_main("--config", "smoke", f"--workdir={workdir}") == 0
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["steps"] == 40 and math.isfinite(summary["final_eval_loss"])
  assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl") if "eval_loss" in r] == [20, 40]
  before = file_hashes(workdir)
  assert train.train_and_evaluate(smoke.get_config(), str(workdir), progress=False) == summary
  assert main.main([PROG, "--config", "smoke", f"--workdir={workdir}"]) == 0
  assert "holds this run, finished" in capsys.readouterr().out
  assert file_hashes(workdir) == before
