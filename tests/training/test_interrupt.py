"""Killing the real training command mid-step and mid-checkpoint, then rerunning it.

Each scenario runs ``adafactor-train`` on a tiny config in a subprocess with a
fault armed by a ``sitecustomize`` module on its PYTHONPATH (the job itself is
unchanged): a signal sent to the process while a step is in flight, or while
Orbax commits a checkpoint (everything written, the temporary directory not yet
renamed). The same command is then rerun, and must resume from the last
complete checkpoint and end bit-identical to a run that was never interrupted,
on one device and on a 2 x 4 mesh of simulated devices (sharded checkpoints).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import assert_bit_identical
from tests.training.test_train import cli_command, read_jsonl, restore, tiny_flags, without_rate

FLAGS = tiny_flags(keep_checkpoints=10)
TIMEOUT_S = 240

SITECUSTOMIZE = textwrap.dedent(
  """
  import os
  import signal

  spec = os.environ.get("ADAFACTOR_TEST_FAULT")
  if spec:
    signal_name, where, at = spec.split(":")
    at = int(at)

    def fire():
      with open(os.environ["ADAFACTOR_TEST_FAULT_FIRED"], "w") as f:
        f.write(spec)
      os.kill(os.getpid(), getattr(signal, signal_name))

    if where == "step":  # after the step with index `at` is dispatched, while it runs
      from adafactor_jax.training import train

      make_steps = train.make_steps

      def faulty_make_steps(*args, **kwargs):
        train_step, evaluate = make_steps(*args, **kwargs)
        calls = []

        def faulty_step(params, opt_state, batch):
          out = train_step(params, opt_state, batch)
          calls.append(None)
          if len(calls) - 1 == at:  # faults are armed on runs that start at step 0
            fire()
          return out

        return faulty_step, evaluate

      train.make_steps = faulty_make_steps
    elif where == "commit":  # checkpoint `at` fully written, before Orbax renames it into place
      rename = os.rename

      def faulty_rename(src, dst, *args, **kwargs):
        if "orbax-checkpoint-tmp" in os.fspath(src) and os.path.basename(dst) == str(at):
          fire()
        return rename(src, dst, *args, **kwargs)

      os.rename = faulty_rename
    else:
      raise ValueError(f"ADAFACTOR_TEST_FAULT: unknown place {where!r}")
  """
)

# name: (fault, expected exit code, complete checkpoints after the fault, resumed from)
SCENARIOS = {
  "sigkill_during_step": ("SIGKILL:step:5", -signal.SIGKILL, [4], 4),
  # Between log records (log_every=2): the pending loss of step 5 rides in the checkpoint.
  "sigterm_during_step": ("SIGTERM:step:4", 128 + signal.SIGTERM, [4, 5], 5),
  "sigkill_during_checkpoint_write": ("SIGKILL:commit:8", -signal.SIGKILL, [4], 4),
  "sigterm_during_checkpoint_write": ("SIGTERM:commit:4", 128 + signal.SIGTERM, [4], 4),
  # The same kill on a 2 x 4 mesh of 8 simulated devices: sharded checkpoints.
  "sigkill_during_step_on_a_mesh": ("SIGKILL:step:5", -signal.SIGKILL, [4], 4),
}
ON_A_MESH = "_on_a_mesh"  # scenarios named so run on 8 simulated devices, as a 2 x 4 mesh


def _command() -> list[str]:
  return [*cli_command(), *FLAGS, "--progress=false"]


def _run(
  workdir: Path, hooks: Path, fault: str | None = None, mesh: bool = False
) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 if mesh else 1}"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")]))
  env.pop("ADAFACTOR_TEST_FAULT", None)
  if fault:
    env["ADAFACTOR_TEST_FAULT"] = fault
    env["ADAFACTOR_TEST_FAULT_FIRED"] = str(workdir.parent / f"{workdir.name}.fired")
  return subprocess.run(
    [*_command(), f"--workdir={workdir}", *(["--config.mesh.model=4"] if mesh else [])],
    env=env,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )


def _checkpoint_dirs(workdir: Path) -> tuple[list[int], list[str]]:
  """(complete steps, names of temporary directories) under the checkpoints folder."""
  entries = list((workdir / "checkpoints").iterdir())
  steps = sorted(int(p.name) for p in entries if p.is_dir() and p.name.isdigit())
  temporary = sorted(p.name for p in entries if "tmp" in p.name)
  return steps, temporary


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every scenario's fault run and rerun, and one uninterrupted run, in parallel."""
  root = tmp_path_factory.mktemp("interrupt")
  hooks = root / "hooks"
  hooks.mkdir()
  (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)

  def scenario(name):
    workdir, mesh = root / name, name.endswith(ON_A_MESH)
    faulted = _run(workdir, hooks, SCENARIOS[name][0], mesh)
    after_fault = _checkpoint_dirs(workdir)
    metrics_after_fault = read_jsonl(workdir / "metrics.jsonl")
    fired = (root / f"{name}.fired").exists()
    rerun = _run(workdir, hooks, mesh=mesh)
    return {
      "workdir": workdir,
      "faulted": faulted,
      "fired": fired,
      "after_fault": after_fault,
      "metrics_after_fault": metrics_after_fault,
      "rerun": rerun,
    }

  with ThreadPoolExecutor(max_workers=len(SCENARIOS) + 2) as pool:
    cleans = {
      f"uninterrupted{suffix}": pool.submit(
        _run, root / f"uninterrupted{suffix}", hooks, None, mesh
      )
      for suffix, mesh in (("", False), (ON_A_MESH, True))
    }
    futures = {name: pool.submit(scenario, name) for name in SCENARIOS}
    results = {name: f.result() for name, f in futures.items()}
    for name, clean in cleans.items():
      assert clean.result().returncode == 0, clean.result().stderr
      results[name] = {"workdir": root / name}
  return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_killed_run_resumes_from_last_complete_checkpoint_and_ends_identical(runs, name):
  fault, expected_code, complete_steps, resumed_from = SCENARIOS[name]
  mesh = name.endswith(ON_A_MESH)
  run, clean = runs[name], runs["uninterrupted" + (ON_A_MESH if mesh else "")]["workdir"]

  # The fault fired, and the job died of it (SIGKILL) or stopped cleanly (SIGTERM).
  assert run["fired"], run["faulted"].stderr
  assert run["faulted"].returncode == expected_code, run["faulted"].stderr
  steps, temporary = run["after_fault"]
  assert steps == complete_steps
  if fault.startswith("SIGTERM"):
    assert f"stopped by SIGTERM after step {complete_steps[-1]}" in run["faulted"].stderr
    assert temporary == []
  if "commit" in fault and fault.startswith("SIGKILL"):
    # The killed write left its complete-looking temporary directory behind.
    (leftover,) = temporary
    assert leftover.startswith("8.")

  # The rerun resumed from the last complete checkpoint, never the half-written one.
  rerun = run["rerun"]
  assert rerun.returncode == 0, rerun.stderr
  summary = json.loads((run["workdir"] / "summary.json").read_text())
  assert summary["resumed_from"] == resumed_from
  assert summary["mesh"] == ({"data": 2, "model": 4} if mesh else {"data": 1, "model": 1})
  assert _checkpoint_dirs(run["workdir"])[0][-1] == 8

  # And it ends where the uninterrupted run ends: state, metrics, summary.
  final, expected = restore(run["workdir"], 8), restore(clean, 8)
  assert set(final) == {"params", "opt_state", "pending_losses", "pending_grad_norms"}
  assert_bit_identical(final, expected)
  metrics = read_jsonl(run["workdir"] / "metrics.jsonl")
  assert without_rate(metrics) == without_rate(read_jsonl(clean / "metrics.jsonl"))
  clean_summary = json.loads((clean / "summary.json").read_text())
  for key in ("final_train_loss", "final_eval_loss", "optimizer_state_bytes"):
    assert summary[key] == clean_summary[key], key


def test_sigterm_checkpoint_between_log_records_keeps_the_pending_loss(runs):
  """Step 5 is mid-window: the rerun's step-6 record averages steps 5 and 6,
  with step 5's loss from the checkpoint, exactly as the uninterrupted run."""
  run = runs["sigterm_during_step"]
  assert [r["step"] for r in run["metrics_after_fault"] if "train_loss" in r] == [2, 4]
  pending = restore(run["workdir"], 5)["pending_losses"]
  assert pending.shape == (2,)
  assert pending[0] == pending[0]  # step 5's loss, not the NaN padding
  assert pending[1] != pending[1]
