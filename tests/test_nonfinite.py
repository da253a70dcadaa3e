"""skip_nonfinite: a step with a NaN or an Inf leaves everything bit-identical."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax.nonfinite import all_finite
from tests.conftest import (
  assert_bit_identical,
  assert_tree_allclose,
  make_grads,
  make_params,
  run_accumulating_float64,
)
from tests.reference import Options, Reference


def _nonfinite_params():
  rng = np.random.default_rng(0)
  b = rng.standard_normal(130).astype(np.float32)
  b[:5] = -0.0
  return {
    "w": jnp.asarray(rng.standard_normal((140, 130)) * 0.1, jnp.float32),
    "b": jnp.asarray(b),
    "neg_zero": jnp.asarray(-0.0, jnp.float32),
    "h": jnp.asarray(rng.standard_normal((3, 4)), jnp.bfloat16),
  }


def _nonfinite_grads(seed, poison=None):
  rng = np.random.default_rng(seed)
  grads = {
    "w": rng.standard_normal((140, 130)).astype(np.float32),
    "b": rng.standard_normal(130).astype(np.float32),
    "neg_zero": np.float32(rng.standard_normal()),
    "h": rng.standard_normal((3, 4)).astype(np.float32),
  }
  if poison is not None:
    grads["w"][3, 7] = poison
  grads = {k: jnp.asarray(v) for k, v in grads.items()}
  grads["h"] = grads["h"].astype(jnp.bfloat16)
  return grads


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_skip_nonfinite_is_bit_exact(jit):
  kwargs = {"momentum": 0.9, "weight_decay_rate": 1e-3}
  tx = adafactor_jax.adafactor(skip_nonfinite=True, **kwargs)
  plain = adafactor_jax.adafactor(**kwargs)

  def step(tx):
    def fn(p, s, g):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, u

    return jax.jit(fn) if jit else fn

  run, plain_run = step(tx), step(plain)
  params = _nonfinite_params()
  state = tx.init(params)
  assert isinstance(state, adafactor_jax.SkipNonfiniteState)
  assert int(state.skipped_steps) == 0
  plain_params, plain_state = params, plain.init(params)

  def poisoned_step(params, state, seed, poison, skipped):
    new_params, new_state, updates = run(params, state, _nonfinite_grads(seed, poison))
    assert_bit_identical(new_params, params)
    assert_bit_identical(new_state.inner_state, state.inner_state)
    assert int(new_state.skipped_steps) == skipped
    # Every update is -0.0, the additive identity.
    for u in jax.tree.leaves(updates):
      assert np.all(np.asarray(u) == 0) and np.all(np.signbit(np.asarray(u)))
    return new_params, new_state

  # Bad steps first, while some parameters still hold -0.0.
  params, state = poisoned_step(params, state, 10, np.nan, 1)
  params, state = poisoned_step(params, state, 11, np.inf, 2)
  assert np.signbit(np.asarray(params["neg_zero"])) and float(params["neg_zero"]) == 0
  assert np.all(np.signbit(np.asarray(params["b"])[:5]))
  assert int(state.inner_state[0].count) == 0

  for i in range(2):
    params, state, _ = run(params, state, _nonfinite_grads(i))
    plain_params, plain_state, _ = plain_run(plain_params, plain_state, _nonfinite_grads(i))
  assert int(state.skipped_steps) == 2
  params, state = poisoned_step(params, state, 12, -np.inf, 3)

  # The next finite step proceeds as if the bad steps never happened.
  params, state, _ = run(params, state, _nonfinite_grads(2))
  plain_params, plain_state, _ = plain_run(plain_params, plain_state, _nonfinite_grads(2))
  assert_tree_allclose(params, plain_params, rtol=1e-6, atol=0)
  assert_tree_allclose(state.inner_state, plain_state, rtol=1e-6, atol=0)
  assert int(state.skipped_steps) == 3
  assert int(state.inner_state[0].count) == 3


def test_skip_nonfinite_off_propagates_nan():
  tx = adafactor_jax.adafactor()
  params = _nonfinite_params()
  updates, state = tx.update(_nonfinite_grads(0, np.nan), tx.init(params), params)
  assert np.any(np.isnan(np.asarray(updates["w"])))
  assert np.any(np.isnan(np.asarray(state[0].v_row["w"])))


def test_skip_nonfinite_inside_multisteps():
  params = {k: v for k, v in _nonfinite_params().items() if k in ("w", "h")}
  tx = optax.MultiSteps(adafactor_jax.adafactor(skip_nonfinite=True), every_k_schedule=2)
  plain = adafactor_jax.adafactor()

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  def grads(seed, poison=None):
    g = _nonfinite_grads(seed, poison)
    return {"w": g["w"], "h": g["h"]}

  state = tx.init(params)
  start_params, start_inner = params, state.inner_opt_state
  params, state = step(params, state, grads(0))
  params, state = step(params, state, grads(1, np.nan))  # the window's mean is NaN
  assert_bit_identical(params, start_params)
  assert_bit_identical(state.inner_opt_state.inner_state, start_inner.inner_state)
  assert int(state.inner_opt_state.skipped_steps) == 1
  assert int(state.gradient_step) == 1
  # optax.MultiSteps resets its accumulator as (1 - emit) * acc, which keeps a
  # NaN: the following windows are non-finite too, and stay skipped bit-exactly.
  assert any(np.any(np.isnan(a)) for a in jax.tree.leaves(state.acc_grads))
  params, state = step(params, state, grads(2))
  params, state = step(params, state, grads(3))
  assert_bit_identical(params, start_params)
  assert_bit_identical(state.inner_opt_state.inner_state, start_inner.inner_state)
  assert int(state.inner_opt_state.skipped_steps) == 2

  # With the accumulator cleared, a finite window proceeds normally.
  state = state._replace(acc_grads=jax.tree.map(jnp.zeros_like, state.acc_grads))
  params, state = step(params, state, grads(4))
  assert_bit_identical(params, start_params)
  params, state = step(params, state, grads(5))
  mean = jax.tree.map(
    lambda a, b: ((a.astype(jnp.float32) + b.astype(jnp.float32)) / 2).astype(a.dtype),
    grads(4),
    grads(5),
  )
  ref_updates, _ = plain.update(mean, plain.init(start_params), start_params)
  expected = optax.apply_updates(start_params, ref_updates)
  assert np.any(np.asarray(params["w"]) != np.asarray(start_params["w"]))
  assert_tree_allclose(params["w"], expected["w"], rtol=1e-5, atol=1e-7)
  assert_tree_allclose(params["h"], expected["h"], rtol=2**-7, atol=2**-7)
  assert int(state.inner_opt_state.skipped_steps) == 2
  assert int(state.inner_opt_state.inner_state[0].count) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, jnp.complex64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_element_in_any_leaf(dtype, bad):
  tree = {"a": jnp.ones((3, 4), dtype), "b": (jnp.zeros(5, dtype), None), "i": jnp.arange(3)}
  assert bool(all_finite(tree))
  for leaf, index in (("a", (2, 3)), ("b", 4)):
    poisoned = jax.tree.map(np.array, tree)
    target = poisoned[leaf] if leaf == "a" else poisoned[leaf][0]
    target[index] = bad * (1j if dtype == jnp.complex64 else 1)  # complex: the imaginary part
    assert not bool(jax.jit(all_finite)(poisoned)), (leaf, index)
  assert bool(all_finite({})) and bool(all_finite({"empty": jnp.zeros((0, 3))}))


def test_skipped_steps_follow_the_float64_reference():
  """Eight steps, three of them poisoned: the parameters, the step count and the decay
  schedule follow the reference, which skips those steps as if they never came."""
  options = Options(skip_nonfinite=True, momentum=0.9, weight_decay_rate=1e-3)
  params = make_params()
  grads = [make_grads(params, step) for step in range(8)]
  for step, bad in ((1, np.nan), (4, np.inf), (5, -np.inf)):
    grads[step]["conv"][0, 1, 2, 3] = bad
  reference = Reference(options, params)
  for g in grads:
    reference.step(g)
  tx = adafactor_jax.adafactor(skip_nonfinite=True, momentum=0.9, weight_decay_rate=1e-3)
  actual, state = run_accumulating_float64(tx, params, grads)
  assert reference.skipped == int(state.skipped_steps) == 3
  assert int(state.inner_state[0].count) == reference.t == 5
  for name, x in reference.params.items():
    movement = np.linalg.norm(x - params[name])
    assert np.linalg.norm(actual[name] - x) < 1e-5 * movement, name


def test_wraps_any_transformation_and_leaves_its_finite_steps_alone():
  """Around optax.adam: finite steps are adam's own, bit for bit; a NaN step returns -0.0
  updates and adam's state as it was."""
  params = jax.tree.map(jnp.asarray, make_params())
  adam = optax.adam(1e-2)
  guarded = adafactor_jax.skip_nonfinite(adam)
  state, plain_state = guarded.init(params), adam.init(params)
  assert_bit_identical(state.inner_state, plain_state)
  for step in range(3):
    grads = jax.tree.map(jnp.asarray, make_grads(params, step))
    if step == 1:
      bad = {**grads, "bias": grads["bias"].at[7].set(jnp.nan)}
      updates, new_state = jax.jit(guarded.update)(bad, state, params)
      assert_bit_identical(new_state.inner_state, state.inner_state)
      assert int(new_state.skipped_steps) == 1
      assert_bit_identical(updates, jax.tree.map(lambda g: jnp.full_like(g, -0.0), grads))
      state = new_state
    updates, state = jax.jit(guarded.update)(grads, state, params)
    expected, plain_state = jax.jit(adam.update)(grads, plain_state, params)
    assert_bit_identical(updates, expected)
    assert_bit_identical(state.inner_state, plain_state)
  assert int(state.skipped_steps) == 1
