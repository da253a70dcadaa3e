"""The one trainer on a mesh: 8 simulated devices, two processes, resharded resume, refusals.

Every run is the real ``adafactor-train`` in a subprocess (the device count
must be set before jax is imported), on test_train's tiny config; the runs
share a module fixture and go in parallel.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from adafactor_jax.training import partitioning, train
from tests.conftest import collectives
from tests.training.test_train import cli_command, read_jsonl, restore, tiny_config, tiny_flags
from tests.training.test_workdir import holding_workdir, release_workdir

TIMEOUT_S = 300
FLAGS = [*tiny_flags(), "--progress=false"]
MESHES = {  # name: (simulated devices, flags)
  "1x1": (1, []),
  "2x4": (8, ["--config.mesh.model=4"]),
  "8x1": (8, []),  # mesh.data=-1: all the devices
  "4x2": (8, ["--config.mesh.data=4", "--config.mesh.model=-1"]),
}


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _train(workdir: Path, mesh: str, *extra: str) -> subprocess.CompletedProcess:
  devices, flags = MESHES[mesh]
  return subprocess.run(
    [*cli_command(), *FLAGS, *flags, *extra, f"--workdir={workdir}"],
    env=_env(devices),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir: Path) -> list[subprocess.CompletedProcess]:
  """A 2 x 4 mesh over two processes of 4 devices each, on 127.0.0.1."""
  coordinator = f"127.0.0.1:{_free_port()}"
  processes = [
    subprocess.Popen(
      [*cli_command(), *FLAGS, "--config.mesh.model=4", f"--workdir={workdir}"]
      + ["--coordinator_address", coordinator, "--num_processes", "2", "--process_id", str(i)]
      + ["--initialization_timeout", "120"],
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S) for p in processes]
  finally:
    for p in processes:
      p.kill()
  return [
    subprocess.CompletedProcess(p.args, p.returncode, out, err)
    for p, (out, err) in zip(processes, outputs, strict=True)
  ]


def test_a_busy_workdir_is_refused_by_every_process_of_a_multi_host_job(tmp_path):
  """Process 0 takes the workdir's lock for the job; every process hears that it is held and
  exits with the refusal, rather than waiting at the next barrier for a process 0 gone."""
  workdir = tmp_path / "busy"
  holder = holding_workdir(workdir)
  try:
    results = _two_processes(workdir)
  finally:
    release_workdir(holder)
  for r in results:
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"--workdir {str(workdir)!r} is in use" in r.stderr
  assert [p.name for p in workdir.iterdir()] == [".lock"]


def _resume_copy(source: Path, workdir: Path) -> Path:
  """A copy of a finished run as a run killed after its step-4 checkpoint would leave it."""
  shutil.copytree(source, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  (workdir / "summary.json").unlink()
  return workdir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("mesh")
  with ThreadPoolExecutor(max_workers=4) as pool:
    meshes = {name: pool.submit(_train, root / name, name) for name in ("1x1", "2x4", "8x1")}
    two = pool.submit(_two_processes, root / "two_processes")
    for name, future in meshes.items():
      assert future.result().returncode == 0, (name, future.result().stderr[-3000:])
    resumed = {
      name: pool.submit(_train, _resume_copy(root / "2x4", root / f"2x4_then_{name}"), name)
      for name in ("8x1", "4x2", "1x1")
    }
    for name, future in resumed.items():
      assert future.result().returncode == 0, (name, future.result().stderr[-3000:])
    for i, process in enumerate(two.result()):
      assert process.returncode == 0, (i, process.stderr[-3000:])
  workdirs = {name: root / name for name in meshes}
  workdirs.update({f"2x4_then_{name}": root / f"2x4_then_{name}" for name in resumed})
  workdirs["two_processes"] = root / "two_processes"
  return workdirs


def _losses(workdir: Path) -> np.ndarray:
  records = read_jsonl(workdir / "metrics.jsonl")
  return np.array([r.get("train_loss", r.get("eval_loss")) for r in records])


def _summary(workdir: Path) -> dict:
  return json.loads((workdir / "summary.json").read_text())


def _assert_same_run(workdir: Path, reference: Path) -> None:
  """The same losses (rtol 1e-5) and final params (1e-6 of their scale) as the reference."""
  assert [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")] == [
    r["step"] for r in read_jsonl(reference / "metrics.jsonl")
  ]
  np.testing.assert_allclose(_losses(workdir), _losses(reference), rtol=1e-5)
  got, expected = restore(workdir, 8)["params"], restore(reference, 8)["params"]
  flat_got = dict(_flat(got))
  assert len(flat_got) > 5
  for name, x in _flat(expected):
    scale = max(float(np.max(np.abs(x))), 1.0)
    assert np.max(np.abs(np.asarray(flat_got[name]) - np.asarray(x))) <= 1e-6 * scale, name


def _flat(tree: dict, prefix: str = ""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flat(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value


@pytest.mark.parametrize("mesh", ["2x4", "8x1"])
def test_every_mesh_trains_like_one_device(runs, mesh):
  _assert_same_run(runs[mesh], runs["1x1"])
  summary = _summary(runs[mesh])
  assert summary["mesh"] == {"2x4": {"data": 2, "model": 4}, "8x1": {"data": 8, "model": 1}}[mesh]
  assert (summary["num_devices"], summary["num_processes"]) == (8, 1)


def _param_bytes_per_device(mesh_sizes: dict[str, int]) -> int:
  """What the logical axis rules put on one device of the tiny model's parameters."""
  config = tiny_config()
  _, params = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  specs = jax.tree.leaves(nnx.get_partition_spec(params), is_leaf=lambda x: isinstance(x, P))
  total = 0
  for spec, x in zip(specs, jax.tree.leaves(params), strict=True):
    axes = partitioning.mesh_spec(spec, config.mesh.logical_axis_rules)
    total += x.size * x.dtype.itemsize // math.prod(mesh_sizes[a] for a in axes if a)
  return total


def test_summary_records_the_bytes_each_device_holds(runs):
  one, sharded = _summary(runs["1x1"]), _summary(runs["2x4"])
  assert one["param_bytes_per_device"] == one["param_bytes"]
  assert one["optimizer_state_bytes_per_device"] == one["optimizer_state_bytes"]
  assert sharded["param_bytes"] == one["param_bytes"]
  expected = _param_bytes_per_device({"data": 2, "model": 4})
  assert sharded["param_bytes_per_device"] == expected < sharded["param_bytes"] / 4
  # The state follows the params (its exact layout: tests/test_sharding.py).
  assert 0 < sharded["optimizer_state_bytes_per_device"] < sharded["optimizer_state_bytes"] / 4


@pytest.mark.parametrize("mesh", ["8x1", "4x2", "1x1"])
def test_a_checkpoint_of_one_mesh_resumes_on_another(runs, mesh):
  """Saved on 2 x 4 at step 4, resumed on another mesh: the arrays are resharded on
  restore and the run continues where it stopped, to float tolerance."""
  workdir = runs[f"2x4_then_{mesh}"]
  summary = _summary(workdir)
  assert summary["resumed_from"] == 4
  assert summary["mesh"] == {"8x1": {"data": 8, "model": 1}, "4x2": {"data": 4, "model": 2}}.get(
    mesh, {"data": 1, "model": 1}
  )
  _assert_same_run(workdir, runs["2x4"])


def test_two_processes_train_like_one(runs):
  workdir = runs["two_processes"]
  _assert_same_run(workdir, runs["2x4"])
  summary = _summary(workdir)
  assert summary["num_processes"] == 2 and summary["num_devices"] == 8
  assert summary["mesh"] == {"data": 2, "model": 4}
  # Each process wrote its own shards of the checkpoint; process 0 alone wrote the records.
  checkpoint = workdir / "checkpoints" / "8" / "default"
  shards = sorted(p.name for p in checkpoint.glob("ocdbt.process_*"))
  assert shards == ["ocdbt.process_0", "ocdbt.process_1"]
  steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")]
  assert steps == [2, 4, 4, 6, 8, 8]
  # Process 0 alone read the telemetry (replicated scalars) and wrote one event file; the
  # figures are those of the same mesh on one process.
  assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 1
  two, one = (
    [r for r in read_jsonl(w / "metrics.jsonl") if "train_loss" in r]
    for w in (workdir, runs["2x4"])
  )
  for key in ("beta2", "step_size", "rms_update_max", "rms_update_median"):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=1e-5)


COMPILE_UPDATE = textwrap.dedent(
  """
  import json, sys
  import jax
  from flax import nnx
  from adafactor_jax.training import config as config_lib, optimizers, partitioning, train
  from adafactor_jax.training.configs import default

  config = config_lib.resolve_config(default.get_config())
  config.mesh.model = 4
  mesh = partitioning.create_mesh(config.mesh)
  _, params = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  axes = nnx.get_partition_spec(params)
  tx = optimizers.create_optimizer(config.optimizer, config.num_steps, axes)
  shardings = train.create_shardings(config, mesh, tx, params, axes)
  update = jax.jit(
    lambda state, grads, params: tx.update(grads, state, params),
    in_shardings=(shardings.opt_state, shardings.params, shardings.params),
  )
  state = jax.eval_shape(tx.init, params)
  hlo = update.lower(state, params, params).compile().as_text()
  sizes = [x.size for x in jax.tree.leaves(params)]
  json.dump({"hlo": hlo, "smallest_param": min(s for s in sizes if s > 1000)}, sys.stdout)
  """
)


def test_the_trainers_compiled_update_gathers_no_parameter():
  """The default model on a 2 x 4 mesh, FSDP: the update all-reduces statistics and
  scalars; no collective moves anything near a parameter's size."""
  result = subprocess.run(
    [sys.executable, "-c", COMPILE_UPDATE], env=_env(8), capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-3000:]
  observed = json.loads(result.stdout)
  ops = collectives(observed["hlo"])
  assert ops and {op for op, _ in ops} == {"all-reduce"}, ops
  largest = max(
    int(np.prod([int(n) for n in dims.split(",") if n]))
    for _, result_type in ops
    for dims in re.findall(r"\[([\d,]*)\]", result_type)
  )
  assert largest < observed["smallest_param"] / 8


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
  ("flags", "fragments"),
  [
    (
      ["--config.mesh.data=3"],
      ["'mesh.data' = 3", "'mesh.model' = 1", "the 8 device(s) there are"],
    ),
    (["--config.data.batch_size=12"], ["'data.batch_size' (12)", "8 devices"]),
    (
      ["--config.mesh.model=8", "--config.model.mlp_dim=36"],
      ["'blocks/0/mlp_in/kernel'", "(16, 36)", "'model' axis"],
    ),
  ],
  ids=["mesh_of_other_devices", "batch_not_divided", "parameter_not_divided"],
)
def test_a_mesh_that_does_not_fit_is_refused_before_anything_is_written(flags, fragments, tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
    [*cli_command(), *FLAGS, *flags, f"--workdir={workdir}"],
    env=_env(8),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.startswith("adafactor-train: error: ") and "Traceback" not in result.stderr
  for fragment in fragments:
    assert fragment in result.stderr, result.stderr
  assert not workdir.exists()


def test_a_coordinator_that_never_answers_is_a_bounded_wait_then_an_error(tmp_path):
  workdir = tmp_path / "run"
  address = f"127.0.0.1:{_free_port()}"  # nothing listens there
  began = time.monotonic()
  result = subprocess.run(
    [*cli_command(), *FLAGS, f"--workdir={workdir}", "--coordinator_address", address]
    + ["--num_processes", "2", "--process_id", "1", "--initialization_timeout", "3"],
    env=_env(4),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert result.returncode == 2, result.stderr[-3000:]
  assert f"no coordinator answered at {address} within 3 s" in result.stderr
  assert "Traceback" not in result.stderr
  assert time.monotonic() - began < 60
  assert not workdir.exists()
