"""``adafactor-train --topology ... --compile_only``: the job's train step compiled by libtpu for
a TPU topology, no TPU needed. Its figures are the compiled program's; a step too large is
refused in one line with nothing written; a mesh, topology or setup it cannot use is refused.
And a deep model's per-chip temporaries stay near one layer's: the activations are not gathered
over the batch (a regression the test can see, as it checks by turning the fix off)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from adafactor_jax.training import compile_only, model, pods, train
from adafactor_jax.training.configs import decoder_1b, default
from tests.training.test_train import run_main

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'",
)


def _refusal(capsys) -> str:
  err = capsys.readouterr().err.strip()
  lines = err.splitlines()
  assert len(lines) == 1, err
  assert lines[0].startswith("adafactor-train: error: ")
  return lines[0]


@needs_libtpu
def test_the_default_job_fits_a_v5e_and_compile_json_holds_the_compiled_programs_figures(
  tmp_path, capsys
):
  workdir = tmp_path / "run"
  assert run_main("--topology=v5e:2x2", "--compile_only", f"--workdir={workdir}") == 0
  assert sorted(p.name for p in workdir.iterdir()) == ["compile.json"]  # nothing else
  report = json.loads((workdir / "compile.json").read_text())
  assert report["topology"] == "v5e:2x2" and report["devices"] == 4
  assert report["device_kind"] == "TPU v5 lite" and report["mesh"] == {"data": 4, "model": 1}

  # The same step compiled here, independently: the written figures are its own.
  devices = compile_only.topology_devices("v5e:2x2")
  job = train.setup(default.get_config(), devices)
  step, _ = train.make_steps(job.graphdef, job.tx, job.shardings)
  state = jax.eval_shape(job.tx.init, job.abstract_params)
  batch = jax.ShapeDtypeStruct((16, 129), jnp.int32, sharding=job.shardings.batch)
  args = (
    train.abstract(job.abstract_params, job.shardings.params),
    train.abstract(state, job.shardings.opt_state),
    batch,
  )
  memory = step.lower(*args).compile().memory_analysis()
  per = report["per_device"]
  assert per["temporaries"] == memory.temp_size_in_bytes
  assert per["arguments"] == memory.argument_size_in_bytes
  assert per["aliased"] == memory.alias_size_in_bytes
  expected_peak = (
    memory.argument_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.temp_size_in_bytes
    + memory.generated_code_size_in_bytes
  )
  assert per["peak"] == expected_peak <= report["hbm_available"]
  # Every parameter has an 'embed' axis, sharded over the 4 chips of 'data' (FSDP).
  n = sum(x.size for x in jax.tree.leaves(job.abstract_params))
  assert report["param_count"] == n and report["totals"]["params"] == 4 * n
  assert per["params"] * 4 == report["totals"]["params"]
  # Adafactor's factored statistics are replicated along the axis they average over: fewer
  # than 4 ways, more than 1.
  assert 1 < report["opt_state_devices"] < 4
  assert per["opt_state"] * report["opt_state_devices"] == pytest.approx(
    report["totals"]["opt_state"]
  )
  largest = report["largest_temporaries"]
  assert largest and all(b["bytes"] > 0 and b["shape"] and b["op"] for b in largest)
  out = capsys.readouterr().out
  assert "compiled the train step for 4 x TPU v5 lite" in out and "peak" in out


@needs_libtpu
def test_adamw_state_per_chip_is_its_total_over_the_chips(tmp_path):
  config = default.get_config()
  config.optimizer.update(name="adamw", telemetry=False)
  report = compile_only.compile_train_step(config, compile_only.topology_devices("v5e:2x2"))
  # mu and nu sharded as the parameters, over the 4 chips; the step counts on every chip.
  counts = 4 * len([x for x in jax.tree.leaves(report_state(config)) if x.ndim == 0])
  assert report["per_device"]["opt_state"] - counts == (report["totals"]["opt_state"] - counts) / 4


def report_state(config):
  job = train.setup(config, compile_only.topology_devices("v5e:2x2"))
  return jax.eval_shape(job.tx.init, job.abstract_params)


@needs_libtpu
def test_a_model_too_large_for_the_chips_exits_2_in_one_line_and_writes_nothing(tmp_path, capsys):
  workdir = tmp_path / "run"
  flags = [
    "--config=decoder_8b",
    "--topology=v5e:2x2",
    "--compile_only",
    f"--workdir={workdir}",
  ]
  assert run_main(*flags) == 2
  line = _refusal(capsys)
  assert "the train step needs" in line and "where 15.75G is available" in line
  assert "Largest buffers: " in line and "Would help: " in line
  assert "--config.optimizer.fused_backward=True" in line  # the 8B config is unfused
  assert not workdir.exists()


@needs_libtpu
@pytest.mark.parametrize(
  "flags, expected",
  [
    (
      ["--topology=v5e:2x2", "--compile_only", "--config.mesh.model=3"],
      "'mesh.model' = 3 do not make a mesh of the 4 device(s) there are (the topology's TPU v5",
    ),
    (["--topology=v9:2x2", "--compile_only"], "--topology v9:2x2: not a TPU topology libtpu"),
    (["--topology=v5e:2x2", "--compile_only", "--num_slices=0"], "--num_slices must be at least"),
    (["--topology=v5e:2x2"], "--topology and --num_slices name devices to compile for"),
    (
      ["--topology=v5e:2x2", "--num_slices=2", "--compile_only", "--config.mesh.model=8"],
      "'mesh.data' = 1 must be a multiple of the 2 slices",
    ),
  ],
)
def test_what_cannot_be_compiled_for_is_refused_in_one_line(tmp_path, capsys, flags, expected):
  workdir = tmp_path / "run"
  assert run_main(*flags, f"--workdir={workdir}") == 2
  assert expected in _refusal(capsys)
  assert not workdir.exists()


@needs_libtpu
def test_two_slices_compile_with_data_parallelism_across_them(tmp_path):
  workdir = tmp_path / "run"
  flags = ["--topology=v5e:2x2", "--num_slices=2", "--compile_only", f"--workdir={workdir}"]
  assert run_main(*flags) == 0
  report = json.loads((workdir / "compile.json").read_text())
  assert report["num_slices"] == 2 and report["devices"] == 8
  assert report["mesh"] == {"data": 8, "model": 1}


def test_without_libtpu_the_topology_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
  )
  flags = ["--topology=v5e:2x2", "--compile_only", f"--workdir={tmp_path / 'run'}"]
  assert run_main(*flags) == 2
  assert "compiling for a TPU needs libtpu: pip install -e '.[tpu]'" in _refusal(capsys)


def _deep_model_temporaries(devices: list) -> tuple[int, int]:
  """(temporaries per chip, what one layer's gathered weights and activations allow) of a
  16-layer decoder with FSDP over 16 chips, one sequence each."""
  config = decoder_1b.get_config()
  d, layers, mlp, heads, length = 1024, 16, 4096, 8, 1024
  config.model.update(d_model=d, num_layers=layers, mlp_dim=mlp, num_heads=heads)
  config.data.update(seq_len=length, batch_size=len(devices))
  report = compile_only.compile_train_step(config, devices)
  rows = 1
  residuals = layers * rows * length * d * 2  # each layer's bf16 input, kept for the backward
  gathered_layer = (4 * d * d + 2 * d * mlp) * 4  # one layer's float32 weights, whole
  attention = rows * heads * length * length * 4  # one layer's float32 attention weights
  state = 2 * report["per_device"]["params"]  # gradients and a bfloat16 copy, sharded
  budget = residuals + state + 4 * gathered_layer + 2 * attention
  return report["per_device"]["temporaries"], budget


@needs_libtpu
def test_a_deep_models_temporaries_stay_near_one_layers_gathered_weights(monkeypatch):
  devices = compile_only.topology_devices("v5e:4x4")
  temporaries, budget = _deep_model_temporaries(devices)
  assert temporaries <= budget / 2
  # Left to itself, the compiler gathers the activations over the batch rather than the
  # weights (the 'data' axis shards both): far more than one layer's worth.
  monkeypatch.setattr(model, "_constrain", lambda x, sharding: x)
  unconstrained, _ = _deep_model_temporaries(devices)
  assert unconstrained > budget


def test_the_committed_pod_tables_are_what_their_results_give():
  root = Path(__file__).resolve().parents[2] / "docs" / "results"
  results = json.loads((root / "pods.json").read_text())
  assert (root / "pods.md").read_text() == pods.readme_table(results) + "\n"
  assert (root / "pods_summary.md").read_text() == pods.summary_table(results) + "\n"
  # The 8B on v5e-256 fits with every optimizer; AdamW's state is sharded over the chips.
  v5e = results["topologies"]["v5e:16x16"]["configs"]["decoder_8b"]
  assert all("refused" not in figures for figures in v5e.values())
  assert v5e["adamw"]["opt_state_devices"] > 250
