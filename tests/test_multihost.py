"""Two processes on 127.0.0.1 (jax.distributed, gloo) train like one device does."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_SEC = 300
STEPS = 3


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(out: str) -> list[str]:
  return [sys.executable, "-m", "adafactor_jax.train_sharded", "--steps", str(STEPS), "--out", out]


def _env(devices: int) -> dict[str, str]:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def test_two_processes_match_one_device(tmp_path):
  coordinator = f"127.0.0.1:{_free_port()}"
  distributed = str(tmp_path / "distributed.npz")
  processes = [
    subprocess.Popen(
      _command(distributed)
      + ["--mesh", "2x4", "--num_processes", "2", "--process_id", str(i)]
      + ["--coordinator", coordinator],
      cwd=ROOT,
      env=_env(4),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    outputs = [p.communicate(timeout=TIMEOUT_SEC)[0] for p in processes]
  finally:
    for p in processes:
      p.kill()
  for p, output in zip(processes, outputs, strict=True):
    assert p.returncode == 0, output[-3000:]

  single = str(tmp_path / "single.npz")
  result = subprocess.run(
    _command(single) + ["--mesh", "1x1"],
    cwd=ROOT,
    env=_env(1),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_SEC,
  )
  assert result.returncode == 0, result.stderr[-3000:]

  got, expected = np.load(distributed), np.load(single)
  assert sorted(got.files) == sorted(expected.files) and len(got.files) > 10
  assert len(got["losses"]) == STEPS and got["losses"][-1] < got["losses"][0]
  np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
  for name in expected.files:
    scale = np.max(np.abs(expected[name]))
    assert np.max(np.abs(got[name] - expected[name])) <= 1e-6 * max(scale, 1.0), name
