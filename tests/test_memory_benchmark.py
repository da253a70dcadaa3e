"""benchmarks/memory.py: peaks of the whole train step on a small size, the interpolation of
the largest model that fits, and a smoke run that writes the JSON, the chart and the table."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import optax
import pytest

import adafactor_jax
from benchmarks import gpt, memory, readme, trees

SMALL = gpt.Config(d_model=256, n_layers=4, vocab=1024, seq_len=64, batch=2)


def test_the_model_has_gpt2s_parameter_count():
  assert gpt.Config(d_model=768, n_layers=12, vocab=50257).params == 124_439_808


@pytest.fixture(scope="module")
def small_peaks():
  return {
    name: memory.peak_bytes(memory.compile_train_step(name, SMALL, jnp.float32))
    for name in ("sgd", "optax_adamw", "adafactor_jax", "adafactor_jax_int8_momentum")
  }


def _state_bytes(tx) -> int:
  return trees.tree_bytes(jax.eval_shape(tx.init, gpt.param_shapes(SMALL)))


def test_peaks_differ_by_the_optimizer_state(small_peaks):
  """Temporaries are the same (the update runs after the backward pass has freed the
  activations), so the peaks differ by what the states hold, to 2%."""
  for name in ("optax_adamw", "adafactor_jax_int8_momentum"):
    difference = small_peaks[name]["peak"] - small_peaks["adafactor_jax"]["peak"]
    state = _state_bytes(memory.OPTIMIZERS[name]()) - _state_bytes(
      memory.OPTIMIZERS["adafactor_jax"]()
    )
    assert difference == pytest.approx(state, rel=0.02), name
  adamw_state = _state_bytes(optax.adamw(1e-3))
  assert adamw_state == 2 * 4 * SMALL.params + 4
  assert (
    small_peaks["adafactor_jax"]["peak"] < small_peaks["optax_adamw"]["peak"] - 0.95 * adamw_state
  )
  for figures in small_peaks.values():  # parameters and state donated: updated in place
    assert figures["aliased"] >= 0.99 * figures["outputs"]


def test_largest_that_fits_interpolates_between_the_sizes_around_the_budget():
  points = [(100, 10.0), (200, 30.0), (400, 50.0)]
  assert memory.largest_that_fits(points, 40.0) == {
    "largest_size_params": 200,
    "params_at_budget": 300.0,
  }
  assert memory.largest_that_fits(points, 5.0) == {
    "largest_size_params": None,
    "params_at_budget": None,
  }
  # Beyond the largest size: not extrapolated.
  assert memory.largest_that_fits(points, 60.0)["params_at_budget"] is None


def test_smoke_run_writes_json_chart_and_table(tmp_path, monkeypatch):
  monkeypatch.setitem(memory.SIZES, "tiny", SMALL)
  monkeypatch.setitem(memory.SIZES, "tiny2", SMALL._replace(n_layers=8))
  results = memory.main(
    ["--sizes", "tiny,tiny2", "--optimizers", "sgd,adafactor_jax_fused", "--dtypes", "float32"]
    + ["--out", str(tmp_path)]
  )
  written = json.loads((tmp_path / "memory.json").read_text())
  assert written["sizes"]["tiny2"]["params"] == SMALL._replace(n_layers=8).params
  assert (tmp_path / "memory.png").stat().st_size > 0
  peaks = written["peaks"]["float32"]
  assert peaks["adafactor_jax_fused"]["tiny2"]["peak"] < peaks["sgd"]["tiny2"]["peak"]
  assert peaks["sgd"]["tiny"]["peak"] < peaks["sgd"]["tiny2"]["peak"]
  table = memory.readme_table(results)
  assert "adafactor_jax, fused into the backward pass" in table and "| float32 |" in table
  env = written["environment"]
  assert env["cpu_count"] == os.cpu_count() and env["jax"] == jax.__version__
  if env["cpu"]:  # the machine, named in the table's first line
    assert f" on {env['cpu']} ({env['cpu_count']} cores) " in table.splitlines()[0]
  budget = written["largest"]["float32"]["sgd"]["16 GiB"]
  assert budget == {
    "largest_size_params": SMALL._replace(n_layers=8).params,
    "params_at_budget": None,
  }


def test_the_documentation_renders_the_memory_table_from_its_json():
  assert "benchmarks/results/memory.json" in readme.sources()["docs/performance.md"]
  rendered = readme.render("benchmarks/results/memory.json")
  assert rendered.startswith("Computed ") and "largest at 16 GiB" in rendered


def test_adafactor_factor_dims_of_the_stack_are_per_layer():
  state = jax.eval_shape(
    adafactor_jax.adafactor(factor_dims=gpt.factor_dims).init, gpt.param_shapes(SMALL)
  )
  stats = state[0]
  assert stats.v_row[0]["mlp"]["c_fc"]["kernel"].shape == (4, 256, 1)
  assert stats.v_col[0]["mlp"]["c_fc"]["kernel"].shape == (4, 1, 1024)
  assert stats.v[0]["ln_1"]["scale"].shape == (4, 256)
  assert stats.v_row[1]["wte"].shape == (1024, 1)
