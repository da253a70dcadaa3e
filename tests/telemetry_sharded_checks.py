"""Runs adafactor with and without telemetry on 8 simulated CPU devices; reports JSON.

Started in a subprocess by tests/test_telemetry.py (the device count must be set
before jax is imported); the assertions are made there. Per mesh axis type (Auto,
Explicit), with the parameters model-parallel on a 2x4 mesh (tests/sharded_checks.py's
layout, which all-reduces the RMS values that clipping and the parameter scale need): the
collectives of the compiled update with telemetry on and off, the shardings of the
figures after init and after the steps, whether the updates are bit-identical on
and off, and the largest difference of the figures from the same steps on one device.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import adafactor_jax  # noqa: E402
from tests.conftest import bits, collectives  # noqa: E402
from tests.sharded_checks import AXES, LAYOUTS, SHAPES, host_inputs, spec_list  # noqa: E402


def _figure_leaves(state) -> dict:
  """The TelemetryState figures' leaves by their path in the state."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if "per_step" in name or "per_parameter" in name:
      out[name] = leaf
  return out


def check(axis_type, layout) -> dict:
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  host, grads = host_inputs()
  shardings = {k: NamedSharding(mesh, LAYOUTS[layout][k]) for k in SHAPES}
  factor_dims = adafactor_jax.logical_factor_dims(AXES)
  on, off = (
    adafactor_jax.adafactor(factor_dims=factor_dims, telemetry=telemetry)
    for telemetry in (True, False)
  )

  def jitted_step(tx):
    def run(params, state, grad):
      updates, state = tx.update(grad, state, params)
      return optax.apply_updates(params, updates), state, updates

    return jax.jit(run)

  step = {"on": jitted_step(on), "off": jitted_step(off)}
  # One device, for the figures to compare with.
  params, state = host, on.init(host)
  for g in grads:
    params, state, _ = step["on"](params, state, g)
  expected = jax.device_get(adafactor_jax.telemetry(state))

  observed = {}
  with jax.set_mesh(mesh):
    for name, tx in (("on", on), ("off", off)):
      params = jax.device_put(host, shardings)
      state = jax.jit(tx.init)(params)
      init_state = state
      hlo = (
        jax.jit(lambda s, g, p, tx=tx: tx.update(g, s, p))
        .lower(state, params, params)
        .compile()
        .as_text()
      )
      updates = []
      for g in grads:
        params, state, u = step[name](params, state, jax.device_put(g, shardings))
        updates.append(jax.device_get(u))
      observed[name] = {
        "collectives": sorted(collectives(hlo)),
        "updates": updates,
        "init": {k: spec_list(x.sharding) for k, x in _figure_leaves(init_state).items()},
        "after_steps": {k: spec_list(x.sharding) for k, x in _figure_leaves(state).items()},
      }
      if name == "on":
        observed[name]["telemetry"] = jax.device_get(adafactor_jax.telemetry(state))
  got = observed["on"]["telemetry"]
  return {
    "collectives_on": observed["on"]["collectives"],
    "collectives_off": observed["off"]["collectives"],
    "figure_shardings_init": observed["on"]["init"],
    "figure_shardings_after_steps": observed["on"]["after_steps"],
    "updates_bit_identical": all(
      np.array_equal(bits(a), bits(b))
      for u_on, u_off in zip(observed["on"]["updates"], observed["off"]["updates"], strict=True)
      for a, b in zip(jax.tree.leaves(u_on), jax.tree.leaves(u_off), strict=True)
    ),
    "names": sorted(got),
    "expected_names": sorted(expected),
    "max_relative_error": max(
      abs(float(got[k]) - float(expected[k])) / max(abs(float(expected[k])), 1e-30)
      for k in expected
    ),
  }


def main() -> None:
  results = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    key = f"2x4-{axis_type.name.lower()}-model"
    try:
      results[key] = check(axis_type, "model")
    except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
      results[key] = {"error": traceback.format_exc()}
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
