"""The training job: resume, outputs, refusals, the CLI, the input pipeline and the comparison.

Training is slow to compile, so only two tiny runs are made, shared by module
fixtures: run A goes to the end through the CLI (a paper row), run B is a copy
of A with its last checkpoint deleted, resumed through the CLI (the default
config with ``--config.optimizer.clipping_threshold=None``, the same run).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
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
from flax import nnx

from adafactor_jax.training import compare, input_pipeline, main, optimizers, train
from adafactor_jax.training import config as config_lib
from adafactor_jax.training import workdir as workdir_lib
from adafactor_jax.training.configs import adamw, big_vision, default, paper, t5_finetune
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


# --------------------------------------------------------------------------- the two runs


@pytest.fixture(scope="module")
def run_a(tmp_path_factory) -> Path:
  """The tiny run to the end, from ``--config configs/paper.py:no_clipping``."""
  workdir = tmp_path_factory.mktemp("train") / "a"
  rc = run_main(f"--config={PAPER_FILE}:no_clipping", *tiny_flags(), f"--workdir={workdir}")
  assert rc == 0
  return workdir


@pytest.fixture(scope="module")
def run_b(run_a, tmp_path_factory) -> Path:
  """A copy of run A interrupted after its step-4 checkpoint, then resumed.

  Its metrics.jsonl still holds the records of steps 6 and 8, as the file of a
  run killed between its last logs and its next checkpoint would.
  """
  workdir = tmp_path_factory.mktemp("train") / "b"
  shutil.copytree(run_a, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  (workdir / "summary.json").unlink()
  # The same config as flags on the default job: the paper's relative step, no clipping.
  paper_step = {"learning_rate": None, "schedule": "constant", "warmup_fraction": 0.0}
  flags = tiny_flags(
    optimizer__clipping_threshold=None, **{f"optimizer__{k}": v for k, v in paper_step.items()}
  )
  rc = run_main(*flags, f"--workdir={workdir}")
  assert rc == 0
  return workdir


# --------------------------------------------------------------------------- resume


def test_resumed_run_ends_bit_identical_to_uninterrupted_run(run_a, run_b):
  a, b = restore(run_a, 8), restore(run_b, 8)
  assert set(a) == set(b) == {"params", "opt_state", "pending_losses"}
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


# --------------------------------------------------------------------------- outputs


def test_run_writes_metrics_plot_summary_and_config(run_a):
  records = read_jsonl(run_a / "metrics.jsonl")
  train_records = [r for r in records if "train_loss" in r]
  eval_records = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6, 8]  # every log_every
  assert [r["step"] for r in eval_records] == [4, 8]  # every eval_every
  # Telemetry (on by default) without clipping (this paper row): no clipped fractions.
  telemetry = {"step_size", "beta2", "rms_update_max", "rms_update_median"}
  assert all(set(r) == {"step", "train_loss", "steps_per_sec", *telemetry} for r in train_records)
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
  expected = json.loads(expected.to_json())
  assert expected["optimizer"]["clipping_threshold"] is None
  # Run A came from configs/paper.py:no_clipping, run B from the default config with the
  # paper's step and --config.optimizer.clipping_threshold=None: both are this config.
  assert json.loads((run_a / "config.json").read_text()) == expected
  assert json.loads((run_b / "config.json").read_text()) == expected


def test_adafactor_state_is_under_one_percent_of_adamw_at_default_size():
  config = default.get_config()
  _, params = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  param_bytes = train.tree_bytes(params)
  assert param_bytes > 1_000_000  # the default model, not a toy

  def state_bytes(opt_config) -> int:  # factored by the logical names, as the job does
    tx = optimizers.create_optimizer(opt_config, config.num_steps, nnx.get_partition_spec(params))
    return train.tree_bytes(jax.eval_shape(tx.init, params))

  adafactor_bytes = state_bytes(config.optimizer)
  adamw_bytes = state_bytes(adamw.get_config().optimizer)
  assert adamw_bytes >= 2 * param_bytes
  assert 0 < adafactor_bytes < 0.01 * adamw_bytes


# --------------------------------------------------------------------------- switching optimizers


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory) -> Path:
  """The tiny run with AdamW to the end, a checkpoint at step 4 and 8."""
  workdir = tmp_path_factory.mktemp("switch") / "adamw"
  flags = tiny_flags(optimizer__warmup_steps=2, optimizer__warmup_fraction=0.0)
  assert run_main("--config", "adamw", *flags, f"--workdir={workdir}") == 0
  return workdir


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
  _assert_refused(capsys, rc, fragments)
  assert file_hashes(workdir) == before


def test_a_switch_without_a_run_to_switch_from_is_refused(tmp_path, capsys):
  rc = run_main(
    *tiny_flags(), "--config.optimizer.switch_from=adamw", f"--workdir={tmp_path / 'new'}"
  )
  _assert_refused(capsys, rc, ["'optimizer.switch_from' = 'adamw'", "holds no run"])
  assert [p.name for p in (tmp_path / "new").iterdir()] == [".lock"]
  assert (tmp_path / "new" / ".lock").read_bytes() == b""


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
    _assert_refused(capsys, rc, [f"--workdir {str(workdir)!r} is in use", "untouched"])
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


# --------------------------------------------------------------------------- refusals


def _write(path: Path, text: str) -> str:
  path.write_text(text)
  return str(path)


EXTRA_KEY_CONFIG = """
from adafactor_jax.training.configs import default

def get_config():
  config = default.get_config()
  config.optimizer.lr = 1.0
  return config
"""

DICT_CONFIG = """
from adafactor_jax.training.configs import default

def get_config():
  config = default.get_config()
  for key, value in {tiny!r}.items():
    *parents, leaf = key.split(".")
    holder = config
    for part in parents:
      holder = holder[part]
    holder[leaf] = value
  return config.to_dict()
"""


# (case, flags before the tiny ones with {tmp} for the test's directory, message fragments)
BAD_INPUTS = [
  ("unknown_key", ["--config.optimizer.lr=1"], ["'optimizer.lr'", "Did you mean --config."]),
  ("wrong_type", ["--config.num_steps=abc"], ["num_steps", "abc"]),
  ("unknown_key_in_file", ["--config={tmp}/extra.py"], ["unknown config key 'optimizer.lr'"]),
  ("negative_lr", ["--config.optimizer.learning_rate=-1"], ["'optimizer.learning_rate'", "> 0"]),
  ("heads_do_not_divide", ["--config.model.num_heads=3"], ["'model.d_model'", "'model.num_heads'"]),
  ("hf_style_decay_rate", ["--config.optimizer.decay_rate=-0.8"], ["decay_rate", "0.8"]),
  ("zero_steps", ["--config.num_steps=0"], ["'num_steps'", "> 0"]),
  ("eval_fraction_1.5", ["--config.data.eval_fraction=1.5"], ["'data.eval_fraction'"]),
  ("checkpoint_between_logs", ["--config.checkpoint_every=3"], ["checkpoint_every", "log_every"]),
  ("unknown_optimizer", ["--config.optimizer.name=adam"], ["'optimizer.name'", "'adam'"]),
  (
    "telemetry_of_adamw",
    ["--config.optimizer.name=adamw", "--config.optimizer.learning_rate=1e-3"],
    ["'optimizer.telemetry'", "adamw", "--config.optimizer.telemetry=False"],
  ),
  (
    "telemetry_of_optax_adafactor",
    ["--config.optimizer.name=optax_adafactor", "--config.optimizer.learning_rate=1e-3"],
    ["'optimizer.telemetry'", "'optax_adafactor'", "--config.optimizer.telemetry=False"],
  ),
  (
    "schedule_without_lr",
    ["--config.optimizer.learning_rate=None"],  # the default job's cosine schedule stays
    ["'optimizer.schedule'", "'optimizer.learning_rate'"],
  ),
  ("missing_corpus", ["--config.data.corpus={tmp}/nowhere"], ["data.corpus", "nowhere"]),
  ("no_matching_files", ["--config.data.corpus={tmp}/corpus"], ["data.corpus", "no files", ".py"]),
  ("unknown_flag", ["--bogus=1"], ["bogus"]),
  ("mesh_of_other_devices", ["--config.mesh.data=2"], ["'mesh.data' = 2", "the 1 device(s)"]),
  ("both_mesh_axes_-1", ["--config.mesh.model=-1"], ["'mesh.data' and 'mesh.model'", "-1"]),
  (
    "rule_of_an_unknown_mesh_axis",
    ["--config.mesh.logical_axis_rules=(('embed', 'dta'),)"],
    ["'mesh.logical_axis_rules'", "('embed', 'dta')", "'dta'"],
  ),
  (
    "rule_not_a_pair",
    ["--config.mesh.logical_axis_rules=('embed',)"],
    ["'mesh.logical_axis_rules'", "'embed'", "pair"],
  ),
]


def _assert_refused(capsys, rc: int, fragments: list[str]) -> str:
  out, err = capsys.readouterr()
  assert rc == 2
  assert err.startswith(f"{PROG}: error: "), err
  assert "Traceback" not in err
  for fragment in fragments:
    assert fragment in err
  return err


@pytest.mark.parametrize(
  ("flags", "fragments"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
  flags, fragments, tmp_path, capsys
):
  _write(tmp_path / "extra.py", EXTRA_KEY_CONFIG)
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "notes.txt").write_text("no python here\n" * 100)
  before = file_hashes(tmp_path)
  flags = [flag.format(tmp=tmp_path) for flag in flags]
  config_file = [flag for flag in flags if flag.startswith("--config=")]
  overrides = [flag for flag in flags if not flag.startswith("--config=")]
  workdir = tmp_path / "run"
  # A --config=<file> flag must come before the --config.<key> ones; the last override wins.
  rc = run_main(*config_file, *tiny_flags(), *overrides, f"--workdir={workdir}")
  _assert_refused(capsys, rc, fragments)
  assert not workdir.exists()
  assert file_hashes(tmp_path) == before


def test_unknown_key_suggests_a_real_key(tmp_path, capsys):
  rc = run_main("--config.optimizer.nme=adamw", f"--workdir={tmp_path / 'run'}")
  err = _assert_refused(capsys, rc, ["'optimizer.nme'", "Did you mean --config.optimizer.name?"])
  assert err.count("\n") == 1
  assert not (tmp_path / "run").exists()


def test_config_file_returning_a_dict_is_refused(tmp_path, capsys):
  config_file = _write(tmp_path / "as_dict.py", DICT_CONFIG.format(tiny=TINY))
  rc = run_main(f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
  _assert_refused(capsys, rc, ["ConfigDict", "dict"])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", [f"{PAPER_FILE}:no_such_row", "paper:no_such_row"])
def test_unknown_paper_row_is_refused_with_the_rows(spec, tmp_path, capsys):
  rc = run_main(f"--config={spec}", f"--workdir={tmp_path / 'run'}")
  out, err = capsys.readouterr()
  assert rc == 2
  assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err
  assert "unknown row 'no_such_row'" in err
  assert all(row in err for row in paper.ROWS)
  assert not (tmp_path / "run").exists()
  with pytest.raises(ValueError, match="no_such_row"):
    paper.get_config("no_such_row")


def test_unwritable_workdir_is_refused(tmp_path, capsys):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  rc = run_main(*tiny_flags(), f"--workdir={blocker / 'run'}")
  _assert_refused(capsys, rc, ["--workdir", "not writable"])
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
  _assert_refused(capsys, rc, ["different config (model.d_model)"])
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
  _assert_refused(
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
  _assert_refused(capsys, rc, ["checkpointed at step 8", "'num_steps' = 4", "num_steps >= 8"])
  assert file_hashes(workdir) == before


@pytest.mark.parametrize(
  ("spec", "name", "workdir"),
  [
    ([], "default", "runs/default"),
    (["--config", "big_vision"], "big_vision", "runs/big_vision"),
    (["--config=paper:no_clipping"], "no_clipping", "runs/paper-no_clipping"),
    (["--config", "configs/t5_finetune.py"], "t5_finetune", "runs/t5_finetune"),  # no such file
    (["--config", "adamw", "--workdir", "elsewhere"], "adamw", "elsewhere"),
  ],
)
def test_packaged_configs_by_name_from_any_directory(spec, name, workdir, tmp_path, monkeypatch):
  """Outside the checkout, as from a wheel: the packaged configs by name, each in its own
  runs/<name> unless --workdir says otherwise."""
  monkeypatch.chdir(tmp_path)
  started = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda *args: started.append(args))
  assert run_main(*spec, "--config.num_steps=7") == 0
  ((config, got_workdir, _),) = started
  assert got_workdir == workdir and config.num_steps == 7
  expected = {
    "default": default.get_config(),
    "big_vision": big_vision.get_config(),
    "no_clipping": paper.get_config("no_clipping"),
    "t5_finetune": t5_finetune.get_config(),
    "adamw": adamw.get_config(),
  }[name]
  expected.num_steps = 7
  assert config.to_dict() == expected.to_dict()


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  rc = run_main("--config", "big_visio")
  err = _assert_refused(capsys, rc, ["'big_visio'", "no such file, nor a packaged config"])
  for name in ("adamw", "big_vision", "default", "t5_finetune", "paper:<row>", "no_clipping"):
    assert name in err
  assert list(tmp_path.iterdir()) == []
  assert main.main([PROG, "--help"]) == 0
  out = capsys.readouterr().out
  assert "Packaged configs: adamw, big_vision, default, smoke, t5_finetune, paper:<row>" in out


def test_bad_flag_in_a_real_process_exits_2_on_stderr(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "adafactor_jax.training",
      "--config.optimizr.name=adamw",
      f"--workdir={workdir}",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.startswith(f"{PROG}: error: ")
  assert "'optimizr.name'" in proc.stderr
  assert "Did you mean --config.optimizer.name?" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
  ("script", "missing"),
  [
    ("train_cli", "ml_collections"),
    ("train_cli", "flax"),
    ("train_cli", "tensorboardX"),
    ("compare_cli", "orbax"),
  ],
)
def test_console_scripts_without_the_train_extra_name_it_in_one_line(script, missing, tmp_path):
  """As after a plain ``pip install adafactor-jax``: the script says what to install."""
  code = (
    f"import sys; sys.modules[{missing!r}] = None\n"
    f"from adafactor_jax.training import {script}; {script}()\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 1
  prog = {"train_cli": "adafactor-train", "compare_cli": "adafactor-compare"}[script]
  assert proc.stderr.startswith(f"{prog}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
  assert "pip install 'adafactor-jax[train]'" in proc.stderr and repr(missing) in proc.stderr
  assert proc.stdout == "" and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- known bugs


@pytest.mark.parametrize("key", ["seed", "data.suffixes", "data.eval_fraction"])
def test_none_for_a_key_that_cannot_be_none_is_refused(key, tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = run_main(*tiny_flags(), f"--config.{key}=None", f"--workdir={workdir}")
  _assert_refused(capsys, rc, [key])
  assert not workdir.exists()


@pytest.mark.parametrize("overrides", [[], ["--config.num_steps=2"]], ids=["plain", "override"])
def test_missing_config_file_is_refused_naming_it(overrides, tmp_path, capsys):
  missing = tmp_path / "missing_config.py"
  rc = run_main(f"--config={missing}", *overrides, f"--workdir={tmp_path / 'run'}")
  _assert_refused(capsys, rc, [str(missing)])
  assert not (tmp_path / "run").exists()


def test_override_on_a_dict_config_file_is_refused(tmp_path, capsys):
  config_file = _write(tmp_path / "small_dict.py", "def get_config():\n  return {'seed': 1}\n")
  rc = run_main(f"--config={config_file}", "--config.num_steps=2", f"--workdir={tmp_path / 'run'}")
  _assert_refused(capsys, rc, ["dict"])
  assert not (tmp_path / "run").exists()


def test_stray_positional_argument_is_refused(tmp_path, capsys, monkeypatch):
  started = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda *args: started.append(args))
  rc = run_main(*tiny_flags(), f"--workdir={tmp_path / 'run'}", str(Path(adamw.__file__)))
  assert started == []
  _assert_refused(capsys, rc, ["adamw.py"])


# --------------------------------------------------------------------------- config helpers


def test_resolve_config_fills_defaults_and_coerces_types():
  user = ml_collections.ConfigDict(
    {"num_steps": 7, "optimizer": {"learning_rate": 1}, "data": {"suffixes": [".txt", ".md"]}}
  )
  resolved = config_lib.resolve_config(user)
  assert resolved.num_steps == 7
  assert resolved.optimizer.learning_rate == 1.0
  assert isinstance(resolved.optimizer.learning_rate, float)
  assert resolved.data.suffixes == (".txt", ".md")
  reference = default.get_config()
  assert resolved.model.to_dict() == reference.model.to_dict()
  assert resolved.optimizer.decay_rate == reference.optimizer.decay_rate
  assert user.to_dict() == {
    "num_steps": 7,
    "optimizer": {"learning_rate": 1},
    "data": {"suffixes": [".txt", ".md"]},
  }


@pytest.mark.parametrize(
  ("user", "fragments"),
  [
    ({"num_steps": True}, ["'num_steps'", "int", "bool"]),
    ({"optimizer": {"weight_decay": -0.1}}, ["'optimizer.weight_decay'", ">= 0"]),
    ({"model": {"d_model": "wide"}}, ["'model.d_model'", "int", "'wide'"]),
    ({"optimizer": {"decay_rte": 0.8}}, ["'optimizer.decay_rte'", "'optimizer.decay_rate'"]),
    ({"data": {"eval_fraction": 0.0}}, ["'data.eval_fraction'"]),
    ({"model": {"param_dtype": "float33"}}, ["'model.param_dtype'", "'float33'"]),
  ],
  ids=[
    "bool_for_int",
    "negative_weight_decay",
    "str_for_int",
    "typo_key",
    "eval_fraction_0",
    "bad_dtype",
  ],
)
def test_resolve_config_refuses_naming_the_key(user, fragments):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.resolve_config(ml_collections.ConfigDict(user))
  assert all(fragment in str(error.value) for fragment in fragments), str(error.value)
  assert isinstance(error.value, ValueError)


def test_learning_rate_schedule_warms_up_then_decays():
  assert optimizers.learning_rate_schedule(paper.get_config().optimizer, 100) is None  # rho_t
  opt = default.get_config().optimizer
  opt.learning_rate = 1e-2
  for warmup_steps, warmup_fraction, warmup in ((10, 0.0, 10), (0, 0.05, 5), (0, 0.0, 0)):
    opt.warmup_steps, opt.warmup_fraction = warmup_steps, warmup_fraction
    schedule = optimizers.learning_rate_schedule(opt, 100)
    values = np.array([float(schedule(t)) for t in range(101)])
    if warmup:
      assert 0 < values[0] < values[warmup // 2] < values[warmup]
      assert np.all(np.diff(values[: warmup + 1]) > 0)
    assert values[warmup] == pytest.approx(1e-2)
    assert np.all(np.diff(values[warmup:]) <= 0)
    assert values[100] < 0.5 * values[warmup]
  # The fraction follows num_steps: 5% of 1000 steps is 50.
  opt.warmup_fraction = 0.05
  values = [float(optimizers.learning_rate_schedule(opt, 1000)(t)) for t in (49, 50, 51)]
  assert values[0] < values[1] == pytest.approx(1e-2) and values[2] < values[1]
  bad = [
    ({"warmup_steps": 100, "warmup_fraction": 0.0}, "'optimizer.warmup_steps' must be in [0, num"),
    ({"warmup_steps": 0, "warmup_fraction": 1.0}, "'optimizer.warmup_fraction' must be in [0, 1)"),
    ({"warmup_steps": 10, "warmup_fraction": 0.05}, "(10) and 'optimizer.warmup_fraction' (0.05)"),
  ]
  for changes, message in bad:
    opt.update(changes)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
      optimizers.learning_rate_schedule(opt, 100)
  opt.update({"learning_rate": None, "warmup_steps": 0, "schedule": "constant"})
  with pytest.raises(config_lib.ConfigError, match="'optimizer.warmup_fraction' need"):
    optimizers.learning_rate_schedule(opt, 100)


def test_set_config_value_sets_none_on_a_typed_field():
  config = default.get_config()
  config_lib.set_config_value(config, "optimizer.clipping_threshold", None)
  assert config.optimizer.clipping_threshold is None
  assert config_lib.resolve_config(config).optimizer.clipping_threshold is None


def test_every_shipped_config_resolves_and_builds_its_optimizer():
  configs = {
    "default": default.get_config(),
    "adamw": adamw.get_config(),
    "big_vision": big_vision.get_config(),
    "t5_finetune": t5_finetune.get_config(),
    **{f"paper:{row}": paper.get_config(row) for row in paper.ROWS},
  }
  names = set()
  for config in configs.values():
    resolved = config_lib.resolve_config(config)
    optimizers.create_optimizer(resolved.optimizer, resolved.num_steps)
    names.add(resolved.optimizer.name)
  assert names == {"adafactor", "adamw", "big_vision", "t5x"}
  assert paper.get_config("no_clipping").optimizer.clipping_threshold is None


@pytest.mark.parametrize(
  ("name", "learning_rate", "step_size"),
  [
    ("adafactor", None, 1e-2),  # the relative step rho_1 = min(1e-2, 1)
    ("adafactor", 3e-3, 3e-3),
    ("t5x", 3e-3, 3e-3),
    ("big_vision", 3e-3, 3e-3),
    ("adamw", 3e-3, 3e-3),
  ],
)
def test_weight_decay_means_adamws_for_every_optimizer(name, learning_rate, step_size):
  """optimizer.weight_decay = 0.1: with a zero gradient every optimizer's first step is
  X <- X (1 - lr * 0.1), as optax.adamw's (the library's weight_decay_rate would be 1 - 0.1)."""
  config = config_lib.resolve_config(default.get_config())
  momentum = 0.9 if name == "big_vision" else None  # big_vision's momentum is not optional
  changes = {
    "name": name,
    "learning_rate": learning_rate,
    "weight_decay": 0.1,
    "momentum": momentum,
    "telemetry": name != "adamw",
    "schedule": "constant",  # the first step at the full learning rate
    "warmup_fraction": 0.0,
  }
  for key, value in changes.items():
    config_lib.set_config_value(config, f"optimizer.{key}", value)
  tx = optimizers.create_optimizer(config.optimizer, config.num_steps)
  params = {"w": jax.numpy.full((256, 128), 2.0), "b": jax.numpy.full((128,), -1.0)}
  grads = jax.tree.map(jax.numpy.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for key, x in params.items():
    np.testing.assert_allclose(updates[key], -step_size * 0.1 * x, rtol=1e-6)


@pytest.mark.parametrize("name", ["adafactor", "adamw", "t5x"])
def test_stochastic_rounding_key_rounds_bfloat16_params_for_any_optimizer(name):
  config = config_lib.resolve_config(default.get_config())
  config_lib.set_config_value(config, "optimizer.name", name)
  config_lib.set_config_value(config, "optimizer.learning_rate", 1e-3)
  config_lib.set_config_value(config, "optimizer.telemetry", name != "adamw")
  params = {"w": jax.numpy.ones((4, 4), jax.numpy.bfloat16)}
  grads = {"w": jax.numpy.full((4, 4), 1e-3, jax.numpy.bfloat16)}
  kinds = {}
  for rounding in (False, True):
    config_lib.set_config_value(config, "optimizer.stochastic_rounding", rounding)
    tx = optimizers.create_optimizer(config.optimizer, config.num_steps)
    updates, _ = tx.update(grads, tx.init(params), params)
    kinds[rounding] = updates["w"].dtype
  # Stochastic rounding's updates are float32 (see adafactor_jax.stochastic_rounding).
  assert kinds == {False: jax.numpy.bfloat16, True: jax.numpy.float32}


# --------------------------------------------------------------------------- input pipeline


def test_batch_at_is_a_pure_function_of_key_and_step():
  text = (np.arange(5000) % 251).astype(np.uint8)
  key = jax.random.key(0)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def batch(k, step):
    return np.asarray(input_pipeline.batch_at(text, k, step, 8, 16, sharding))

  first = batch(key, 3)
  assert first.shape == (8, 17) and first.dtype == np.int32
  assert np.array_equal(first, batch(key, 3))
  assert not np.array_equal(first, batch(key, 4))
  assert not np.array_equal(first, batch(jax.random.key(1), 3))
  for row in first:  # contiguous windows of the text
    assert np.array_equal(row, (row[0] + np.arange(17)) % 251)
  # The windows start where jax.random puts them, on any device: the data stream of a seed.
  starts = jax.random.randint(jax.random.fold_in(key, 3), (8,), 0, 5000 - 17)
  assert np.array_equal(first[:, 0], np.asarray(starts) % 251)
  # The evaluation stack holds batch i at index i.
  stacked = input_pipeline.eval_batches(text, key, 3, 8, 16, sharding)
  assert stacked.shape == (3, 8, 17)
  for i in range(3):
    assert np.array_equal(np.asarray(stacked[i]), batch(key, i))


def _python_files(root: Path, names: range) -> dict[str, bytes]:
  """Writes a .py file per name (in three folders) with a unique body; returns relpath: bytes."""
  files = {}
  for i in names:
    path = root / f"pkg{i % 3}" / f"mod{i}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = f"# module {i}\n".encode() + b"x = 1\n" * (5 + i % 7)
    path.write_bytes(data)
    files[str(path.relative_to(root))] = data
  return files


def _split_of(corpus: input_pipeline.Corpus, files: dict[str, bytes]) -> dict[str, str]:
  train_bytes, eval_bytes = corpus.train.tobytes(), corpus.eval.tobytes()
  split = {}
  for name, data in files.items():
    in_train, in_eval = data in train_bytes, data in eval_bytes
    assert in_train != in_eval, name  # every file in exactly one split
    split[name] = "train" if in_train else "eval"
  return split


def test_train_eval_split_is_by_file_disjoint_and_stable(tmp_path):
  root = tmp_path / "a"
  files = _python_files(root, range(40))
  (root / "notes.txt").write_bytes(b"NOT PYTHON " * 10)
  corpus = input_pipeline.load_corpus(str(root), (".py",), 10**7, eval_fraction=0.3)
  assert corpus.num_files == 40
  assert corpus.train.dtype == corpus.eval.dtype == np.uint8
  split = _split_of(corpus, files)
  assert 0 < list(split.values()).count("eval") < 40
  assert b"NOT PYTHON" not in corpus.train.tobytes() + corpus.eval.tobytes()
  assert len(corpus.train) + len(corpus.eval) < sum(map(len, files.values())) + 40

  again = input_pipeline.load_corpus(str(root), (".py",), 10**7, eval_fraction=0.3)
  assert np.array_equal(again.train, corpus.train) and np.array_equal(again.eval, corpus.eval)

  # Elsewhere, with more files: the split of a file depends only on its relative path.
  moved = tmp_path / "b"
  shutil.copytree(root, moved)
  extra = _python_files(moved, range(40, 80))
  bigger = input_pipeline.load_corpus(str(moved), (".py",), 10**7, eval_fraction=0.3)
  assert bigger.num_files == 80
  bigger_split = _split_of(bigger, {**files, **extra})
  assert {name: bigger_split[name] for name in files} == split


def test_max_bytes_caps_the_corpus(tmp_path):
  files = _python_files(tmp_path, range(40))
  budget = sum(map(len, files.values())) // 3
  corpus = input_pipeline.load_corpus(str(tmp_path), (".py",), budget, eval_fraction=0.3)
  assert 0 < corpus.num_files < 40
  train_bytes, eval_bytes = corpus.train.tobytes(), corpus.eval.tobytes()
  chosen = [data for data in files.values() if data in train_bytes or data in eval_bytes]
  assert len(chosen) == corpus.num_files
  assert sum(map(len, chosen)) <= budget


def test_single_file_is_split_by_fraction(tmp_path):
  data = bytes(range(256)) * 4
  path = tmp_path / "book.txt"
  path.write_bytes(data)
  corpus = input_pipeline.load_corpus(str(path), eval_fraction=0.25)
  assert corpus.num_files == 1
  assert corpus.train.tobytes() + corpus.eval.tobytes() == data
  assert len(corpus.eval) == len(data) // 4
  with pytest.raises(input_pipeline.CorpusError, match="eval split.*book.txt"):
    input_pipeline.load_corpus(str(path), eval_fraction=0.25, min_bytes=300)


# --------------------------------------------------------------------------- compare


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
      "param_bytes": train.tree_bytes(params),
      "optimizer_state_bytes": train.tree_bytes(jax.eval_shape(tx.init, params)),
      "adamw_state_bytes": train.tree_bytes(jax.eval_shape(adamw_tx.init, params)),
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
  # Every run, big_vision's beta2_cap of 0.999 included.
  assert all(c.model.d_model == 48 and c.optimizer.beta2_cap is None for c in configs)
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
