"""Invalid hyperparameters and mismatched trees raise a ValueError naming the culprit."""

from __future__ import annotations

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import presets, schedules

NAN = float("nan")
INF = float("inf")


def _tree():
  """A small parameter tree with a factorable kernel, a bias and a scalar."""
  rng = np.random.default_rng(0)
  return {
    "dense": {
      "kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
      "bias": jnp.asarray(rng.standard_normal((3,)), jnp.float32),
    },
    "scale": jnp.asarray(1.5, jnp.float32),
  }


def _grads_like(tree, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def _raises(argument: str, *fragments: str):
  """pytest.raises(ValueError) whose message names `argument`, then `fragments`."""
  pattern = re.escape(argument) + "".join(".*" + re.escape(f) for f in fragments)
  return pytest.raises(ValueError, match=pattern)


# --------------------------------------------------------------------------
# adafactor(...) hyperparameters.


@pytest.mark.parametrize("value", [0, 0.0, -1, -1e-3])
def test_learning_rate_not_positive(value):
  with _raises("learning_rate", "must be in (0, inf", f"got {value!r}"):
    adafactor_jax.adafactor(learning_rate=value)


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_learning_rate_not_finite(value):
  with _raises("learning_rate", "must be in (0, inf"):
    adafactor_jax.adafactor(learning_rate=value)


@pytest.mark.parametrize("value", [np.array([0.1, 0.2]), "0.1", 1j])
def test_learning_rate_not_a_real_scalar(value):
  with _raises("learning_rate", "must be a real number or a schedule"):
    adafactor_jax.adafactor(learning_rate=value)


def test_infinite_value_message_does_not_claim_inf_is_valid():
  with pytest.raises(ValueError) as info:
    adafactor_jax.adafactor(learning_rate=INF)
  assert "inf]" not in str(info.value)


@pytest.mark.parametrize(
  "name, value, fragment",
  [
    ("decay_rate", NAN, "must be in (0, inf"),
    ("decay_offset", INF, "must be an integer"),
    ("clipping_threshold", NAN, "must be in (0, inf"),
    ("clipping_threshold", INF, "must be in (0, inf"),
    ("epsilon1", NAN, "must be in (0, inf"),
    ("epsilon2", INF, "must be in [0, inf"),
    ("momentum", NAN, "must be in [0, 1)"),
    ("beta2_cap", NAN, "must be in (0, 1]"),
    ("weight_decay_rate", NAN, "must be in [0, inf"),
    ("weight_decay_rate", INF, "must be in [0, inf"),
  ],
)
def test_non_finite_values(name, value, fragment):
  with _raises(name, fragment):
    adafactor_jax.adafactor(**{name: value})


@pytest.mark.parametrize("value", [0, 0.0, -1.0])
def test_clipping_threshold_not_positive(value):
  with _raises("clipping_threshold", "must be in (0, inf", "Pass None to turn clipping off"):
    adafactor_jax.adafactor(clipping_threshold=value)


@pytest.mark.parametrize(
  "argument, value, message",
  [
    ("min_dim_size_to_factor", 0, "must be in [1, inf"),
    ("min_dim_size_to_factor", -3, "must be in [1, inf"),
    ("min_dim_size_to_factor", 1.5, "must be an integer"),
    ("min_dim_size_to_factor", 127.9, "must be an integer"),
    ("decay_offset", -1, "must be in [0, inf"),
    ("decay_offset", -100, "must be in [0, inf"),
    ("decay_offset", 1.5, "must be an integer"),
    ("decay_offset", 0.5, "must be an integer"),
  ],
)
def test_integer_arguments(argument, value, message):
  with _raises(argument, message):
    adafactor_jax.adafactor(**{argument: value})


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_momentum_out_of_range(value):
  with _raises("momentum", "must be in [0, 1)", f"got {value!r}"):
    adafactor_jax.adafactor(momentum=value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0])
def test_decay_rate_not_positive(value):
  with _raises("decay_rate", "must be in (0, inf"):
    adafactor_jax.adafactor(decay_rate=value)


def test_negative_decay_rate_tells_to_pass_positive():
  with pytest.raises(ValueError) as info:
    adafactor_jax.adafactor(decay_rate=-0.8)
  message = str(info.value)
  assert "decay_rate" in message
  assert "-0.8" in message
  assert "pass 0.8" in message


@pytest.mark.parametrize("name", ["epsilon1", "epsilon2"])
@pytest.mark.parametrize("value", [-1e-30, -1.0])
def test_negative_epsilons(name, value):
  low = "(0, inf" if name == "epsilon1" else "[0, inf"
  with _raises(name, "must be in " + low):
    adafactor_jax.adafactor(**{name: value})


def test_epsilon1_zero():
  with _raises("epsilon1", "must be in (0, inf", "got 0"):
    adafactor_jax.adafactor(epsilon1=0.0)


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.5])
def test_beta2_cap_out_of_range(value):
  with _raises("beta2_cap", "must be in (0, 1]"):
    adafactor_jax.adafactor(beta2_cap=value)


@pytest.mark.parametrize("lr", [1e-3, 1.0, optax.constant_schedule(1e-3)])
def test_warmup_init_with_learning_rate(lr):
  with _raises("warmup_init=True", "learning_rate=None"):
    adafactor_jax.adafactor(learning_rate=lr, warmup_init=True)


@pytest.mark.parametrize("value", [-1e-4, -1])
def test_negative_weight_decay(value):
  with _raises("weight_decay_rate", "must be in [0, inf"):
    adafactor_jax.adafactor(weight_decay_rate=value)


@pytest.mark.parametrize("mask", [{"a": True}, lambda p: jax.tree.map(lambda _: True, p)])
def test_weight_decay_mask_without_weight_decay(mask):
  with _raises("weight_decay_mask", "weight_decay_rate is None"):
    adafactor_jax.adafactor(weight_decay_mask=mask)


# Every flag of adafactor, read from its signature, so that a new one is checked too.
FLAGS = [
  name
  for name, parameter in inspect.signature(adafactor_jax.adafactor).parameters.items()
  if parameter.annotation == "bool"
]


def test_the_flags_are_read_from_the_signature():
  assert {"factored", "maximize", "weight_decay_scaled_by_step", "telemetry"} <= set(FLAGS)


@pytest.mark.parametrize("name", FLAGS)
@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0])
def test_flags_must_be_bool(name, value):
  with _raises(name, "must be True or False"):
    adafactor_jax.adafactor(**{name: value})


@pytest.mark.parametrize("value", [np.bool_(True), np.bool_(False)])
def test_numpy_bools_accepted_as_flags(value):
  tx = adafactor_jax.adafactor(factored=value, skip_nonfinite=value)
  tree = _tree()
  updates, _ = tx.update(_grads_like(tree), tx.init(tree), tree)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
  "dtype", [jnp.int32, np.uint8, jnp.int16, "int32", "not-a-dtype", bool, jnp.complex64]
)
def test_momentum_dtype_not_float_or_int8(dtype):
  with _raises("momentum_dtype", "must be a floating dtype (float32, bfloat16, ...) or int8"):
    adafactor_jax.adafactor(momentum=0.9, momentum_dtype=dtype)


@pytest.mark.parametrize(
  "name",
  [
    "learning_rate",
    "clipping_threshold",
    "decay_rate",
    "decay_offset",
    "epsilon1",
    "epsilon2",
    "momentum",
    "beta2_cap",
    "weight_decay_rate",
    "min_dim_size_to_factor",
  ],
)
@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_bool_where_number_expected(name, value):
  with _raises(name, "must be a number", "bool"):
    adafactor_jax.adafactor(**{name: value})


@pytest.mark.parametrize(
  "kwargs",
  [
    {"momentum": 0.0},
    {"momentum": 0.999, "momentum_dtype": jnp.bfloat16},
    {"beta2_cap": 1.0},
    {"beta2_cap": 1e-6},
    {"epsilon2": 0.0},
    {"decay_offset": 5},
    {"decay_offset": 5.0},
    {"decay_offset": np.int64(5)},
    {"min_dim_size_to_factor": 1},
    {"min_dim_size_to_factor": 2.0},
    {"clipping_threshold": None},
    {"clipping_threshold": 1e-6},
    {"learning_rate": 1},
    {"learning_rate": np.float32(1e-2)},
    {"learning_rate": jnp.asarray(1e-2)},
    {"learning_rate": optax.linear_schedule(1e-3, 1e-2, 10)},
    {"learning_rate": schedules.rsqrt_decay(1.0, warmup_steps=3)},
    {"learning_rate": None, "warmup_init": True},
    {"weight_decay_rate": 0.0},
    {
      "weight_decay_rate": 1e-2,
      "weight_decay_mask": {"dense": {"kernel": True, "bias": False}, "scale": False},
    },
    {"weight_decay_rate": optax.constant_schedule(1e-3)},
    {"epsilon1": 1e-45},
    {"factored": False},
    {"multiply_by_parameter_scale": False},
  ],
)
def test_valid_edge_values_accepted(kwargs):
  tx = adafactor_jax.adafactor(**kwargs)
  tree = _tree()
  state = tx.init(tree)
  updates, state = jax.jit(tx.update)(_grads_like(tree), state, tree)
  updates, state = jax.jit(tx.update)(_grads_like(tree, 2), state, tree)
  for u in jax.tree.leaves(updates):
    assert np.all(np.isfinite(np.asarray(u, np.float32)))
  assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))


def test_momentum_zero_is_no_momentum():
  tree = _tree()
  grads = [_grads_like(tree, s) for s in range(3)]
  outs = []
  for kwargs in ({"momentum": 0.0}, {}):
    tx = adafactor_jax.adafactor(learning_rate=1e-2, **kwargs)
    state = tx.init(tree)
    for g in grads:
      updates, state = tx.update(g, state, tree)
    outs.append(updates)
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


# --------------------------------------------------------------------------
# Standalone transformations.


@pytest.mark.parametrize(
  "kwargs, name, fragment",
  [
    ({"decay_rate": 0.0}, "decay_rate", "(0, inf"),
    ({"decay_rate": -0.8}, "decay_rate", "pass 0.8"),
    ({"decay_rate": NAN}, "decay_rate", "(0, inf"),
    ({"decay_offset": -1}, "decay_offset", "[0, inf"),
    ({"decay_offset": 2.5}, "decay_offset", "integer"),
    ({"beta2_cap": 0.0}, "beta2_cap", "(0, 1]"),
    ({"beta2_cap": 1.01}, "beta2_cap", "(0, 1]"),
    ({"epsilon1": 0.0}, "epsilon1", "(0, inf"),
    ({"epsilon1": -1e-30}, "epsilon1", "(0, inf"),
    ({"factored": 1}, "factored", "True or False"),
    ({"factored": "yes"}, "factored", "True or False"),
    ({"min_dim_size_to_factor": 0}, "min_dim_size_to_factor", "[1, inf"),
    ({"min_dim_size_to_factor": 1.5}, "min_dim_size_to_factor", "integer"),
    ({"min_dim_size_to_factor": True}, "min_dim_size_to_factor", "bool"),
    ({"factor_dims": "kernel"}, "factor_dims", "callable"),
    ({"factor_dims": b"kernel"}, "factor_dims", "callable"),
    ({"factor_dims": 3}, "factor_dims", "callable"),
    ({"factor_dims": {"kernel": (0, 1)}.items()}, "factor_dims", "callable"),
  ],
)
def test_scale_by_factored_rms_validation(kwargs, name, fragment):
  with _raises(name, fragment):
    adafactor_jax.scale_by_factored_rms(**kwargs)


BAD_RULES = [
  ([("kernel", (0, 1), "extra")], "pairs"),
  ([("kernel",)], "pairs"),
  ([42], "pairs"),
  ([("kernel[", (0, 1))], "kernel["),
  ([(None, (0, 1))], "pairs"),
]


@pytest.mark.parametrize("rules, fragment", BAD_RULES)
def test_bad_factor_dims_rules_rejected_by_init(rules, fragment):
  try:
    tx = adafactor_jax.scale_by_factored_rms(factor_dims=rules)
  except ValueError as error:  # Rejecting them even earlier is fine too.
    assert "factor_dims" in str(error) and fragment in str(error)
    return
  with _raises("factor_dims rules", fragment):
    tx.init(_tree())


@pytest.mark.parametrize("rules, fragment", BAD_RULES)
def test_bad_factor_dims_rules_rejected_at_construction(rules, fragment):
  with _raises("factor_dims rules", fragment):
    adafactor_jax.scale_by_factored_rms(factor_dims=rules)


def test_t5x_validates_factor_dims():
  tree = _tree()
  with _raises("factor_dims rules", "pairs"):
    presets.t5x(factor_dims=[("kernel", (0, 1), 2)]).init(tree)
  with _raises("parameter 'dense/kernel'", "two different axes"):
    presets.t5x(factor_dims=[("kernel", (1, 1))]).init(tree)


@pytest.mark.parametrize(
  "factor_dims, fragment",
  [
    (lambda path, shape: (0, 2), "(0, 2)"),
    (lambda path, shape: (0, -3), "(0, -3)"),
    (lambda path, shape: (1, 1), "(1, 1)"),
    (lambda path, shape: (0, -2), "(0, -2)"),
    (lambda path, shape: (0, 1, 2), "pair of ints"),
    (lambda path, shape: "ab", "pair of ints"),
    (lambda path, shape: 0, "pair of ints"),
    ([("kernel$", (0, 5))], "(0, 5)"),
    ([("dense/kernel", (1, -1))], "(1, -1)"),
    ([("kernel", (0, "x"))], "pair of ints"),
  ],
)
def test_bad_factor_dims_name_the_parameter_at_init(factor_dims, fragment):
  def only_kernel(path, shape):
    return factor_dims(path, shape) if path == "dense/kernel" else None

  dims = only_kernel if callable(factor_dims) else factor_dims
  tx = adafactor_jax.scale_by_factored_rms(factor_dims=dims, min_dim_size_to_factor=1)
  with pytest.raises(ValueError, match=r"parameter 'dense/kernel'") as info:
    tx.init(_tree())
  assert fragment in str(info.value)


def test_good_factor_dims_accepted():
  seen = []

  def choose(path, shape):
    seen.append((path, shape))
    return (-1, 0) if len(shape) == 2 else None

  tx = adafactor_jax.scale_by_factored_rms(factor_dims=choose)
  state = tx.init(_tree())
  assert sorted(seen) == [("dense/bias", (3,)), ("dense/kernel", (4, 3)), ("scale", ())]
  assert state.v["dense"]["kernel"] is None  # factored
  # (row, col) = (1, 0): v_row averages over the column axis 0, v_col over axis 1.
  assert state.v_row["dense"]["kernel"].shape == (1, 3)
  assert state.v_col["dense"]["kernel"].shape == (4, 1)
  # update takes the choice from the state: the kernel's step is the factored one (for a
  # matrix the same whichever axis is the row), the others' the full second moment's.
  grads = jax.tree.map(lambda x: 2.0 * x + 0.5, _tree())
  updates, new_state = jax.jit(tx.update)(grads, state)
  assert jax.tree.map(jnp.shape, new_state) == jax.tree.map(jnp.shape, state)
  assert len(seen) == 3  # init chose; update did not ask again
  factored = adafactor_jax.scale_by_factored_rms(min_dim_size_to_factor=1)
  expected, _ = factored.update(grads, factored.init(_tree()))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)
  np.testing.assert_allclose(updates["dense"]["bias"], np.sign(grads["dense"]["bias"]), rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"learning_rate": "0.1"}, "learning_rate"),
    ({"learning_rate": NAN}, "learning_rate"),
    ({"learning_rate": 0.1, "flip_sign": 1}, "flip_sign"),
    ({"learning_rate": 0.1, "telemetry": None}, "telemetry"),
  ],
)
def test_scale_by_learning_rate_refuses_bad_arguments_by_name(kwargs, name):
  with _raises(name):
    adafactor_jax.scale_by_learning_rate(**kwargs)


@pytest.mark.parametrize("value", [0, 0.0, -1.0, NAN, INF, None, True, "1"])
def test_clip_by_update_rms_validation(value):
  with _raises("clipping_threshold"):
    adafactor_jax.clip_by_update_rms(value)


@pytest.mark.parametrize("value", [-1e-3, NAN, INF, None, True])
def test_scale_by_parameter_scale_validation(value):
  with _raises("epsilon2"):
    adafactor_jax.scale_by_parameter_scale(value)


def test_scale_by_parameter_scale_needs_params():
  tx = adafactor_jax.scale_by_parameter_scale()
  tree = _tree()
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads_like(tree), tx.init(tree))


@pytest.mark.parametrize("value", [0, 0.0, -1e-2, NAN, INF, True])
def test_relative_step_size_max_step_size(value):
  with _raises("max_step_size"):
    adafactor_jax.relative_step_size(max_step_size=value)


@pytest.mark.parametrize("value", [1, "yes", None])
def test_relative_step_size_warmup_init_bool(value):
  with _raises("warmup_init", "True or False"):
    adafactor_jax.relative_step_size(warmup_init=value)


@pytest.mark.parametrize(
  "kwargs, name, fragment",
  [
    ({"decay_rate": 0.0}, "decay_rate", "(0, inf"),
    ({"decay_rate": -0.8}, "decay_rate", "pass 0.8"),
    ({"decay_offset": -2}, "decay_offset", "[0, inf"),
    ({"decay_offset": 0.5}, "decay_offset", "integer"),
    ({"beta2_cap": 0.0}, "beta2_cap", "(0, 1]"),
    ({"beta2_cap": 2.0}, "beta2_cap", "(0, 1]"),
    ({"beta2_cap": True}, "beta2_cap", "bool"),
  ],
)
def test_decay_rate_pow_validation(kwargs, name, fragment):
  with _raises(name, fragment):
    adafactor_jax.decay_rate_pow(**kwargs)


@pytest.mark.parametrize(
  "kwargs, name, fragment",
  [
    ({"base_learning_rate": 0.0}, "base_learning_rate", "(0, inf"),
    ({"base_learning_rate": -1.0}, "base_learning_rate", "(0, inf"),
    ({"base_learning_rate": NAN}, "base_learning_rate", "(0, inf"),
    ({"warmup_steps": 0}, "warmup_steps", "[1, inf"),
    ({"warmup_steps": 1.5}, "warmup_steps", "integer"),
    ({"warmup_steps": -10}, "warmup_steps", "[1, inf"),
  ],
)
def test_rsqrt_decay_validation(kwargs, name, fragment):
  with _raises(name, fragment):
    schedules.rsqrt_decay(**kwargs)


def test_valid_schedules_accepted():
  assert math.isclose(float(adafactor_jax.relative_step_size(max_step_size=0.5)(0)), 0.5)
  assert float(adafactor_jax.decay_rate_pow(beta2_cap=1.0)(0)) == 0.0
  assert math.isclose(
    float(schedules.rsqrt_decay(1.0, warmup_steps=1)(3)), 1 / math.sqrt(3), rel_tol=1e-6
  )


# --------------------------------------------------------------------------
# Trees at update time.


def _missing(grads):
  del grads["dense"]["bias"]
  return grads


def _extra(grads):
  grads["dense"]["extra"] = jnp.zeros((2,), jnp.float32)
  return grads


def _wrong_shape(grads):
  grads["dense"]["kernel"] = grads["dense"]["kernel"].T
  return grads


def _broadcastable_shape(grads):
  grads["dense"]["kernel"] = grads["dense"]["kernel"][:1]
  return grads


def _scalar_shape(grads):
  grads["scale"] = jnp.ones((1,), jnp.float32)
  return grads


MISMATCHES = [
  (_missing, ["no gradient for parameter(s) 'dense/bias'"]),
  (_extra, ["gradient for unknown parameter(s) 'dense/extra'"]),
  (_wrong_shape, ["'dense/kernel'", "shape (3, 4)", "shape (4, 3)"]),
  (_broadcastable_shape, ["'dense/kernel'", "shape (1, 3)", "shape (4, 3)"]),
  (_scalar_shape, ["'scale'", "shape (1,)", "shape ()"]),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("min_dim", [1, 128], ids=["factored", "unfactored"])
@pytest.mark.parametrize("skip_nonfinite", [False, True])
@pytest.mark.parametrize("mutate, fragments", MISMATCHES, ids=lambda x: getattr(x, "__name__", ""))
def test_adafactor_tree_mismatch(mutate, fragments, min_dim, jit, skip_nonfinite):
  tx = adafactor_jax.adafactor(min_dim_size_to_factor=min_dim, skip_nonfinite=skip_nonfinite)
  tree = _tree()
  state = tx.init(tree)
  if min_dim == 1:
    factored_state = state.inner_state[0] if skip_nonfinite else state[0]
    assert factored_state.v["dense"]["kernel"] is None  # factored
  update = jax.jit(tx.update) if jit else tx.update
  grads = mutate(_grads_like(tree))
  with pytest.raises(ValueError) as info:
    update(grads, state, tree)
  for fragment in fragments:
    assert fragment in str(info.value)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("mutate, fragments", MISMATCHES, ids=lambda x: getattr(x, "__name__", ""))
def test_scale_by_parameter_scale_tree_mismatch(mutate, fragments, jit):
  tx = adafactor_jax.scale_by_parameter_scale()
  tree = _tree()
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(ValueError) as info:
    update(mutate(_grads_like(tree)), tx.init(tree), tree)
  for fragment in fragments:
    assert fragment in str(info.value)


def test_container_type_mismatch():
  tx = adafactor_jax.adafactor()
  tree = {"0": jnp.ones((3,)), "1": jnp.ones((2,))}
  grads = [jnp.ones((3,)), jnp.ones((2,))]
  with pytest.raises(ValueError, match="structure"):
    tx.update(grads, tx.init(tree), tree)


def test_root_array_mismatch_is_named():
  tx = adafactor_jax.adafactor()
  param = jnp.ones((4, 3))
  with pytest.raises(ValueError, match=re.escape("parameter '<root>' has shape (3, 4)")):
    tx.update(jnp.ones((3, 4)), tx.init(param), param)


# --------------------------------------------------------------------------
# Presets.


@pytest.mark.parametrize("value", [0.8, 0.0, 1.0])
def test_hf_transformers_positive_decay_rate(value):
  with _raises("decay_rate", "negative exponent", "0.8"):
    presets.hf_transformers(decay_rate=value)


def test_hf_transformers_lr_with_relative_step():
  with _raises("lr", "relative_step=True"):
    presets.hf_transformers(lr=1e-3)
  with _raises("lr", "relative_step=True"):
    presets.hf_transformers(lr=1e-3, relative_step=True)


def test_hf_transformers_no_lr_without_relative_step():
  with _raises("lr is required", "relative_step=False"):
    presets.hf_transformers(relative_step=False)


def test_hf_transformers_warmup_init_without_relative_step():
  with _raises("warmup_init=True", "relative_step=True"):
    presets.hf_transformers(lr=1e-3, relative_step=False, warmup_init=True)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"eps": (0.0, 1e-3)}, "eps[0]"),
    ({"eps": (1e-30, -1.0)}, "eps[1]"),
    ({"eps": 1e-30}, "eps must be a pair"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"beta1": 1.0}, "beta1"),
    ({"decay_rate": NAN}, "decay_rate"),
  ],
)
def test_hf_transformers_other_invalid_values(kwargs, name):
  with _raises(name):
    presets.hf_transformers(**kwargs)


@pytest.mark.parametrize("lr", [0.0, -1e-3, NAN])
def test_hf_transformers_invalid_lr(lr):
  with _raises("lr"):
    presets.hf_transformers(lr=lr, relative_step=False)


def test_hf_transformers_negative_weight_decay():
  with _raises("weight_decay"):
    presets.hf_transformers(weight_decay=-0.1)


@pytest.mark.parametrize("value", [0.8, 0.0])
def test_torch_adafactor_positive_beta2_decay(value):
  with _raises("beta2_decay", "negative exponent", "decay_rate=0.8"):
    presets.torch_adafactor(beta2_decay=value)


@pytest.mark.parametrize(
  "kwargs, name",
  [
    ({"d": 0.0}, "d must be"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"eps": (None, -1e-3)}, "eps[1]"),
    ({"eps": (0.0, 1e-3)}, "eps[0]"),
  ],
)
def test_torch_adafactor_other_invalid_values(kwargs, name):
  with _raises(name):
    presets.torch_adafactor(**kwargs)


def test_torch_adafactor_lr_error_names_lr():
  with pytest.raises(ValueError, match=r"^lr must be in \(0, inf\)"):
    presets.torch_adafactor(lr=0.0)


def test_t5x_and_paper_validate():
  with _raises("learning_rate", "(0, inf"):
    presets.t5x(learning_rate=-1.0)
  with _raises("momentum", "[0, 1)"):
    presets.t5x(momentum=1.0)
  with _raises("decay_rate", "pass 0.8"):
    presets.paper(decay_rate=-0.8)
  with pytest.raises(TypeError):
    presets.paper(not_an_argument=1)


def test_valid_presets_build_and_step():
  tree = _tree()
  for tx in (
    presets.paper(),
    presets.t5x(),
    presets.big_vision(learning_rate=1e-3),
    presets.hf_transformers(),
    presets.hf_transformers(lr=1e-3, relative_step=False, beta1=0.9, weight_decay=0.01),
    presets.torch_adafactor(),
  ):
    updates, _ = tx.update(_grads_like(tree), tx.init(tree), tree)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_a_state_made_for_other_params_is_named_not_the_gradient():
  """tx.init ran on (300, 130) params, the step gets (256, 130) params and gradients: the
  message names the state and what it was made for, not a wrong gradient."""
  tx = adafactor_jax.adafactor()
  state = tx.init({"w": jnp.zeros((300, 130))})
  params = {"w": jnp.ones((256, 130))}
  with _raises("'w' has shape (256, 130)", "state was made (by tx.init)", "(300, 130)"):
    tx.update(params, state, params)
  with _raises("'w' has shape (130, 256)", "the parameter has shape (256, 130)"):
    tx.update({"w": jnp.ones((130, 256))}, tx.init(params), params)
