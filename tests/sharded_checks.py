"""Runs adafactor on 8 simulated CPU devices and reports what it observed, as JSON.

Started in a subprocess by tests/test_sharding.py, because the device count
must be set before jax is imported; the assertions are made there. For each
mesh (2x4, 8x1), axis type (Auto, Explicit) and parameter layout (replicated
for data parallelism, sharded for model parallelism) it records the
shardings of ``jax.jit(tx.init)(params)`` and of ``state_shardings``, the
first device's bytes, the collectives of the compiled update, and the
largest difference from the same steps on one device.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # not on import by test_sharding: the env would reach its subprocesses
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import adafactor_jax  # noqa: E402
from tests.conftest import collectives, named_leaves  # noqa: E402

SHAPES = {
  "kernel": (256, 512),
  "stacked": (4, 256, 384),
  "attention": (256, 4, 64),
  "bias": (512,),
  "narrow": (512, 16),  # 16 < 128: a full second moment
  "scalar": (),
}
AXES = {
  "kernel": ("embed", "mlp"),
  "stacked": ("layers", "embed", "mlp"),
  "attention": ("embed", "heads", "kv"),
  "bias": ("mlp",),
  "narrow": ("mlp", None),
  "scalar": None,
}
LAYOUTS = {
  "replicated": {name: P() for name in SHAPES},
  "model": {
    "kernel": P("data", "model"),
    "stacked": P(None, "data", "model"),
    "attention": P("data", "model", None),
    "bias": P("model"),
    "narrow": P("model", None),
    "scalar": P(),
  },
}
STEPS = 3


def per_device_bytes(tree) -> int:
  """Bytes that the first device holds of a tree of sharded arrays."""
  device = jax.devices()[0]
  return sum(
    shard.data.nbytes
    for x in jax.tree.leaves(tree)
    for shard in x.addressable_shards
    if shard.device == device
  )


def spec_list(sharding) -> list:
  """A NamedSharding's spec as a JSON list, trailing Nones dropped."""
  spec = [list(e) if isinstance(e, tuple) else e for e in sharding.spec]
  while spec and spec[-1] is None:
    spec.pop()
  return spec


def host_inputs() -> tuple[dict, list[dict]]:
  """The parameters and the STEPS gradients every check starts from, on the host."""
  rng = np.random.default_rng(0)
  host = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
  grads = [
    {k: (10.0**-i * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}
    for i in range(STEPS)
  ]
  return host, grads


def train_step(tx):
  def step(params, state, grad):
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  return step


def one_device_params(tx, host, grads) -> dict:
  """The parameters after the steps on device 0 of this process: what the mesh must give."""
  step = jax.jit(train_step(tx))
  params, state = host, tx.init(host)
  for g in grads:
    params, state = step(params, state, g)
  return jax.device_get(params)


def max_relative_error(got: dict, expected: dict) -> float:
  return max(
    float(np.max(np.abs(got[k] - expected[k])) / max(np.max(np.abs(expected[k])), 1e-30))
    for k in SHAPES
  )


def check(mesh_shape, axis_type, layout) -> dict:
  mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(axis_type,) * 2)
  host, grads = host_inputs()
  shardings = {k: NamedSharding(mesh, LAYOUTS[layout][k]) for k in SHAPES}
  tx = adafactor_jax.adafactor(
    1e-2, momentum=0.9, factor_dims=adafactor_jax.logical_factor_dims(AXES)
  )
  step = train_step(tx)
  expected = one_device_params(tx, host, grads)

  params = jax.device_put(host, shardings)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    predicted = adafactor_jax.state_shardings(tx, params=abstract, param_shardings=shardings)
    # Eager init on sharded ShapeDtypeStructs (issue 16, item 2).
    abstract_init = tx.init(
      jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), host, shardings)
    )
    compiled = jax.jit(step).lower(params, state, jax.device_put(grads[0], shardings)).compile()
    update_hlo = (
      jax.jit(lambda s, g, p: tx.update(g, s, p)).lower(state, params, params).compile().as_text()
    )
    init_state = state
    for g in grads:
      params, state = compiled(params, state, jax.device_put(g, shardings))
  got = jax.device_get(params)
  return {
    **int8_momentum_check(host, grads, shardings, mesh),
    **skip_nonfinite_check(tx, params, state, grads[0], shardings, mesh),
    **ordered_check(tx, params, state, grads[0], shardings, mesh),
    "init": {k: spec_list(x.sharding) for k, x in named_leaves(init_state).items()},
    "predicted": {k: spec_list(s) for k, s in named_leaves(predicted).items()},
    "abstract_init": {k: spec_list(x.sharding) for k, x in named_leaves(abstract_init).items()},
    "after_steps": {k: spec_list(x.sharding) for k, x in named_leaves(state).items()},
    "shapes": {k: list(x.shape) for k, x in named_leaves(init_state).items()},
    "state_bytes_device0": per_device_bytes(init_state),
    "collectives": collectives(update_hlo),
    "max_relative_error": max_relative_error(got, expected),
  }


def int8_momentum_check(host, grads, shardings, mesh) -> dict:
  """int8 momentum: where its values and block scales live, what the update communicates,
  and the steps against the same steps on one device."""
  tx = adafactor_jax.adafactor(
    1e-2,
    momentum=0.9,
    momentum_dtype="int8",
    factor_dims=adafactor_jax.logical_factor_dims(AXES),
  )

  step = train_step(tx)
  expected = one_device_params(tx, host, grads)
  params = jax.device_put(host, shardings)
  with jax.set_mesh(mesh):
    state = jax.jit(tx.init)(params)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    predicted = adafactor_jax.state_shardings(tx, params=abstract, param_shardings=shardings)
    compiled = jax.jit(step).lower(params, state, jax.device_put(grads[0], shardings)).compile()
    (index,) = [i for i, n in enumerate(state) if isinstance(n, adafactor_jax.Int8MomentumState)]
    init = state[index]._asdict()
    for g in grads:
      params, state = compiled(params, state, jax.device_put(g, shardings))
  got = jax.device_get(params)
  return {
    "int8_init": {k: spec_list(x.sharding) for k, x in named_leaves(init).items()},
    "int8_shapes": {k: list(x.shape) for k, x in named_leaves(init).items()},
    "int8_predicted": {
      k: spec_list(x) for k, x in named_leaves(predicted[index]._asdict()).items()
    },
    "int8_collectives": collectives(compiled.as_text()),
    "int8_max_relative_error": max_relative_error(got, expected),
  }


def _bits_equal(a, b) -> bool:
  a, b = jax.device_get(a), jax.device_get(b)
  return all(
    np.array_equal(np.atleast_1d(x).view(np.uint8), np.atleast_1d(y).view(np.uint8))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def skip_nonfinite_check(tx, params, state, grad, shardings, mesh) -> dict:
  """A NaN in one shard of one gradient, under jit on the mesh, with skip_nonfinite."""
  skipping = adafactor_jax.skip_nonfinite(tx)

  @jax.jit
  def step(params, state, grad):
    updates, state = skipping.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  poisoned = dict(grad)
  poisoned["kernel"] = poisoned["kernel"].copy()
  poisoned["kernel"][200, 500] = np.nan  # on the last device's shard when model-parallel
  with jax.set_mesh(mesh):
    state = skipping.init(params)
    params, state = step(params, state, jax.device_put(grad, shardings))
    new_params, new_state = step(params, state, jax.device_put(poisoned, shardings))
  return {
    "skip_bit_identical": _bits_equal(
      (new_params, new_state.inner_state), (params, state.inner_state)
    ),  # fmt: skip
    "skipped_steps": int(new_state.skipped_steps),
    "skip_shardings_kept": all(
      x.sharding == y.sharding
      for x, y in zip(
        jax.tree.leaves((new_params, new_state)), jax.tree.leaves((params, state)), strict=True
      )  # fmt: skip
    ),
  }


def ordered_check(tx, params, state, grad, shardings, mesh) -> dict:
  """update_and_apply on the mesh: the plain step's values, bit for bit, and its shardings."""
  plain = jax.jit(train_step(tx))
  ordered = jax.jit(
    lambda p, s, g: adafactor_jax.update_and_apply(tx, grads=g, opt_state=s, params=p, groups=2)
  )
  with jax.set_mesh(mesh):
    grad = jax.device_put(grad, shardings)
    expected, got = plain(params, state, grad), ordered(params, state, grad)
  return {
    "ordered_bit_identical": _bits_equal(got, expected),
    "ordered_shardings_kept": all(
      x.sharding == y.sharding
      for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
    ),
  }


def main() -> None:
  results = {}
  for mesh_shape in ((2, 4), (8, 1)):
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      for layout in LAYOUTS:
        key = f"{mesh_shape[0]}x{mesh_shape[1]}-{axis_type.name.lower()}-{layout}"
        try:
          results[key] = check(mesh_shape, axis_type, layout)
        except Exception:  # noqa: BLE001 (reported to the test, which fails on it)
          results[key] = {"error": traceback.format_exc()}
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
