"""warm_start_state on 8 simulated CPU devices; reports what it observed, as JSON.

Started in a subprocess by tests/test_warm_start.py (the device count must be
set before jax is imported); the assertions are made there. For a 2x4 mesh
with Auto and Explicit axes, model-parallel params and an AdamW state that is
sharded like them or replicated, it records the shardings of the warm state,
eager and under the caller's jit, next to those of ``tx.init(params)``, and
the largest difference from the same conversion on one device.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # not on import: the env would reach other subprocesses
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import adafactor_jax  # noqa: E402

SPECS = {
  "kernel": ((256, 512), P("data", "model")),
  "stacked": ((4, 256, 384), P(None, "data", "model")),
  "bias": ((512,), P("model")),
}


def shardings_by_path(tree) -> dict:
  """'path': [spec...] of each leaf, trailing Nones dropped (NamedSharding leaves)."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    spec = [list(e) if isinstance(e, tuple) else e for e in leaf.sharding.spec]
    while spec and spec[-1] is None:
      spec.pop()
    out[jax.tree_util.keystr(path)] = spec
  return out


def check(axis_type, source_layout: str) -> dict:
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)
  rng = np.random.default_rng(0)
  host = {
    k: (0.1 * rng.standard_normal(shape)).astype(np.float32) for k, (shape, _) in SPECS.items()
  }
  grads = [
    {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()} for _ in range(3)
  ]
  adamw = optax.adamw(1e-3)
  source = adamw.init(host)
  for g in grads:
    _, source = adamw.update(g, source, host)
  tx = adafactor_jax.adafactor(momentum=0.9)
  expected = adafactor_jax.warm_start_state(tx, params=host, source_state=source)  # one device

  param_shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in SPECS.items()}
  with jax.set_mesh(mesh):
    params = jax.device_put(host, param_shardings)
    if source_layout == "replicated":
      source = jax.device_put(source, NamedSharding(mesh, P()))
    else:  # mu and nu sharded like the params
      adam = source[0]
      adam = adam._replace(
        **{f: jax.device_put(getattr(adam, f), param_shardings) for f in ("mu", "nu")}
      )
      source = (adam, *source[1:])
    init = tx.init(params)
    warm = adafactor_jax.warm_start_state(tx, params=params, source_state=source)
    out_shardings = adafactor_jax.state_shardings(
      tx, params=params, param_shardings=param_shardings
    )
    jitted = jax.jit(
      lambda p, s: adafactor_jax.warm_start_state(tx, params=p, source_state=s),
      out_shardings=out_shardings,
    )(params, source)
  got = jax.device_get(warm)
  return {
    "init": shardings_by_path(init),
    "warm": shardings_by_path(warm),
    "jitted": shardings_by_path(jitted),
    "max_relative_error": max(
      float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
    ),
    "jitted_equal": all(
      np.array_equal(np.asarray(a), np.asarray(b))
      for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(warm), strict=True)
    ),
  }


def main() -> None:
  results = {}
  for axis_type in (AxisType.Auto, AxisType.Explicit):
    for source_layout in ("like-params", "replicated"):
      key = f"{axis_type.name.lower()}-{source_layout}"
      try:
        results[key] = check(axis_type, source_layout)
      except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
        results[key] = {"error": traceback.format_exc()}
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
