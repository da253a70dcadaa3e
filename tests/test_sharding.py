"""Logical factor rules, per-layer statistics, and state that follows sharded params."""

from __future__ import annotations

import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import adafactor_jax
from adafactor_jax import FactorAxes, logical_factor_dims
from tests.conftest import run_check_script, run_optax
from tests.reference import Options, Reference

# --------------------------------------------------------------------------- the rules


@pytest.mark.parametrize(
  "names, shape, expected",
  [
    (("embed", "mlp"), (256, 512), FactorAxes((0,), (1,))),
    (("mlp", "embed"), (512, 256), FactorAxes((1,), (0,))),
    (("vocab", "embed"), (1000, 256), FactorAxes((1,), (0,))),
    (("embed", "heads", "kv"), (256, 4, 64), FactorAxes((0,), (1, 2))),
    (("layers", "embed", "mlp"), (4, 256, 512), FactorAxes((1,), (2,), (0,))),
    (("expert", "embed", "mlp"), (8, 256, 512), FactorAxes((1,), (2,), (0,))),
    (("stack", "embed"), (4, 256), FactorAxes((), (), (0,))),
    # Too small to factor (16 < 128): a full second moment, batch axes kept.
    (("layers", "embed", "mlp"), (4, 16, 512), FactorAxes((), (), (0,))),
    # No row or no column axis named: the default choice on the non-batch axes.
    (("layers", None, None), (4, 256, 384), FactorAxes((1,), (2,), (0,))),
    (("embed", "unknown_name", "x"), (128, 3, 160), FactorAxes((0,), (2,))),
    (("a", "b", "c", "d"), (3, 3, 128, 160), FactorAxes((2,), (3,))),
    (("embed",), (256,), FactorAxes()),
  ],
)
def test_standard_rules_choose_axes(names, shape, expected):
  choose = logical_factor_dims({"w": P(*names)})
  assert choose("w", shape) == expected


def test_params_without_names_take_the_default_choice_whatever_the_rank():
  choose = logical_factor_dims({"conv": None, "stacked": None})
  assert choose("conv", (3, 3, 128, 160)) == FactorAxes((2,), (3,))  # T5X raises here (#243)
  assert choose("stacked", (4, 256, 384)) == FactorAxes((1,), (2,))
  assert choose("conv", (3, 3, 16, 16)) == FactorAxes()  # too small: a full second moment


def test_user_rules_extend_and_override_the_standard_table():
  axes = {"conv": ("h", "w", "in", "out"), "kernel": ("embed", "mlp")}
  choose = logical_factor_dims(axes, rules={"in": "row", "out": "col", "mlp": "batch"})
  assert choose("conv", (3, 3, 128, 160)) == FactorAxes((2,), (3,))
  # 'mlp' is now a batch axis; no column axis is left, so the rest is default.
  assert choose("kernel", (256, 512)) == FactorAxes((), (), (1,))
  assert adafactor_jax.STANDARD_FACTOR_RULES["mlp"] == "col"  # the table is not changed


@pytest.mark.parametrize(
  "kwargs, fragment",
  [
    ({"rules": {"mlp": "column"}}, r"rules\['mlp'\] must be one of"),
    ({"rules": [("mlp", "col")]}, "rules must be a mapping"),
    ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor"),
  ],
)
def test_bad_rules_are_refused_at_construction(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    logical_factor_dims({"w": P("embed", "mlp")}, **kwargs)


def test_bad_axis_names_name_the_parameter():
  with pytest.raises(ValueError, match="'w' is a ndarray, not logical axis names"):
    logical_factor_dims({"w": np.zeros((2, 2))})
  choose = logical_factor_dims({"w": P("embed", "mlp")})
  with pytest.raises(ValueError, match="no axis names for parameter 'other'"):
    choose("other", (4, 4))
  with pytest.raises(ValueError, match="'w' of shape \\(4, 4, 4\\) has 2 logical axis names"):
    choose("w", (4, 4, 4))
  tx = adafactor_jax.adafactor(factor_dims=choose)
  with pytest.raises(ValueError, match="parameter 'b'"):
    tx.init({"w": jnp.zeros((256, 256)), "b": jnp.zeros(3)})


class _Block(nnx.Module):
  """An MLP block whose kernels carry logical axis names, as a Flax model's do."""

  def __init__(self, rngs: nnx.Rngs):
    def named(*names):
      return nnx.with_partitioning(nnx.initializers.lecun_normal(), names, eager_sharding=False)

    self.mlp_in = nnx.Linear(128, 256, use_bias=False, kernel_init=named("embed", "mlp"), rngs=rngs)
    self.mlp_out = nnx.Linear(
      256, 128, use_bias=False, kernel_init=named("mlp", "embed"), rngs=rngs
    )
    self.scale = nnx.Param(jnp.ones(128), out_sharding=("embed",), eager_sharding=False)


class _Model(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.blocks = nnx.List([_Block(rngs), _Block(rngs)])


def _tiny_lm():
  return _Model(nnx.Rngs(0))


def test_nnx_metadata_gives_the_names_with_or_without_get_partition_spec():
  params = nnx.state(_tiny_lm(), nnx.Param)
  from_specs = logical_factor_dims(nnx.get_partition_spec(params))
  from_variables = logical_factor_dims(params)
  tx_a = adafactor_jax.adafactor(factor_dims=from_specs)
  tx_b = adafactor_jax.adafactor(factor_dims=from_variables)
  shapes_a = jax.tree.map(jnp.shape, tx_a.init(params))
  assert shapes_a == jax.tree.map(jnp.shape, tx_b.init(params))
  state = tx_a.init(params)[0]
  # ('embed', 'mlp') and ('mlp', 'embed'): R keeps the embed axis either way.
  assert state.v_row["blocks"][0]["mlp_in"]["kernel"][...].shape == (128, 1)
  assert state.v_row["blocks"][0]["mlp_out"]["kernel"][...].shape == (1, 128)
  assert from_specs("blocks/0/mlp_out/kernel/value", (256, 128)) == FactorAxes((1,), (0,))
  # Both choices give the same step, and the step keeps the state's shapes.
  grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
  step_a, state_a = jax.jit(tx_a.update)(grads, tx_a.init(params), params)
  step_b, _ = jax.jit(tx_b.update)(grads, tx_b.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, step_a, step_b)
  assert jax.tree.map(jnp.shape, state_a) == shapes_a


def test_linen_partitioned_boxes_give_the_names():
  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
      return nn.Dense(512, kernel_init=init, use_bias=False)(x)

  boxed = Model().init(jax.random.key(0), jnp.zeros((1, 256)))["params"]
  for axes in (boxed, nn.get_partition_spec(boxed)):
    choose = logical_factor_dims(axes)
    assert choose("Dense_0/kernel", (256, 512)) == FactorAxes((0,), (1,))
  params = nn.unbox(boxed)
  tx = adafactor_jax.adafactor(factor_dims=logical_factor_dims(boxed))
  state = tx.init(params)
  assert state[0].v_row["Dense_0"]["kernel"].shape == (256, 1)
  # The step is that of the same choice made by position, and keeps the state's shapes.
  grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  by_position = adafactor_jax.adafactor(factor_dims=lambda path, shape: (0, 1))
  expected, _ = jax.jit(by_position.update)(grads, by_position.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, updates, expected)
  assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)


# --------------------------------------------------------------------------- numerics


def _reference_run(params, grads_list, **options):
  reference = Reference(Options(**options), params)
  for grads in grads_list:
    reference.step(grads)
  return reference.params


def test_stacked_layers_get_statistics_clipping_and_scale_per_layer():
  """Each layer of a (layers, embed, mlp) stack moves as if it were alone."""
  rng = np.random.default_rng(0)
  layer_scales = np.array([1e-3, 1e-1, 3.0])[:, None, None]  # different per layer
  stacked = (layer_scales * rng.standard_normal((3, 160, 144))).astype(np.float32)
  grads_list = [
    {"s": (layer_scales[::-1] * rng.standard_normal((3, 160, 144))).astype(np.float32)}
    for _ in range(4)
  ]
  choose = logical_factor_dims({"s": ("layers", "embed", "mlp")})
  options = {"momentum": 0.9, "clipping_threshold": 1.0}
  tx = adafactor_jax.adafactor(factor_dims=choose, **options)
  got = run_optax(tx, {"s": stacked}, grads_list)[0]["s"]
  expected = _reference_run(
    {f"s{i}": stacked[i] for i in range(3)},
    [{f"s{i}": g["s"][i] for i in range(3)} for g in grads_list],
    factor_axes=lambda shape: (0, 1),
    **options,
  )
  expected = np.stack([expected[f"s{i}"] for i in range(3)])
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-7)
  # Without the 'layers' name, one clip and one scale span the stack.
  whole = run_optax(adafactor_jax.adafactor(**options), {"s": stacked}, grads_list)[0]["s"]
  assert np.max(np.abs(whole - expected)) > 100 * np.max(np.abs(got - expected))


def test_several_column_axes_factor_like_the_joined_matrix():
  """An (embed, heads, kv) kernel factors as the (embed, heads * kv) matrix."""
  rng = np.random.default_rng(1)
  kernel = (0.05 * rng.standard_normal((160, 4, 36))).astype(np.float32)
  grads_list = [{"k": rng.standard_normal((160, 4, 36)).astype(np.float32)} for _ in range(3)]
  choose = logical_factor_dims({"k": ("embed", "heads", "kv")})
  got = run_optax(adafactor_jax.adafactor(factor_dims=choose), {"k": kernel}, grads_list)[0]["k"]
  expected = _reference_run(
    {"k": kernel.reshape(160, 144)},
    [{"k": g["k"].reshape(160, 144)} for g in grads_list],
    factor_axes=lambda shape: (0, 1),
  )["k"]
  np.testing.assert_allclose(got.reshape(160, 144), expected, rtol=2e-5, atol=1e-7)
  state = adafactor_jax.adafactor(factor_dims=choose).init({"k": kernel})[0]
  assert state.v_row["k"].shape == (160, 1, 1) and state.v_col["k"].shape == (1, 4, 36)


# --------------------------------------------------------------------------- state_shardings


def test_state_shardings_refuses_what_is_not_a_sharding():
  tx = adafactor_jax.adafactor()
  params = {"w": jnp.zeros((256, 256))}
  with pytest.raises(ValueError, match="param_shardings at 'w' must be a jax.sharding.Sharding"):
    adafactor_jax.state_shardings(tx, params=params, param_shardings={"w": P("data")})
  with pytest.raises(ValueError, match="no param_shardings for parameter"):
    adafactor_jax.state_shardings(tx, params=params, param_shardings={"v": jax.devices()[0]})


def test_state_shardings_on_one_device_place_everything_there():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = {"w": jax.ShapeDtypeStruct((256, 512), jnp.float32), "b": jnp.zeros(3)}
  tx = adafactor_jax.adafactor(momentum=0.9)
  shardings = adafactor_jax.state_shardings(
    tx, params=params, param_shardings={"w": device, "b": device}
  )
  assert jax.tree.structure(shardings) == jax.tree.structure(jax.eval_shape(tx.init, params))
  assert all(s.device_set == {jax.devices()[0]} for s in jax.tree.leaves(shardings))


# --------------------------------------------------------------------------- 8 simulated devices


@pytest.fixture(scope="module")
def on_eight_devices():
  """tests/sharded_checks.py's observations, one subprocess for all cases."""
  return run_check_script("sharded_checks.py")


CASES = [
  f"{mesh}-{kind}-{layout}"
  for mesh in ("2x4", "8x1")
  for kind in ("auto", "explicit")
  for layout in ("replicated", "model")
]


def _case(results, case):
  observed = results[case]
  assert "error" not in observed, observed.get("error")
  return observed


def _param_name(state_key: str) -> str:
  return state_key.rsplit("/", 1)[-1]


def _mesh_sizes(case: str) -> dict:
  rows, cols = (int(n) for n in case.split("-")[0].split("x"))
  return {"data": rows, "model": cols, None: 1}


def _canonical(spec: list, mesh_sizes: dict) -> list:
  """The spec with mesh axes of size 1 (no sharding at all) as None, trailing Nones dropped."""
  spec = [s if mesh_sizes[s] > 1 else None for s in spec]
  while spec and spec[-1] is None:
    spec.pop()
  return spec


@pytest.mark.parametrize("case", CASES)
def test_skip_nonfinite_under_jit_on_sharded_params(on_eight_devices, case):
  """A NaN in one shard skips the step on every device: params and state
  bit-identical, the count up by one, every array still where it was."""
  observed = _case(on_eight_devices, case)
  assert observed["skip_bit_identical"]
  assert observed["skipped_steps"] == 1
  assert observed["skip_shardings_kept"]


@pytest.mark.parametrize("case", CASES)
def test_update_and_apply_in_groups_on_sharded_params(on_eight_devices, case):
  """In groups, on the mesh: the plain step's parameters and state bit for bit, each array
  where the plain step puts it."""
  observed = _case(on_eight_devices, case)
  assert observed["ordered_bit_identical"]
  assert observed["ordered_shardings_kept"]


@pytest.mark.parametrize("case", CASES)
def test_state_follows_the_params_shardings(on_eight_devices, case):
  from tests.sharded_checks import LAYOUTS, SHAPES

  observed = _case(on_eight_devices, case)
  layout = LAYOUTS[case.rsplit("-", 1)[-1]]
  for key, spec in observed["init"].items():
    if key.endswith("count"):
      assert spec == [], key
      continue
    name = _param_name(key)
    param_spec, param_shape = list(layout[name]), SHAPES[name]
    shape = observed["shapes"][key]
    # Like the parameter, with each averaged (size-1) axis replicated.
    expected = [
      s if shape[i] == param_shape[i] else None
      for i, s in enumerate(param_spec + [None] * (len(param_shape) - len(param_spec)))
    ]
    mesh_sizes = _mesh_sizes(case)
    assert _canonical(spec, mesh_sizes) == _canonical(expected, mesh_sizes), (key, spec, expected)
  assert observed["predicted"] == observed["init"]
  assert observed["after_steps"] == observed["init"]
  # The factored statistics exist, per layer for the stack, joint over heads x kv.
  assert observed["shapes"]["0/v_row/stacked"] == [4, 256, 1]
  assert observed["shapes"]["0/v_col/attention"] == [1, 4, 64]
  assert "0/v/narrow" in observed["init"]


@pytest.mark.parametrize("case", CASES)
def test_16_2_init_on_sharded_shape_dtype_structs_places_the_state_as_jit_does(
  on_eight_devices, case
):
  """Equal to jax.jit(tx.init)'s, up to mesh axes of size 1 (which XLA drops)."""
  observed, mesh_sizes = _case(on_eight_devices, case), _mesh_sizes(case)
  assert observed["abstract_init"].keys() == observed["init"].keys()
  for key, spec in observed["abstract_init"].items():
    expected = observed["init"][key]
    assert _canonical(spec, mesh_sizes) == _canonical(expected, mesh_sizes), (key, spec, expected)


@pytest.mark.parametrize("case", CASES)
def test_per_device_state_bytes_are_what_the_shardings_imply(on_eight_devices, case):
  observed = _case(on_eight_devices, case)
  mesh_sizes = _mesh_sizes(case)
  expected = sum(
    4 * math.prod(-(-n // mesh_sizes[s]) for n, s in zip(shape, padded, strict=True))
    for key, shape in observed["shapes"].items()
    for spec in [observed["init"][key]]
    for padded in [spec + [None] * (len(shape) - len(spec))]
  )
  assert observed["state_bytes_device0"] == expected
  assert observed["state_bytes_device0"] == _expected_state_bytes(case)


# The axes each statistic averages over, by the logical names of sharded_checks.AXES:
# v_row averages the column axes, v_col the row axes; the others keep a full v.
_AVERAGED = {
  "kernel": {"v_row": (1,), "v_col": (0,)},
  "stacked": {"v_row": (2,), "v_col": (1,)},  # the layers axis is a batch axis
  "attention": {"v_row": (1, 2), "v_col": (0,)},  # embed x (heads, kv)
}


def _expected_state_bytes(case: str) -> int:
  """What device 0 should hold, from the parameters' shapes and layout alone: per parameter
  its float32 momentum and statistics, each axis divided by the mesh axis the layout gives
  the parameter's axis (an averaged axis, of size 1, is not divided), plus the int32 count."""
  from tests.sharded_checks import LAYOUTS, SHAPES

  sizes = _mesh_sizes(case)
  layout = LAYOUTS[case.rsplit("-", 1)[-1]]
  total = 4  # the count
  for name, shape in SHAPES.items():
    spec = list(layout[name]) + [None] * (len(shape) - len(layout[name]))
    statistics = _AVERAGED.get(name, {"v": ()})
    for averaged in [(), *statistics.values()]:  # the momentum, then the statistics
      kept = [
        1 if i in averaged else -(-n // sizes[s])
        for i, (n, s) in enumerate(zip(shape, spec, strict=True))
      ]
      total += 4 * math.prod(kept)
  return total


@pytest.mark.parametrize("case", CASES)
def test_sharded_steps_equal_the_single_device_steps(on_eight_devices, case):
  assert _case(on_eight_devices, case)["max_relative_error"] <= 1e-6


def _elements(result_type: str) -> list[int]:
  return [
    math.prod(int(n) for n in dims.split(",") if n)
    for dims in re.findall(r"\[([\d,]*)\]", result_type)
  ]


@pytest.mark.parametrize("case", CASES)
def test_the_update_communicates_statistics_and_scalars_only(on_eight_devices, case):
  from tests.sharded_checks import SHAPES

  observed = _case(on_eight_devices, case)
  ops = {op for op, _ in observed["collectives"]}
  if case.endswith("replicated"):
    assert ops == set()
    return
  assert ops == {"all-reduce"}, observed["collectives"]
  largest = max(n for _, result in observed["collectives"] for n in _elements(result))
  # The smallest matrix's shard on one device (256 x 512 / 8) is far larger
  # than any all-reduced value (row statistics with their weighted pair).
  smallest_shard = math.prod(SHAPES["kernel"]) // 8
  assert largest <= 2 * 4 * 256 < smallest_shard


@pytest.mark.parametrize("case", CASES)
def test_int8_momentum_and_its_block_scales_follow_the_params_shardings(on_eight_devices, case):
  """Values sharded exactly like their parameter; scales (the parameter's shape with the
  block axis, its longest, of size 1) like it but replicated along that axis. A block is a
  whole line, so no sharding cuts it: where the block axis is sharded, the update all-reduces
  the line maxima (int32 bits, the size of the scales), and never moves int8 values."""
  from adafactor_jax.momentum import block_axis, scale_shape
  from tests.sharded_checks import LAYOUTS, SHAPES

  observed, mesh_sizes = _case(on_eight_devices, case), _mesh_sizes(case)
  layout = LAYOUTS[case.rsplit("-", 1)[-1]]
  assert observed["int8_predicted"] == observed["int8_init"]
  for key, spec in observed["int8_init"].items():
    kind, name = key.split("/")
    shape = observed["int8_shapes"][key]
    expected = list(layout[name]) + [None] * (len(SHAPES[name]) - len(layout[name]))
    if kind == "momentum":
      assert shape == list(SHAPES[name])
    else:
      assert shape == list(scale_shape(SHAPES[name]))
      if SHAPES[name]:
        expected[block_axis(SHAPES[name])] = None
    expected = _canonical(expected, mesh_sizes)
    assert _canonical(spec, mesh_sizes) == expected, (key, spec, expected)
  ops = {op for op, _ in observed["int8_collectives"]}
  assert ops <= {"all-reduce"}, observed["int8_collectives"]
  assert not any("s8" in result for _, result in observed["int8_collectives"])
  largest_scales = max(math.prod(scale_shape(shape)) for shape in SHAPES.values())
  for _, result in observed["int8_collectives"]:
    if "s32" in result:
      assert max(_elements(result)) <= largest_scales, result


@pytest.mark.parametrize("case", CASES)
def test_sharded_int8_steps_equal_the_single_device_steps_but_rounding_ties(on_eight_devices, case):
  """Sharded sums round differently in float32; now and then a value on a rounding tie of the
  int8 grid goes the other way, one grid step (1/127 of its block's largest) of one element's
  momentum. Measured: 1.1e-5 of the largest parameter (float32 momentum: 6.5e-8)."""
  assert _case(on_eight_devices, case)["int8_max_relative_error"] <= 1e-4
