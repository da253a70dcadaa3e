"""int8 momentum: block-wise quantization against float64, the update as stored, state and
temporary bytes, and the wrappers bf16 momentum works under (skip_nonfinite, inject_hyperparams,
warm starts); Orbax is in test_checkpointing.py, sharding in test_sharding.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import momentum as momentum_lib
from benchmarks import run, trees
from tests.conftest import (
  assert_bit_identical,
  make_grads,
  make_params,
  relative_error,
  run_accumulating_float64,
  run_optax,
  the_node,
)
from tests.reference import Options, Reference, int8_block_axis

# A grid step of int8 is 1/127 of its block's largest magnitude: float32 noise of ~1e-7
# in the update now and then lands a value on the other side of a rounding boundary, one
# step (0.8% of the block's largest value) on that element; where that element becomes
# its block's largest a step later, the grid of its whole line (160 elements of the conv
# kernel) moves with it. Measured over 12 steps: 3.6e-4 (blocks of 32, before: 8.1e-5;
# bf16: 5.4e-5), against 1.1e-2 for the unrounded reference.
INT8_STORAGE_TOLERANCE = 5e-4


def _float64_quantized(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(q, scale, 127 m / max|m|) per line along the longest axis (the later on a tie; a
  scalar alone), in float64; q rounded to nearest even."""
  m = np.asarray(m, np.float64)
  axis = int8_block_axis(m.shape)
  absmax = np.abs(m) if axis is None else np.max(np.abs(m), axis, keepdims=True)
  with np.errstate(invalid="ignore", divide="ignore"):
    ratio = np.where(absmax > 0, 127 * m / absmax, 0.0)
  return np.round(ratio), absmax / 127, ratio


def _assert_quantized_as_float64(q, scale, m64) -> None:
  """q and scale are the float64 quantization of m64, but where 127 m / max|m| is within
  float32 noise of a rounding tie, which either neighbour may take."""
  q_ref, scale_ref, ratio = _float64_quantized(m64)
  np.testing.assert_allclose(np.asarray(scale), scale_ref, rtol=2e-7, atol=0)
  q = np.asarray(q, np.float64)
  at_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 3e-5  # float32 noise: 127 * 2e-7
  assert np.all(np.abs(q - q_ref) <= at_tie), np.argwhere(np.abs(q - q_ref) > at_tie)[:5]
  assert np.sum(at_tie) <= 1 + 1e-3 * at_tie.size  # the exemption is rare


SHAPES = {
  "rows": (5, 96),  # a block per row
  "columns": (70, 8),  # a block per column
  "square": (6, 6),  # the later axis on a tie: a block per row
  "stacked": (3, 40, 7),  # along the middle axis
  "vector": (64,),
  "scalar": (),
}


def _updates(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in SHAPES.items():
    x = rng.standard_normal(shape).astype(np.float32)
    if len(shape) >= 2:  # blocks a thousandfold apart, and an all-zero one
      axis = int8_block_axis(shape)
      across = [n if i != axis else 1 for i, n in enumerate(shape)]
      x *= 10.0 ** rng.integers(-3, 1, size=across)
      np.moveaxis(x, axis, -1)[(0,) * (len(shape) - 1)] = 0.0
    out[name] = x
  return out


def test_state_holds_int8_values_and_a_float32_scale_per_block():
  tx = adafactor_jax.ema_momentum(0.9, momentum_dtype=jnp.int8)
  state = tx.init(_updates(0))
  assert {k: v.dtype for k, v in state.momentum.items()} == dict.fromkeys(SHAPES, jnp.int8)
  assert {k: v.shape for k, v in state.scale.items()} == {
    "rows": (5, 1),
    "columns": (1, 8),
    "square": (6, 1),
    "stacked": (3, 1, 7),
    "vector": (1,),
    "scalar": (),
  }
  assert all(v.dtype == jnp.float32 for v in state.scale.values())
  assert isinstance(state, adafactor_jax.Int8MomentumState)
  bf16 = adafactor_jax.ema_momentum(0.9, momentum_dtype=jnp.bfloat16).init({})
  # Unchanged by int8 (one field), so that checkpoints written before it still restore.
  assert isinstance(bf16, adafactor_jax.EmaMomentumState)
  assert adafactor_jax.EmaMomentumState._fields == ("momentum",)


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_each_step_is_the_float64_quantized_ema_and_the_update_is_the_stored_momentum(decay):
  """Step by step from the library's own stored state: M = Q(beta M_prev + (1 - beta) U)
  with Q the float64 block quantization, and the update is q * scale bit for bit."""
  tx = adafactor_jax.ema_momentum(decay, momentum_dtype=jnp.int8)
  update = jax.jit(tx.update)
  state = tx.init(_updates(0))
  for step in range(6):
    u = _updates(step + 1)
    previous = {
      k: np.asarray(momentum_lib.dequantize(state.momentum[k], state.scale[k]), np.float64)
      for k in SHAPES
    }
    out, state = update(u, state)
    for k in SHAPES:
      expected = decay * previous[k] + (1 - decay) * u[k].astype(np.float64)
      _assert_quantized_as_float64(state.momentum[k], state.scale[k], expected)
      stored = np.asarray(momentum_lib.dequantize(state.momentum[k], state.scale[k]))
      assert np.array_equal(np.asarray(out[k]), stored)
    for k in ("rows", "columns", "stacked"):  # the zero block stays 0
      assert np.sum(np.asarray(state.scale[k]) == 0) == 1
      zero = np.asarray(momentum_lib.dequantize(state.momentum[k], state.scale[k])) == 0
      assert np.sum(np.all(zero, int8_block_axis(SHAPES[k]))) == 1


@pytest.mark.parametrize("name", ["rows", "columns", "stacked"])
def test_every_element_is_within_half_a_grid_step_and_the_largest_is_exact(name):
  u = _updates(3)
  tx = adafactor_jax.ema_momentum(0.0, momentum_dtype=jnp.int8)
  _, state = tx.update(u, tx.init(u))
  x, q, scale = u[name], np.asarray(state.momentum[name]), np.asarray(state.scale[name])
  stored = np.asarray(momentum_lib.dequantize(q, scale))
  assert np.all(np.abs(stored - x) <= 0.5 * scale * (1 + 1e-6))
  largest = np.max(np.abs(q), int8_block_axis(SHAPES[name]))
  assert np.sum(largest == 127) == largest.size - 1 and np.sum(largest == 0) == 1


def test_adafactor_with_int8_momentum_matches_the_float64_reference():
  """tests/reference.py with int8 storage (a block per line along the longest axis, round
  to nearest) over 12 steps."""
  params = make_params()
  grads = [make_grads(params, step) for step in range(12)]
  kwargs = {"momentum": 0.9}
  reference = Reference(Options(**kwargs, momentum_dtype="int8"), params)
  unrounded = Reference(Options(**kwargs), params)
  exact_grid = Reference(Options(**kwargs, momentum_dtype="int8", int8_exact_maxima=True), params)
  clipped = 0
  for g in grads:
    reference.step(g)
    unrounded.step(g)
    exact_grid.step(g)
    clipped += sum(f["clipping_denominator"] > 1.01 for f in reference.figures.values())
  assert clipped >= 12  # the chord bound is above the maxima where the update is clipped
  tx = adafactor_jax.adafactor(**kwargs, momentum_dtype=jnp.int8)
  actual, _ = run_accumulating_float64(tx, params, grads)
  errors = relative_error(actual, reference.params, params)
  assert max(errors.values()) < INT8_STORAGE_TOLERANCE, errors
  # The int8 rounding is visible: the float32-momentum reference is much further off.
  rounding = relative_error(actual, unrounded.params, params)
  assert max(rounding.values()) > 10 * INT8_STORAGE_TOLERANCE, rounding
  # Its grid is the chord bound's: on the lines' exact maxima the step lands elsewhere.
  exact_errors = relative_error(actual, exact_grid.params, params)
  assert min(exact_errors.values()) > 5 * INT8_STORAGE_TOLERANCE, exact_errors
  # The transformations chained by hand quantize on the exact maxima (no deferred clipping).
  by_hand = optax.chain(
    adafactor_jax.scale_by_factored_rms(clipping_threshold=1.0),
    adafactor_jax.scale_by_learning_rate(adafactor_jax.relative_step_size(), flip_sign=False),
    adafactor_jax.scale_by_parameter_scale(),
    adafactor_jax.ema_momentum(0.9, momentum_dtype=jnp.int8),
    optax.scale(-1.0),
  )
  chained, _ = run_accumulating_float64(by_hand, params, grads)
  errors = relative_error(chained, exact_grid.params, params)
  assert max(errors.values()) < INT8_STORAGE_TOLERANCE, errors


def test_the_chord_bound_is_above_each_lines_maximum_and_exact_without_clipping():
  """chord_bound against max|M_t| per line in float64: never below it, equal at a
  denominator of 1, and for noise-like updates within the simulated 1%, 8%, 20% on average
  at denominators 1.1, 2 and 5."""
  rng = np.random.default_rng(0)
  shape, decay = (64, 512), 0.9
  m = rng.standard_normal(shape).astype(np.float32)
  q, scale = (np.asarray(a) for a in momentum_lib.quantize(jnp.asarray(m * 1e-3)))
  old = q.astype(np.float64) * scale.astype(np.float64)
  for denominator, mean_excess in ((1.0, 0.0), (1.1, 0.01), (2.0, 0.08), (5.0, 0.2)):
    unclipped = rng.standard_normal(shape).astype(np.float32) * 1e-3 * denominator
    bound = np.asarray(
      momentum_lib.chord_bound(
        momentum_lib.dequantize(jnp.asarray(q), jnp.asarray(scale)),
        jnp.asarray(unclipped),
        jnp.float32(denominator),
        decay,
      ),
      np.float64,
    )
    exact = np.max(np.abs(decay * old + (1 - decay) * unclipped / denominator), 1, keepdims=True)
    assert np.all(bound >= exact * (1 - 1e-6)), denominator
    excess = np.mean(bound / exact) - 1
    if denominator == 1.0:
      np.testing.assert_allclose(bound, exact, rtol=1e-6)
    else:
      assert 0 < excess < 2 * mean_excess, (denominator, excess)


def test_parameters_move_by_the_momentum_as_stored():
  params = jax.tree.map(jnp.asarray, make_params())
  tx = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8)
  state = tx.init(params)
  for step in range(3):
    updates, state = jax.jit(tx.update)(make_grads(params, step), state, params)
    momentum = the_node(state, adafactor_jax.Int8MomentumState)
    stored = jax.tree.map(momentum_lib.dequantize, momentum.momentum, momentum.scale)
    assert_bit_identical(updates, jax.tree.map(jnp.negative, stored), f"step {step}")
    params = optax.apply_updates(params, updates)


def test_nonfinite_gradients_propagate_and_skip_nonfinite_leaves_everything_bit_identical():
  params = jax.tree.map(jnp.asarray, make_params())
  grads = make_grads(params, 0)
  poisoned = make_grads(params, 1)
  poisoned["kernel"][5, 7] = np.nan
  plain = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8)
  after, _ = run_optax(plain, params, [grads, poisoned])
  assert np.isnan(np.asarray(after["kernel"])[5, 7])  # not lost in the int8 cast
  skipping = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8, skip_nonfinite=True)
  params_1, state_1 = run_optax(skipping, params, [grads])
  step = jax.jit(lambda p, s, g: skipping.update(g, s, p))
  updates, state_2 = step(params_1, state_1, poisoned)
  assert_bit_identical(state_2.inner_state, state_1.inner_state, "state after a skipped step")
  assert_bit_identical(optax.apply_updates(params_1, updates), params_1, "params")
  assert int(state_2.skipped_steps) == 1


def test_under_inject_hyperparams_a_dtype_instance_needs_no_static_args():
  params = jax.tree.map(jnp.asarray, make_params())
  grads = make_grads(params, 0)
  plain = adafactor_jax.adafactor(1e-2, momentum=0.9, momentum_dtype=jnp.int8)
  _, expected = jax.jit(plain.update)(grads, plain.init(params), params)
  injected = optax.inject_hyperparams(adafactor_jax.adafactor)
  static = optax.inject_hyperparams(adafactor_jax.adafactor, static_args=("momentum_dtype",))
  results = []
  for tx in (
    injected(1e-2, momentum=0.9, momentum_dtype=np.dtype("int8")),
    injected(1e-2, momentum=0.9, momentum_dtype="int8"),
    static(1e-2, momentum=0.9, momentum_dtype=jnp.int8),
    # The class is callable, so taken for a schedule; its value on the count is an int8 0.
    injected(1e-2, momentum=0.9, momentum_dtype=jnp.int8),
  ):
    state = jax.jit(tx.init)(params)
    results.append(jax.jit(tx.update)(grads, state, params))
  for updates, state in results[1:]:
    assert_bit_identical(updates, results[0][0], "the ways to pass int8")
    assert_bit_identical(
      the_node(state, adafactor_jax.Int8MomentumState),
      the_node(results[0][1], adafactor_jax.Int8MomentumState),
      "their momentum",
    )
  # The injected learning rate is a traced value, not a constant: float32 rounding moves an
  # element across a rounding boundary now and then, by one step of its grid.
  for q, q_plain in zip(
    jax.tree.leaves(the_node(results[0][1], adafactor_jax.Int8MomentumState).momentum),
    jax.tree.leaves(the_node(expected, adafactor_jax.Int8MomentumState).momentum),
    strict=True,
  ):
    difference = np.abs(np.asarray(q, np.int32) - np.asarray(q_plain, np.int32))
    assert difference.max() <= 1 and np.mean(difference) < 1e-4


def test_complex_params_are_refused_by_name():
  tx = adafactor_jax.adafactor(learning_rate=1e-2, momentum=0.9, momentum_dtype=jnp.int8)
  params = {"real": jnp.zeros(3), "layer": {"z": jnp.zeros(3, jnp.complex64)}}
  with pytest.raises(ValueError, match="int8 has no complex counterpart.*'layer/z'"):
    tx.init(params)


# --------------------------------------------------------------------------- bytes


def _state_bytes(tx, shapes) -> dict[str, int]:
  state = jax.eval_shape(tx.init, shapes)
  momentum = the_node(state, adafactor_jax.Int8MomentumState)
  return {
    "values": trees.tree_bytes(momentum.momentum),
    "scales": trees.tree_bytes(momentum.scale),
    "all": trees.tree_bytes(state),
  }


@pytest.mark.parametrize("name", list(trees.TREES))
def test_momentum_state_is_an_eighth_of_adamws_plus_the_scales(name):
  shapes = trees.TREES[name]()
  count = trees.param_count(shapes)
  int8 = _state_bytes(adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8), shapes)
  adamw = trees.tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, shapes))
  assert int8["values"] == count <= adamw / 8
  # A float32 scale per line along each parameter's longest axis: at most 3%.
  expected = sum(4 * math.prod(momentum_lib.scale_shape(x.shape)) for x in jax.tree.leaves(shapes))
  assert int8["scales"] == expected <= 0.03 * count
  statistics = trees.tree_bytes(jax.eval_shape(adafactor_jax.adafactor().init, shapes))
  assert int8["all"] == statistics + int8["values"] + int8["scales"]


def _unfactored_bytes(shapes) -> int:
  """float32 bytes of the parameters the default rule gives a full second moment."""
  state = jax.eval_shape(adafactor_jax.adafactor().init, shapes)[0]
  return trees.tree_bytes(state.v)


@pytest.mark.parametrize(
  "name", [pytest.param(n, marks=[] if n == "stacked" else pytest.mark.slow) for n in trees.TREES]
)
def test_int8_step_on_xla_cpu_stores_no_float32_momentum(name):
  """XLA:CPU's temporaries of the donated step: bf16 momentum's, plus the chunk maxima of the
  line maxima (1/8 byte per element at most, on lines of a multiple of 32) and the new
  scales, plus, for a parameter with a full second moment, U itself. M_t is computed twice,
  for the line bounds and for the values, and stored in neither: measured 1.8% (T5-small),
  2.8% (GPT-2, stacked) of the parameters' float32 bytes above bf16 momentum's (with each
  line's exact maximum, until 2026-12-07, XLA:CPU stored M_t: 94-103%). No copy of the old
  buffer."""
  shapes = trees.TREES[name]()
  temps = {}
  for dtype in (jnp.bfloat16, jnp.int8):
    compiled = run.compile_step(
      adafactor_jax.adafactor(1e-2, momentum=0.9, momentum_dtype=dtype), shapes
    )
    temps[dtype] = run.temp_bytes(compiled)
  if temps[jnp.int8] is None:
    pytest.skip("this backend has no memory analysis")
  scales = _state_bytes(adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8), shapes)
  extra = temps[jnp.int8] - temps[jnp.bfloat16]
  chunk_maxima = trees.tree_bytes(shapes) / 32
  limit = chunk_maxima + scales["scales"] + _unfactored_bytes(shapes)
  assert extra <= limit, (extra, limit)
