"""The job's fused backward step (``optimizer.fused_backward``) and int8 momentum (issue 17).

The fused step applies each block's update inside the backward pass; on the scanned model it
is the unfused step's optimizer, state per layer, so both runs give the same losses and
parameters to float tolerance, on one device and on a 2 x 4 mesh, and both resume from their
checkpoints. Tiny runs, shared by a module fixture: the 8-device ones in subprocesses (the
device count must be set before jax is imported), beside the one-device ones in this process.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from tests.conftest import assert_bit_identical
from tests.training.test_mesh import _assert_same_run, _resume_copy, _train
from tests.training.test_train import (
  assert_refused,
  read_jsonl,
  restore,
  run_main,
  tiny_flags,
  without_rate,
)
from tests.training.test_train_telemetry import _events, _scalars

# Two blocks, so that the backward pass updates one before the other's gradient exists.
SCANNED = [
  "--config.model.num_layers=2",
  "--config.model.scan_layers=True",
  "--config.optimizer.momentum=0.9",
]
FUSED = [*SCANNED, "--config.optimizer.fused_backward=True"]
INT8 = ["--config.optimizer.momentum=0.9", "--config.optimizer.momentum_dtype=int8"]


def _run_here(workdir: Path, *flags: str) -> Path:
  assert run_main(*tiny_flags(), *flags, f"--workdir={workdir}") == 0
  return workdir


def _resumed_here(source: Path, workdir: Path, *flags: str) -> Path:
  return _run_here(_resume_copy(source, workdir), *flags)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
  root = tmp_path_factory.mktemp("fused")
  with ThreadPoolExecutor(max_workers=1) as pool:
    on_mesh = pool.submit(_train, root / "fused_2x4", "2x4", *FUSED)
    workdirs = {
      "unfused": _run_here(root / "unfused", *SCANNED),
      "fused": _run_here(root / "fused", *FUSED),
      "int8": _run_here(root / "int8", *INT8),
    }
    result = on_mesh.result()
    assert result.returncode == 0, result.stderr[-3000:]
    resharded = pool.submit(
      _train, _resume_copy(root / "fused_2x4", root / "fused_2x4_then_8x1"), "8x1", *FUSED
    )
    workdirs["fused_resumed"] = _resumed_here(workdirs["fused"], root / "fused_resumed", *FUSED)
    workdirs["int8_resumed"] = _resumed_here(workdirs["int8"], root / "int8_resumed", *INT8)
    result = resharded.result()
    assert result.returncode == 0, result.stderr[-3000:]
  workdirs.update({name: root / name for name in ("fused_2x4", "fused_2x4_then_8x1")})
  return workdirs


def test_the_fused_job_trains_like_the_unfused_one(runs):
  """Same losses (rtol 1e-5) and final parameters (1e-6 of their scale) as jax.grad of the
  whole loss and the optimizer with the 'layers' axis a batch axis (per-layer statistics)."""
  _assert_same_run(runs["fused"], runs["unfused"])
  losses = [
    r["train_loss"] for r in read_jsonl(runs["fused"] / "metrics.jsonl") if "train_loss" in r
  ]
  assert losses[-1] < losses[0]


def test_the_fused_jobs_telemetry_is_the_unfused_ones(runs):
  """The optimizer's figures, read from the per-layer state, are the unfused job's with the
  'layers' axis a batch axis: every TensorBoard tag (each block's slice of a stacked parameter
  under 'blocks/') and every summary in metrics.jsonl, to float tolerance. But for the global
  gradient norm: the fused step never holds the whole gradient, so it records none."""
  (fused,), (unfused,) = (_scalars_of(runs[name]) for name in ("fused", "unfused"))
  gradient_tags = {"gradient/norm", "gradient/norm_max"}
  assert gradient_tags <= unfused.keys() and not gradient_tags & fused.keys()
  assert fused.keys() == unfused.keys() - gradient_tags
  assert "clipping_denominator/blocks/mlp_in/kernel_1_" in fused  # TensorBoard's '[1]'
  for tag, by_step in unfused.items():
    if tag in gradient_tags:
      continue
    assert fused[tag].keys() == by_step.keys(), tag
    for step, value in by_step.items():
      assert fused[tag][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (tag, step)
  records = [
    [r for r in read_jsonl(runs[name] / "metrics.jsonl") if "train_loss" in r]
    for name in ("fused", "unfused")
  ]
  figures = ("rms_update_max", "clipped_fraction", "clipped_fraction_by_size", "beta2")
  for got, expected in zip(*records, strict=True):
    assert got.keys() == expected.keys() - {"grad_norm", "grad_norm_max"}
    assert set(figures) <= got.keys()
    for key in figures:
      assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (got["step"], key)
  # Some updates clipped and some not, so that the share by size weighs the blocks' slices.
  assert any(0 < r["clipped_fraction"] < 1 for r in records[0])
  assert (runs["fused"] / "optimizer.png").read_bytes().startswith(b"\x89PNG")


def _scalars_of(workdir: Path) -> list[dict[str, dict[int, float]]]:
  return [_scalars(events) for events in _events(workdir)]


def test_the_fused_jobs_state_is_per_layer(runs):
  """The checkpoint holds adafactor_jax.FusedState: each block's statistics and step count
  of its own (a leading axis of 2), then the other parameters' state."""
  state = restore(runs["fused"], 8)["opt_state"]  # FusedState, restored as a dict
  layers, rest = state["layers"], state["rest"]
  counts = [
    np.asarray(x) for x in jax.tree.leaves(layers) if np.ndim(x) == 1 and x.dtype == np.int32
  ]
  assert counts and all(c.tolist() == [8, 8] for c in counts), counts
  assert all(np.shape(x)[0] == 2 for x in jax.tree.leaves(layers))
  rest_counts = [int(x) for x in jax.tree.leaves(rest) if np.ndim(x) == 0 and x.dtype == np.int32]
  assert rest_counts and set(rest_counts) == {8}


@pytest.mark.parametrize(
  ("run", "reference"),
  [("fused_2x4", "unfused"), ("fused_2x4_then_8x1", "fused_2x4")],
  ids=["2x4_like_one_device", "resumed_resharded_on_8x1"],
)
def test_the_fused_job_on_a_mesh(runs, run, reference):
  """On a 2 x 4 mesh (rows over 'data', the FSDP 'embed' axis over 'data', 'mlp' and
  'joined_kv' over 'model'), and resumed from its step-4 checkpoint on 8 x 1."""
  _assert_same_run(runs[run], runs[reference])
  summary = json.loads((runs[run] / "summary.json").read_text())
  assert summary["num_devices"] == 8
  assert summary["resumed_from"] == (4 if run.endswith("8x1") else 0)


@pytest.mark.parametrize("name", ["fused", "int8"])
def test_a_resumed_run_ends_bit_identical(runs, name):
  uninterrupted, resumed = runs[name], runs[f"{name}_resumed"]
  a, b = restore(uninterrupted, 8), restore(resumed, 8)
  assert_bit_identical(a["params"], b["params"])
  assert_bit_identical(a["opt_state"], b["opt_state"])
  assert without_rate(read_jsonl(resumed / "metrics.jsonl")) == without_rate(
    read_jsonl(uninterrupted / "metrics.jsonl")
  )
  assert json.loads((resumed / "summary.json").read_text())["resumed_from"] == 4


def test_int8_momentum_from_the_config_is_stored_in_int8(runs):
  state = restore(runs["int8"], 8)["opt_state"]
  int8 = [x for x in jax.tree.leaves(state) if x.dtype == np.int8]
  params = jax.tree.leaves(restore(runs["int8"], 8)["params"])
  assert sorted(x.shape for x in int8) == sorted(x.shape for x in params)
  summary = json.loads((runs["int8"] / "summary.json").read_text())
  assert np.isfinite(summary["final_eval_loss"])


@pytest.mark.parametrize(
  ("flags", "fragment"),
  [
    (["--config.model.scan_layers=False"], "set 'model.scan_layers' = True"),
    (
      ["--config.optimizer.name=adamw", "--config.optimizer.learning_rate=1e-3"],
      "'optimizer.name' = 'adafactor' only, got 'adamw'",
    ),
    (["--config.optimizer.skip_nonfinite=True"], "cannot skip a whole step"),
    (["--config.optimizer.stochastic_rounding=True"], "cannot round stochastically"),
    (["--config.optimizer.switch_from=adamw"], "cannot switch optimizers mid-run"),
  ],
  ids=["unscanned_model", "adamw", "skip_nonfinite", "stochastic_rounding", "switch"],
)
def test_what_the_fused_step_cannot_do_is_refused_naming_the_key(flags, fragment, tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = run_main(*tiny_flags(), *FUSED, *flags, f"--workdir={workdir}")
  assert_refused(capsys, rc, ["config key 'optimizer.fused_backward'", fragment])
  assert not workdir.exists()


def test_the_readmes_example_on_the_projects_model_trains():
  """The README's fused step on TransformerLM(scan_layers=True): the loss falls, the model
  holds the trained parameters afterwards, and each layer had its own optimizer state."""
  from flax import nnx

  from tests.readme import code_blocks

  (example,) = [block for block in code_blocks("python") if "TransformerLM(" in block]
  namespace: dict = {}
  exec(compile(example, "README.md", "exec"), namespace)
  losses, model, tokens = namespace["losses"], namespace["model"], namespace["tokens"]
  assert len(losses) == 20 and losses[-1] < 0.5 * losses[0], losses
  logits = model(tokens[:, :-1])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
  assert float(loss) < losses[-1]  # one step further than the last loss reported
  stack = nnx.state(model.blocks, nnx.Param)
  assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(stack))
  # Each layer its own statistics and step count: every leaf of state.layers has the stack's axis.
  assert all(np.shape(leaf)[0] == 4 for leaf in jax.tree.leaves(namespace["state"].layers))
