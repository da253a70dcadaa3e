"""The global gradient norm in metrics.jsonl and TensorBoard, and 'optimizer.clip_global_norm' in
real (tiny) runs: the figures checked against the gradient computed here, a run stopped between
log records resumed to the same records, and a warm switch into a clipped optimizer.
"""

from __future__ import annotations

import signal
from pathlib import Path

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from adafactor_jax.training import config as config_lib
from adafactor_jax.training import input_pipeline, optimizers, train
from adafactor_jax.training.configs import adamw
from tests.training.test_train import TINY, _switched, read_jsonl, restore, without_rate
from tests.training.test_train_telemetry import _events, _scalars

GRADIENT = {"grad_norm", "grad_norm_max", "grad_clipped_fraction"}


def _config(changes: dict | None = None) -> ml_collections.ConfigDict:
  """configs/adamw.py at the tiny size, with ``changes`` by dotted key."""
  config = adamw.get_config()
  for key, value in {**TINY, **(changes or {})}.items():
    config_lib.set_config_value(config, key, value)
  return config_lib.resolve_config(config)


def _grad_norm(config, params: nnx.State, step: int) -> float:
  """The global norm, in float64, of the gradient of ``step``'s batch at ``params``."""
  data = config.data
  corpus = input_pipeline.load_corpus(
    data.corpus, tuple(data.suffixes), data.max_bytes, data.eval_fraction, data.seq_len + 2
  )
  data_key, _ = jax.random.split(jax.random.key(config.seed))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  batch = input_pipeline.batch_at(
    corpus.train, data_key, step, data.batch_size, data.seq_len, device
  )
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  grads = jax.grad(train.next_token_loss, argnums=1)(graphdef, params, batch)
  return float(
    np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in jax.tree.leaves(grads)))
  )


def _params_at(workdir: Path, config, step: int) -> nnx.State:
  """The checkpoint's params as the model's nnx.State."""
  _, abstract_params = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  tx = optimizers.create_optimizer(config.optimizer, config.num_steps)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  pending = jax.ShapeDtypeStruct((config.log_every,), np.float32)
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    {
      "params": abstract_params,
      "opt_state": jax.eval_shape(tx.init, abstract_params),
      "pending_losses": pending,
      "pending_grad_norms": pending,
    },
  )
  handler = ocp.StandardCheckpointHandler()
  with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handler) as manager:
    return manager.restore(step, args=ocp.args.StandardRestore(target))["params"]


@pytest.fixture(scope="module")
def clipped(tmp_path_factory) -> tuple[Path, float]:
  """AdamW clipped at 0.9 of the first step's gradient norm (so that step clips), every step
  logged: (its workdir, the threshold)."""
  config = _config({"log_every": 1})
  first = _grad_norm(config, nnx.state(train.create_model(config)), 0)
  config.optimizer.clip_global_norm = threshold = 0.9 * first
  workdir = tmp_path_factory.mktemp("gradient") / "clipped"
  train.train_and_evaluate(config, str(workdir), progress=False)
  return workdir, threshold


def test_each_train_record_holds_the_steps_gradient_norm_and_whether_it_was_clipped(clipped):
  workdir, threshold = clipped
  config = _config({"log_every": 1})
  config.optimizer.clip_global_norm = threshold
  records = {r["step"]: r for r in read_jsonl(workdir / "metrics.jsonl") if "train_loss" in r}
  assert sorted(records) == list(range(1, 9))
  for r in records.values():
    assert GRADIENT <= set(r)
    assert r["grad_norm"] == r["grad_norm_max"]  # a window of one step
    assert r["grad_clipped_fraction"] == float(r["grad_norm"] >= threshold)
  # Step 1 at the initial params, step 5 at the step-4 checkpoint's: the gradient computed here.
  initial = nnx.state(train.create_model(config))
  assert records[1]["grad_norm"] == pytest.approx(_grad_norm(config, initial, 0), rel=1e-4)
  at_4 = _params_at(workdir, config, 4)
  assert records[5]["grad_norm"] == pytest.approx(_grad_norm(config, at_4, 4), rel=1e-4)
  assert records[1]["grad_clipped_fraction"] == 1.0
  # And TensorBoard holds the same figures, under gradient/.
  (events,) = _events(workdir)
  scalars = _scalars(events)
  for key, tag in (
    ("grad_norm", "gradient/norm"),
    ("grad_norm_max", "gradient/norm_max"),
    ("grad_clipped_fraction", "gradient/clipped_fraction"),
  ):
    assert scalars[tag].keys() == records.keys(), tag
    np.testing.assert_allclose(
      [scalars[tag][s] for s in sorted(records)],
      [records[s][key] for s in sorted(records)],
      rtol=1e-6,
    )


def test_the_job_trains_with_the_clip(clipped, tmp_path):
  """The same run without the clip: the same first gradient (its norm is taken before any
  clipping), then other parameters, as the clipped first step moved less."""
  workdir, _ = clipped
  unclipped = tmp_path / "unclipped"
  train.train_and_evaluate(_config({"log_every": 1}), str(unclipped), progress=False)
  a, b = restore(workdir, 4)["params"], restore(unclipped, 4)["params"]
  assert any(
    not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
  (first, *_), (clipped_first, *_) = (
    [r for r in read_jsonl(w / "metrics.jsonl") if "train_loss" in r] for w in (unclipped, workdir)
  )
  assert "grad_clipped_fraction" not in first
  assert first["grad_norm"] == pytest.approx(clipped_first["grad_norm"], rel=1e-6)


def test_a_run_stopped_between_log_records_resumes_to_the_same_gradient_records(
  tmp_path, monkeypatch
):
  """Stopped after step 5 (log_every 2): the step-5 norm rides in the checkpoint, so the
  step-6 record's mean, max and clipped share are those of steps 5 and 6, as uninterrupted."""
  config = _config({"optimizer.clip_global_norm": 1.0})
  uninterrupted, stopped = tmp_path / "uninterrupted", tmp_path / "stopped"
  train.train_and_evaluate(config, str(uninterrupted), progress=False)

  steps = []
  make_steps = train.make_steps

  def counting_make_steps(*args, **kwargs):
    train_step, evaluate = make_steps(*args, **kwargs)

    def counted(*step_args):
      steps.append(None)
      return train_step(*step_args)

    return counted, evaluate

  class StopAfterStep5(train._StopOnSignal):
    def requested(self):
      return signal.SIGTERM if len(steps) >= 5 else None

  with monkeypatch.context() as patch:
    patch.setattr(train, "make_steps", counting_make_steps)
    patch.setattr(train, "_StopOnSignal", StopAfterStep5)
    with pytest.raises(train.Stopped, match="after step 5"):
      train.train_and_evaluate(config, str(stopped), progress=False)
  pending = restore(stopped, 5)["pending_grad_norms"]
  assert np.isfinite(pending[0]) and np.isnan(pending[1])
  train.train_and_evaluate(config, str(stopped), progress=False)
  records = read_jsonl(stopped / "metrics.jsonl")
  assert without_rate(records) == without_rate(read_jsonl(uninterrupted / "metrics.jsonl"))
  assert all(GRADIENT <= set(r) for r in records if "train_loss" in r)


def test_a_warm_switch_into_a_clipped_adafactor_trains(adamw_run, tmp_path):
  """From AdamW's step-4 checkpoint into Adafactor behind clip_by_global_norm: the clip's
  EmptyState is no obstacle to the warm start, and the records after the switch hold the
  clipped share."""
  workdir = tmp_path / "switched"
  assert _switched(adamw_run, workdir, "--config.optimizer.clip_global_norm=1.0") == 0
  records = [r for r in read_jsonl(workdir / "metrics.jsonl") if "train_loss" in r]
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert all("grad_clipped_fraction" not in r for r in records[:2])  # AdamW's, unclipped
  assert all(GRADIENT <= set(r) for r in records[2:])
  counts = [
    x
    for p, x in jax.tree_util.tree_leaves_with_path(restore(workdir, 8)["opt_state"])
    if "count" in str(p)
  ]
  assert counts and all(int(c) == 8 for c in counts)  # warm: the whole run's steps
