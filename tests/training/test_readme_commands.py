"""Every training command the README and the documentation show works, run in order on a fresh
directory.

Their bash blocks (the README's, then the pages' in the order of docs/index.md's
tables of contents: tests/readme.py) run as written, in one temporary directory,
in order (so that a later command meets the workdirs of the earlier ones, as a
reader's would), at a small size: ``adafactor-train`` and ``adafactor-compare`` on the
PATH are shims that append test_train's tiny model to the command. Of the
fresh-machine lines, the command after the install runs; the test command is
this suite itself.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from tests.readme import code_blocks
from tests.training.test_train import PROG, TINY

TIMEOUT_S = 600
# Longer than the tiny run: a few log, eval and checkpoint steps in each command's run.
SMALL = {**TINY, "num_steps": 60, "log_every": 10, "eval_every": 30, "checkpoint_every": 30}
SMALL_FLAGS = " ".join(f"--config.{key}={value}" for key, value in SMALL.items())


def _scripts() -> list[str]:
  """The bash blocks that train, with the fresh-machine lines cut to their last command."""
  scripts = []
  for block in code_blocks("bash"):
    if "pip install -e" in block:
      block = block.rsplit("&&", 1)[-1].strip() + "\n"
    if PROG in block or "adafactor-compare" in block:
      scripts.append(block)
  return scripts


def _shims(directory: Path) -> None:
  """adafactor-train and adafactor-compare, the real ones with the tiny config appended."""
  directory.mkdir()
  for name, extra in ((PROG, ""), ("adafactor-compare", "--num_steps=2")):
    real = Path(sys.executable).with_name(name)
    command = (
      shlex.quote(str(real))
      if real.exists()
      else f"{sys.executable} -m "
      + ("adafactor_jax.training" if name == PROG else "adafactor_jax.training.compare")
    )
    script = directory / name
    script.write_text(f'#!/bin/sh\nexec {command} "$@" {SMALL_FLAGS} --progress=false {extra}\n')
    script.chmod(0o755)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_the_readmes_training_commands_work_in_order(tmp_path):
  scripts = _scripts()
  text = "\n".join(scripts)
  # The commands the pages promise, among them: configs by name, a mesh, two processes.
  for expected in ("--config big_vision", "--config paper:", "mesh.model=4", "--process_id 1"):
    assert expected in text, expected
  _shims(tmp_path / "bin")
  env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
  env.pop("XLA_FLAGS", None)
  # Compiling dominates these tiny runs (as in the notebooks' tests): a third less time.
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  work = tmp_path / "fresh"
  work.mkdir()
  port = str(_free_port())
  for i, script in enumerate(scripts):
    # Background jobs (the two processes) must succeed too.
    body = script.replace("12355", port) + 'for job in $(jobs -p); do wait "$job" || exit 1; done\n'
    result = subprocess.run(
      ["bash", "-e", "-c", body],
      cwd=work,
      env=env,
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, (i, script, result.stderr[-4000:])
  # Every run wrote its summary, each in its own workdir.
  summaries = sorted(str(p.parent.relative_to(work)) for p in work.rglob("summary.json"))
  assert {"runs/default", "runs/big_vision", "runs/mesh", "runs/two"} <= set(summaries), summaries
