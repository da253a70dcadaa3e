"""The tiny runs that several test files of the application read, made once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.training.test_train import (
  PAPER_FILE,
  run_main,
  tiny_flags,
)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the jobs the tests start as processes.

  Most of a tiny job's time is compiling programs that the previous job compiled too (the
  same model and optimizer under another workdir, seed or fault): with it the README's
  commands took a fifth less time, the paper notebook a third, the interrupted runs half.
  Set in the environment, so it reaches subprocesses and notebook kernels only: this
  process's jax read its configuration when it was imported, and its in-process compiles
  (the TPU topologies' memory figures among them) stay uncached.
  """
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
    patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    yield


@pytest.fixture(scope="session")
def run_a(tmp_path_factory) -> Path:
  """The tiny run to the end, from ``--config configs/paper.py:no_clipping``."""
  workdir = tmp_path_factory.mktemp("train") / "a"
  rc = run_main(f"--config={PAPER_FILE}:no_clipping", *tiny_flags(), f"--workdir={workdir}")
  assert rc == 0
  return workdir


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def adamw_run(tmp_path_factory) -> Path:
  """The tiny run with AdamW to the end, a checkpoint at step 4 and 8."""
  workdir = tmp_path_factory.mktemp("switch") / "adamw"
  flags = tiny_flags(optimizer__warmup_steps=2, optimizer__warmup_fraction=0.0)
  assert run_main("--config", "adamw", *flags, f"--workdir={workdir}") == 0
  return workdir
