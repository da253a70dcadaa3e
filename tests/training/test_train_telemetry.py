"""The job's telemetry: aggregates in metrics.jsonl, optimizer.png and TensorBoard event files.

One tiny run with clipping on and beta2 = 0.999 (the paper's row ``beta2_slow``,
where clipping fires), and a copy of it resumed from its step-4 checkpoint, share
module fixtures. Everything is checked against ``adafactor_jax.telemetry`` of the
state restored from the run's checkpoints.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

import adafactor_jax
from adafactor_jax.training import config as config_lib
from adafactor_jax.training import optimizers, train
from adafactor_jax.training import workdir as workdir_lib
from adafactor_jax.training.configs import paper
from tests.training.test_train import PAPER_FILE, TINY, read_jsonl, run_main, tiny_flags

ROW = "beta2_slow"
AGGREGATES = {
  "step_size",
  "beta2",
  "rms_update_max",
  "rms_update_median",
  "clipped_fraction",
  "clipped_fraction_by_size",
}


def _config():
  config = paper.get_config(ROW)
  for key, value in TINY.items():
    config_lib.set_config_value(config, key, value)
  return config_lib.resolve_config(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
  workdir = tmp_path_factory.mktemp("telemetry") / "run"
  assert run_main(f"--config={PAPER_FILE}:{ROW}", *tiny_flags(), f"--workdir={workdir}") == 0
  return workdir


@pytest.fixture(scope="module")
def resumed(run, tmp_path_factory) -> Path:
  """A copy of the run as a run killed after logging step 8 but before its checkpoint leaves
  it (event files included), then resumed from step 4."""
  workdir = tmp_path_factory.mktemp("telemetry") / "resumed"
  shutil.copytree(run, workdir)
  shutil.rmtree(workdir / "checkpoints" / "8")
  (workdir / "summary.json").unlink()
  assert run_main(f"--config={PAPER_FILE}:{ROW}", *tiny_flags(), f"--workdir={workdir}") == 0
  return workdir


def _restored(workdir: Path, step: int) -> tuple[dict, object]:
  """The checkpoint's params (by path) and optimizer state, the latter in the optimizer's own
  types, so that ``adafactor_jax.telemetry`` finds its figures."""
  config = _config()
  _, abstract_params = nnx.split(nnx.eval_shape(lambda: train.create_model(config)))
  axes = nnx.get_partition_spec(abstract_params)
  tx = optimizers.create_optimizer(config.optimizer, config.num_steps, axes)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
    {
      "params": abstract_params,
      "opt_state": jax.eval_shape(tx.init, abstract_params),
      "pending_losses": jax.ShapeDtypeStruct((config.log_every,), np.float32),
      "pending_grad_norms": jax.ShapeDtypeStruct((config.log_every,), np.float32),
    },
  )
  handler = ocp.StandardCheckpointHandler()
  with ocp.CheckpointManager(workdir / "checkpoints", item_handlers=handler) as manager:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  params = {
    workdir_lib.param_path(path): np.asarray(x)
    for path, x in jax.tree_util.tree_leaves_with_path(restored["params"])
  }
  return params, restored["opt_state"]


def _events(workdir: Path) -> list[list[event_pb2.Event]]:
  """The events of each file under tensorboard/, files in name (time) order.

  The TFRecord framing: a little-endian uint64 length, its CRC, the data, the data's CRC.
  """
  files = []
  for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
    data, offset, events = path.read_bytes(), 0, []
    while offset < len(data):
      (length,) = struct.unpack_from("<Q", data, offset)
      events.append(event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length]))
      offset += 12 + length + 4
    files.append(events)
  return files


def _scalars(events: list[event_pb2.Event]) -> dict[str, dict[int, float]]:
  """Tag -> {step: value}; a step written twice fails."""
  scalars: dict[str, dict[int, float]] = defaultdict(dict)
  for event in events:
    for value in event.summary.value:
      assert event.step not in scalars[value.tag], (value.tag, event.step)
      scalars[value.tag][event.step] = value.simple_value
  return scalars


def test_train_records_summarize_the_telemetry_of_the_checkpointed_state(run):
  records = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if "train_loss" in r}
  assert sorted(records) == [2, 4, 6, 8]
  assert all(AGGREGATES <= set(r) for r in records.values())
  clipped = []
  for step in (4, 8):  # the checkpoints: the state that the log step read
    params, opt_state = _restored(run, step)
    figures = adafactor_jax.telemetry(opt_state)
    rms = [v for k, v in figures.items() if k.endswith("/rms_update_before_clipping")]
    denominators = {
      k.removesuffix("/clipping_denominator"): v
      for k, v in figures.items()
      if k.endswith("/clipping_denominator")
    }
    assert len(rms) == len(denominators) == len(params)  # no stacked layers in this model
    is_clipped = {path: d > 1 for path, d in denominators.items()}
    record = records[step]
    assert record["rms_update_max"] == pytest.approx(max(rms), rel=1e-7)
    assert record["rms_update_median"] == pytest.approx(np.median(rms), rel=1e-7)
    assert record["clipped_fraction"] == pytest.approx(np.mean(list(is_clipped.values())))
    size = {path: x.size for path, x in params.items()}
    by_size = sum(size[p] for p, c in is_clipped.items() if c) / sum(size.values())
    assert record["clipped_fraction_by_size"] == pytest.approx(by_size)
    # beta2 = min(0.999, 1 - 1/t), the relative step min(1e-2, 1/sqrt(t)).
    assert record["beta2"] == pytest.approx(1 - 1 / step, rel=1e-6)
    assert record["step_size"] == pytest.approx(1e-2, rel=1e-6)
    clipped.append(record["clipped_fraction"])
  # Clipping fired in this run, on some parameters but not all.
  assert any(0 < c < 1 for c in clipped), clipped


def test_optimizer_png_is_written(run):
  import matplotlib.image

  image = matplotlib.image.imread(run / "optimizer.png")
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert np.ptp(image) > 0


def test_event_files_hold_the_losses_aggregates_and_every_parameters_figures(run):
  (events,) = _events(run)
  scalars = _scalars(events)
  records = read_jsonl(run / "metrics.jsonl")
  train_records = [r for r in records if "train_loss" in r]
  expected = {"loss/train": {r["step"]: r["train_loss"] for r in train_records}}
  expected["loss/eval"] = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  for key in AGGREGATES:
    expected[f"optimizer/{key}"] = {r["step"]: r[key] for r in train_records}
  for key, tag in (("grad_norm", "gradient/norm"), ("grad_norm_max", "gradient/norm_max")):
    expected[tag] = {r["step"]: r[key] for r in train_records}
  for tag, values in expected.items():
    assert scalars[tag].keys() == values.keys(), tag
    np.testing.assert_allclose(list(scalars[tag].values()), list(values.values()), rtol=1e-6)
  # Per parameter, grouped by figure: '<figure>/<parameter path>', as telemetry() has them.
  _, opt_state = _restored(run, 8)
  figures = adafactor_jax.telemetry(opt_state)
  per_parameter = {k: v for k, v in figures.items() if "/" in k}
  assert len(per_parameter) > 20
  for name, value in per_parameter.items():
    path, _, figure = name.rpartition("/")
    assert scalars[f"{figure}/{path}"].keys() == {2, 4, 6, 8}
    assert scalars[f"{figure}/{path}"][8] == pytest.approx(float(value), rel=1e-6)
  assert set(scalars) == set(expected) | {
    f"{k.rpartition('/')[2]}/{k.rpartition('/')[0]}" for k in per_parameter
  }


def test_a_resumed_run_purges_what_the_stopped_run_logged_after_its_checkpoint(run, resumed):
  first, second = _events(resumed)
  # The new file starts by telling TensorBoard to drop the earlier files' steps from 5 on.
  starts = [(e.step, e.session_log.status) for e in second if e.HasField("session_log")]
  assert starts == [(5, event_pb2.SessionLog.START)]
  written = _scalars(second)
  assert {step for values in written.values() for step in values} == {6, 8}
  # What survives the purge is the uninterrupted run's own record.
  kept = {
    tag: {s: v for s, v in values.items() if s < 5} for tag, values in _scalars(first).items()
  }
  merged = {
    tag: {**kept.get(tag, {}), **written.get(tag, {})} for tag in kept.keys() | written.keys()
  }
  (uninterrupted,) = _events(run)
  for tag, values in _scalars(uninterrupted).items():
    assert merged[tag].keys() == values.keys(), tag
    np.testing.assert_allclose(list(merged[tag].values()), list(values.values()), rtol=1e-6)


def test_tensorboard_itself_shows_each_step_once_after_a_resume(resumed):
  event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  accumulator = event_accumulator.EventAccumulator(
    str(resumed / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
  )
  accumulator.Reload()
  assert [e.step for e in accumulator.Scalars("loss/train")] == [2, 4, 6, 8]
  assert [e.step for e in accumulator.Scalars("loss/eval")] == [4, 8]


def test_a_workdir_from_before_the_key_resumes_with_telemetry_off(run, tmp_path):
  """Its config.json has no 'optimizer.telemetry' and its state no figures: the key's default
  (on) would be another run, refused naming the key; off, it is the same run."""
  workdir = tmp_path / "old"
  workdir.mkdir()
  config = json.loads((run / "config.json").read_text())
  del config["optimizer"]["telemetry"]
  (workdir / "config.json").write_text(json.dumps(config))
  current = _config()
  _, abstract_params = nnx.split(nnx.eval_shape(lambda: train.create_model(current)))
  with pytest.raises(config_lib.ConfigError, match=r"different config \(optimizer\.telemetry\)"):
    workdir_lib.Workdir(str(workdir)).check(current, abstract_params)
  current.optimizer.telemetry = False
  assert workdir_lib.Workdir(str(workdir)).check(current, abstract_params) is None
