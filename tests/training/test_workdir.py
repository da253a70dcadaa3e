"""The workdir (adafactor_jax/training/workdir.py): its lock, the run it holds, its checkpoints,
and the config.json of older versions."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from adafactor_jax.training import config as config_lib
from adafactor_jax.training import workdir as workdir_lib
from adafactor_jax.training.configs import adamw, big_vision, default, t5_finetune
from tests.conftest import assert_bit_identical
from tests.training.test_train import (
  PAPER_FILE,
  TINY,
  assert_refused,
  file_hashes,
  read_jsonl,
  restore,
  run_main,
  tiny_flags,
  without_rate,
)


def holding_workdir(workdir: Path) -> subprocess.Popen:
  """Another process holding ``workdir`` as a run does (Workdir.claimed), until its stdin ends."""
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys; from adafactor_jax.training import workdir as workdir_lib\n"
      f"with workdir_lib.Workdir({str(workdir)!r}).claimed():\n"
      "  print('held', flush=True); sys.stdin.read()",
    ],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert holder.stdout is not None
  ready, _, _ = select.select([holder.stdout], [], [], 60)
  if not ready or holder.stdout.readline() != "held\n":
    holder.kill()
    raise AssertionError("the holder did not take the workdir within 60 s")
  return holder


def release_workdir(holder: subprocess.Popen) -> None:
  try:
    holder.communicate("", timeout=60)
  except subprocess.TimeoutExpired:
    holder.kill()
    raise
  assert holder.returncode == 0


def test_a_workdir_another_process_trains_in_is_refused_untouched(adamw_run, tmp_path, capsys):
  """Two runs resuming from one checkpoint would interleave their checkpoints and metrics:
  while another process holds the workdir, a second run is refused and changes nothing; once
  that process ends, the same command resumes."""
  workdir = tmp_path / "busy"
  shutil.copytree(adamw_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")  # as a run killed after its step-4 checkpoint
  (workdir / "summary.json").unlink()
  flags = tiny_flags(optimizer__warmup_steps=2, optimizer__warmup_fraction=0.0)  # adamw_run's
  holder = holding_workdir(workdir)
  try:
    before = file_hashes(workdir)
    rc = run_main("--config", "adamw", *flags, f"--workdir={workdir}")
    assert_refused(capsys, rc, [f"--workdir {str(workdir)!r} is in use", "untouched"])
    assert file_hashes(workdir) == before
  finally:
    release_workdir(holder)
  assert run_main("--config", "adamw", *flags, f"--workdir={workdir}") == 0
  assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == 4


def test_a_workdir_on_a_filesystem_without_locks_still_trains(tmp_path, monkeypatch, caplog):
  """Some FUSE mounts refuse flock: the run goes on, unguarded, and says so."""
  calls = []

  def no_locks(fd, operation):
    calls.append(operation)
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lib.fcntl, "flock", no_locks)
  assert run_main(*tiny_flags(), f"--workdir={tmp_path / 'run'}") == 0
  assert calls == [fcntl.LOCK_EX | fcntl.LOCK_NB]
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == TINY["num_steps"]
  assert "refuses a lock (No locks available)" in caplog.text


def test_unwritable_workdir_is_refused(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  rc = run_main(*tiny_flags(), f"--workdir={blocker / 'run'}")
  assert_refused(capsys, rc, ["--workdir", "not writable"])
  assert blocker.read_text() == "not a directory"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_workdir_of_a_different_run_is_refused_and_left_untouched(run_a, tmp_path, capsys):
  workdir = tmp_path / "a_copy"
  shutil.copytree(run_a, workdir)
  before = file_hashes(workdir)
  assert any(name.startswith("checkpoints/8/") for name in before)
  rc = run_main(
    f"--config={PAPER_FILE}:no_clipping",
    *tiny_flags(model__d_model=32),
    f"--workdir={workdir}",
  )
  assert_refused(capsys, rc, ["different config (model.d_model)"])
  assert file_hashes(workdir) == before


def test_a_warmup_in_steps_or_as_a_fraction_of_the_run_is_the_same_run(tmp_path):
  """The workdir compares the warmup a run makes, not how its config wrote it: runs recorded
  with warmup steps (or before warmup_fraction existed) resume under the fraction that makes
  the same steps, and no other; a fraction that a longer run lengthens is another run."""
  recorded = default.get_config()
  recorded.optimizer.warmup_steps, recorded.optimizer.warmup_fraction = 50, 0.0
  saved = json.loads(recorded.to_json())
  without_fraction = {k: v for k, v in saved["optimizer"].items() if k != "warmup_fraction"}
  workdir = workdir_lib.Workdir(str(tmp_path))
  for old_style in (saved, {**saved, "optimizer": without_fraction}):
    (tmp_path / "config.json").write_text(json.dumps(old_style))
    config = default.get_config()
    assert (config.num_steps, config.optimizer.warmup_fraction) == (1000, 0.05)
    assert workdir.check(config, None) is None
    config.optimizer.warmup_fraction = 0.1
    message = "(optimizer.warmup_steps/warmup_fraction: 50 warmup steps, this config 100 at "
    with pytest.raises(config_lib.ConfigError, match=re.escape(message + "num_steps=1000)")):
      workdir.check(config, None)
    config.optimizer.warmup_steps, config.optimizer.warmup_fraction = 50, 0.0
    assert workdir.check(config, None) is None
  # A constant schedule may run longer, but not with a warmup that grows with it.
  recorded.optimizer.schedule, recorded.optimizer.warmup_steps = "constant", 0
  recorded.optimizer.warmup_fraction = 0.05
  (tmp_path / "config.json").write_text(recorded.to_json())
  config = ml_collections.ConfigDict(recorded.to_dict())
  config.num_steps = 2000
  with pytest.raises(config_lib.ConfigError, match=re.escape(message + "num_steps=2000)")):
    workdir.check(config, None)
  config.optimizer.warmup_steps, config.optimizer.warmup_fraction = 50, 0.0
  assert workdir.check(config, None) is None
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_workdir_whose_checkpoints_hold_another_model_is_refused_and_left_untouched(
  run_a, tmp_path, capsys
):
  """Without config.json to tell (deleted, or checkpoints copied in), the checkpoint's
  own parameter shapes are checked before anything is written."""
  workdir = tmp_path / "a_copy"
  shutil.copytree(run_a, workdir)
  (workdir / "config.json").unlink()
  before = file_hashes(workdir)
  rc = run_main(*tiny_flags(model__mlp_dim=64), f"--workdir={workdir}")
  assert_refused(
    capsys, rc, ["checkpoint of step 8 holds a different model", "'blocks/0/mlp_in/kernel'"]
  )
  assert file_hashes(workdir) == before


def test_a_shorter_run_than_the_checkpoints_is_refused_and_left_untouched(run_a, tmp_path, capsys):
  """Resuming an 8-step workdir with num_steps=4 would report step 8's state as a 4-step run."""
  workdir = tmp_path / "a_copy"
  shutil.copytree(run_a, workdir)
  before = file_hashes(workdir)
  rc = run_main(
    f"--config={PAPER_FILE}:no_clipping", *tiny_flags(num_steps=4), f"--workdir={workdir}"
  )
  assert_refused(capsys, rc, ["checkpointed at step 8", "'num_steps' = 4", "num_steps >= 8"])
  assert file_hashes(workdir) == before


# The optimizer section as the versions before the optimizer by name wrote it to config.json
# (the default job's): every optimizer's keys side by side.
EARLIER_OPTIMIZER = {
  "name": "adafactor",
  "learning_rate": 0.04,
  "schedule": "cosine",
  "warmup_steps": 0,
  "warmup_fraction": 0.05,
  "decay_rate": 0.8,
  "decay_offset": 0,
  "beta2_cap": None,
  "clipping_threshold": 1.0,
  "multiply_by_parameter_scale": True,
  "epsilon1": 1e-30,
  "epsilon2": 0.001,
  "warmup_init": False,
  "momentum": None,
  "momentum_dtype": "float32",
  "weight_decay": None,
  "factored": True,
  "min_dim_size_to_factor": 128,
  "skip_nonfinite": False,
  "fused_backward": False,
  "stochastic_rounding": False,
  "rounding_seed": 0,
  "telemetry": True,
  "b1": 0.9,
  "b2": 0.999,
  "eps": 1e-08,
  "switch_from": None,
  "warm_start": True,
}


@pytest.mark.parametrize(
  ("changes", "config"),
  [
    ({}, default.get_config),
    ({"name": "adamw", "learning_rate": 3e-3, "telemetry": False}, adamw.get_config),
    (
      {"name": "big_vision", "learning_rate": 3e-3, "momentum": 0.9}
      | {"momentum_dtype": "bfloat16", "beta2_cap": 0.999, "min_dim_size_to_factor": 32},
      big_vision.get_config,
    ),
    ({"name": "t5x", "learning_rate": 1e-3, "schedule": "constant"}, t5_finetune.get_config),
  ],
  ids=["default", "adamw", "big_vision", "t5_finetune"],
)
def test_an_earlier_versions_config_json_is_the_same_run(changes, config):
  """Its keys of other optimizers were ignored, and are dropped; those it lacks were the
  library's defaults. (t5_finetune's warmup_fraction 0.0 is the key's absence.)"""
  earlier = {**EARLIER_OPTIMIZER, **changes}
  if changes.get("name") == "t5x":
    del earlier["warmup_fraction"]
  upgraded = workdir_lib.upgrade({"optimizer": earlier}).optimizer.to_dict()
  assert upgraded == json.loads(config_lib.resolve_config(config()).optimizer.to_json())


def test_an_earlier_optax_adafactor_keeps_its_arguments_under_optaxs_names():
  earlier = {**EARLIER_OPTIMIZER, "name": "optax_adafactor", "epsilon1": 1e-20}
  upgraded = workdir_lib.upgrade({"optimizer": earlier}).optimizer
  assert upgraded.eps == 1e-20 and upgraded.dtype_momentum == "float32"
  assert "epsilon1" not in upgraded and "b1" not in upgraded


def test_a_workdir_of_an_earlier_version_resumes(run_a, tmp_path, capsys):
  """run A's workdir, its last checkpoint deleted and its config.json and step-4 checkpoint
  as an earlier version wrote them (no pending gradient norms), resumes to the same end."""
  workdir = tmp_path / "earlier"
  shutil.copytree(run_a, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  (workdir / "summary.json").unlink()
  tree = restore(workdir, 4)
  del tree["pending_grad_norms"]
  shutil.rmtree(workdir / "checkpoints" / "4")
  handler = ocp.StandardCheckpointHandler()
  with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handler) as manager:
    manager.save(4, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  config = json.loads((workdir / "config.json").read_text())
  config["optimizer"] = {  # configs/paper.py:no_clipping
    **EARLIER_OPTIMIZER,
    **{"learning_rate": None, "schedule": "constant", "warmup_fraction": 0.0},
    "clipping_threshold": None,
  }
  (workdir / "config.json").write_text(json.dumps(config))
  rc = run_main(f"--config={PAPER_FILE}:no_clipping", *tiny_flags(), f"--workdir={workdir}")
  assert rc == 0, capsys.readouterr().err
  assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == 4
  assert without_rate(read_jsonl(workdir / "metrics.jsonl")) == without_rate(
    read_jsonl(run_a / "metrics.jsonl")
  )
  assert_bit_identical(restore(workdir, 8), restore(run_a, 8))


def test_a_finished_run_is_its_summary_and_its_last_checkpoint(tmp_path):
  """A copy of a finished run whose last checkpoint was deleted (to resume it, on another mesh)
  keeps its summary.json: it is not finished, and resumes."""
  (tmp_path / "summary.json").write_text(json.dumps({"steps": 8, "final_eval_loss": 1.0}))
  work = workdir_lib.Workdir(str(tmp_path), checkpointed=4)
  assert work.finished_summary(8) is None
  work.checkpointed = 8
  assert work.finished_summary(8) == {"steps": 8, "final_eval_loss": 1.0}
  assert work.finished_summary(16) is None  # a longer run goes on from it


def test_an_int8_checkpoint_of_the_old_blocks_of_32_is_refused_in_one_line(tmp_path, capsys):
  """int8 momentum's scales were one per 32 elements along the last axis until 2026-12: a
  checkpoint holding them is refused naming the change, not misread, and is left as it was."""
  workdir = tmp_path / "int8"
  momentum = {"optimizer__momentum": 0.9, "optimizer__momentum_dtype": "int8"}
  assert run_main(*tiny_flags(**momentum), f"--workdir={workdir}") == 0
  shutil.rmtree(workdir / "checkpoints" / "8")
  tree = restore(workdir, 4)

  def old_blocks(path, leaf):
    keys = [getattr(key, "key", None) for key in path]
    if keys[0] != "opt_state" or "scale" not in keys:
      return leaf
    last = leaf.shape[-1] if leaf.shape else 1  # today's scales keep it, or make it 1
    return np.ones((*leaf.shape[:-1], last // 32 if last % 32 == 0 else 1), np.float32)

  shapes = jax.tree.map(np.shape, tree)
  tree = jax.tree_util.tree_map_with_path(old_blocks, tree)
  assert jax.tree.map(np.shape, tree) != shapes  # the embedding's scales: (256, 1), not (1, d)
  shutil.rmtree(workdir / "checkpoints" / "4")
  (workdir / "summary.json").unlink()
  handler = ocp.StandardCheckpointHandler()
  with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handler) as manager:
    manager.save(4, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  capsys.readouterr()
  rc = run_main(*tiny_flags(**momentum), f"--workdir={workdir}")
  err = capsys.readouterr().err
  assert rc == 2, err
  assert "holds optimizer state of shapes this version's optimizer does not make" in err
  assert "int8 momentum's scales changed layout" in err and "\n" not in err.strip()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
