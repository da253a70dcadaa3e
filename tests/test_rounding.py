"""Stochastic rounding of bfloat16 and float16 parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import stochastic_round, stochastic_rounding
from tests.conftest import assert_bit_identical, bits, changed

LOW = [jnp.bfloat16, jnp.float16]


def _neighbours(x32, dtype):
  """The two values of ``dtype`` around each float32 value (equal when exact)."""
  nearest = x32.astype(dtype)
  up = jnp.nextafter(nearest, jnp.asarray(jnp.inf, dtype))
  down = jnp.nextafter(nearest, jnp.asarray(-jnp.inf, dtype))
  below = jnp.where(nearest.astype(jnp.float32) <= x32, nearest, down)
  above = jnp.where(nearest.astype(jnp.float32) >= x32, nearest, up)
  return np.asarray(below, np.float64), np.asarray(above, np.float64)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.__name__)
def test_stochastic_round_picks_a_neighbour_with_the_unbiased_probability(dtype):
  n = 200_000
  # 1 + 2^-10 lies 1/8 of the way from 1 to the next value up in bfloat16 (and
  # is exact in float16, whose spacing at 1 is 2^-10: it must stay put).
  x = jnp.full((n,), 1.0 + 2**-10, jnp.float32)
  rounded = np.asarray(stochastic_round(x, dtype=dtype, key=jax.random.PRNGKey(0)), np.float64)
  below, above = _neighbours(x, dtype)
  assert np.all((rounded == below) | (rounded == above))
  fraction_up = float(np.mean(rounded == above) if above[0] != below[0] else 0.0)
  expected = (1.0 + 2**-10 - below[0]) / (above[0] - below[0]) if above[0] != below[0] else 0.0
  if dtype == jnp.bfloat16:
    assert expected == 1 / 8
  # Binomial(n, p): 5 standard deviations.
  assert abs(fraction_up - expected) <= 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12

  # Random values over many binades: always a neighbour, and the mean error is
  # the binomial noise of each element's rounding, not round-to-nearest's
  # spread of errors.
  rng = np.random.default_rng(1)
  values = rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)
  x = jnp.asarray(values, jnp.float32)
  rounded = np.asarray(stochastic_round(x, dtype=dtype, key=jax.random.PRNGKey(1)), np.float64)
  below, above = _neighbours(x, dtype)
  assert np.all((rounded == below) | (rounded == above))
  x64 = np.asarray(x, np.float64)
  p_up = np.where(above > below, (x64 - below) / np.where(above > below, above - below, 1), 0)
  np.testing.assert_allclose(np.mean(rounded == above), np.mean(p_up), atol=5 / np.sqrt(n))
  # Relative errors: E = 0 with variance p(1-p)(gap/x)², summed over elements.
  gap = (above - below) / np.abs(x64)
  sigma = np.sqrt(np.sum(p_up * (1 - p_up) * gap**2)) / n
  assert abs(np.mean((rounded - x64) / np.abs(x64))) <= 5 * sigma


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.__name__)
def test_stochastic_round_keeps_exact_values_and_non_finite_ones(dtype):
  exact = jnp.asarray([0.0, -0.0, 1.0, -2.5, 0.25, 3.0], jnp.float32)
  rounded = stochastic_round(exact, dtype=dtype, key=jax.random.PRNGKey(0))
  assert rounded.dtype == dtype
  np.testing.assert_array_equal(np.asarray(rounded, np.float32), np.asarray(exact))
  assert np.array_equal(np.signbit(np.asarray(rounded, np.float32)), np.signbit(exact))
  special = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 1e38, -1e38], jnp.float32)
  rounded = np.asarray(
    stochastic_round(special, dtype=dtype, key=jax.random.PRNGKey(0)), np.float32
  )
  np.testing.assert_array_equal(rounded, np.asarray(special.astype(dtype), np.float32))


def _train(tx, params, steps, grad_fn):
  @jax.jit
  def step(params, state, i):
    updates, state = tx.update(grad_fn(params, i), state, params)
    return optax.apply_updates(params, updates), state, updates

  state = tx.init(params)
  for i in range(steps):
    params, state, updates = step(params, state, i)
  return params, state, updates


def _grad_fn(params, i):
  return jax.tree.map(
    lambda p: (jax.random.normal(jax.random.PRNGKey(i), p.shape) + 0.5).astype(p.dtype), params
  )


def _params(dtype):
  rng = np.random.default_rng(0)
  return {
    "kernel": jnp.asarray(rng.standard_normal((160, 130)), dtype),
    "bias": jnp.asarray(rng.standard_normal(130) * 0.1, dtype),
    "scalar": jnp.asarray(1.0, dtype),
  }


def test_rounding_is_deterministic_given_the_seed_and_varies_with_it():
  params = _params(jnp.bfloat16)

  def run(seed):
    tx = adafactor_jax.adafactor(stochastic_rounding=True, rounding_seed=seed)
    return _train(tx, params, 5, _grad_fn)[:2]

  (a, state_a), (b, state_b), (c, _) = run(7), run(7), run(8)
  assert_bit_identical((a, state_a), (b, state_b))
  assert not np.array_equal(bits(a["kernel"]), bits(c["kernel"]))
  (rounding,) = [s for s in state_a if isinstance(s, adafactor_jax.StochasticRoundingState)]
  assert rounding.key.dtype == jnp.uint32 and rounding.key.shape == (2,)


def test_each_update_lands_on_a_neighbour_of_the_float32_step():
  """X + U' is one of the two low-precision values around X + U (U from the
  same optimizer without rounding), never further, for every element."""
  params = _params(jnp.bfloat16)
  plain = adafactor_jax.adafactor()
  rounded = adafactor_jax.adafactor(stochastic_rounding=True, rounding_seed=1)
  grads = _grad_fn(params, 0)
  updates, _ = plain.update(grads, plain.init(params), params)
  sr_updates, _ = rounded.update(grads, rounded.init(params), params)
  new = optax.apply_updates(params, sr_updates)
  moved_up = moved_down = 0
  for name, p in params.items():
    assert updates[name].dtype == jnp.bfloat16
    # float32: the difference of two bfloat16 values need not be one.
    assert sr_updates[name].dtype == jnp.float32
    target = p.astype(jnp.float32) + updates[name].astype(jnp.float32)
    below, above = _neighbours(target, jnp.bfloat16)
    value = np.asarray(new[name], np.float64)
    assert np.all((value == below) | (value == above)), name
    nearest = np.asarray(target.astype(jnp.bfloat16), np.float64)
    moved_up += int(np.sum((value == above) & (value != nearest)))
    moved_down += int(np.sum((value == below) & (value != nearest)))
  # Some elements went the other way from round to nearest: the rounding is live.
  assert moved_up > 100 and moved_down > 100


def test_float32_parameters_are_untouched():
  params = _params(jnp.float32)
  plain = _train(adafactor_jax.adafactor(), params, 3, _grad_fn)
  rounded = _train(adafactor_jax.adafactor(stochastic_rounding=True), params, 3, _grad_fn)
  assert_bit_identical(rounded[0], plain[0])


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: d.__name__)
def test_small_updates_move_parameters_in_expectation(dtype):
  """Steps of 1e-3 on parameters at 1: round to nearest drops every one of them
  (half the spacing at 1 is 2^-8 in bfloat16, 2^-11 in float16 is below 1e-3
  but 1 + 1e-3 still rounds to 1 + 2^-10 there), stochastic rounding adds
  them up in expectation."""
  params = {"w": jnp.ones((4096,), dtype)}
  steps, lr = 200, 1e-3 if dtype == jnp.bfloat16 else 2e-4
  grad_fn = lambda p, i: {"w": -jnp.ones_like(p["w"])}  # noqa: E731
  plain, _, _ = _train(optax.sgd(lr), params, steps, grad_fn)
  rounded, _, _ = _train(optax.chain(optax.sgd(lr), stochastic_rounding(0)), params, steps, grad_fn)
  exact = 1.0 + steps * lr
  assert float(plain["w"][0]) == 1.0
  mean = float(np.mean(np.asarray(rounded["w"], np.float64)))
  spacing = float(jnp.finfo(dtype).eps)
  # Each element is a sum of `steps` unbiased roundings, each with variance at
  # most spacing²/4; 4096 elements.
  assert abs(mean - exact) <= 5 * np.sqrt(steps * spacing**2 / 4 / 4096) + spacing * 0.5


def test_skipped_step_leaves_key_and_params_bit_identical():
  params = _params(jnp.bfloat16)
  tx = adafactor_jax.adafactor(skip_nonfinite=True, stochastic_rounding=True)
  state = tx.init(params)
  grads = _grad_fn(params, 0)
  grads["kernel"] = grads["kernel"].at[3, 4].set(jnp.nan)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  new_params = optax.apply_updates(params, updates)
  assert_bit_identical((new_params, new_state.inner_state), (params, state.inner_state))
  assert int(new_state.skipped_steps) == 1


def test_inside_multisteps_rounds_once_per_emitted_step():
  params = _params(jnp.bfloat16)
  inner = adafactor_jax.adafactor(stochastic_rounding=True, rounding_seed=2)
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  state, p = tx.init(params), params
  for i, emits in enumerate([False, True]):
    updates, state = jax.jit(tx.update)(_grad_fn(params, i), state, p)
    p = optax.apply_updates(p, updates)
    assert changed(p, params) == emits
  rounding = [s for s in state.inner_opt_state if isinstance(s, type(inner.init(params)[-1]))]
  one_step = inner.update(_grad_fn(params, 0), inner.init(params), params)[1][-1]
  assert np.array_equal(rounding[0].key, one_step.key)


@pytest.mark.parametrize(
  "kwargs, fragment",
  [
    ({"stochastic_rounding": 1}, "stochastic_rounding must be True or False"),
    ({"stochastic_rounding": True, "rounding_seed": 1.5}, "rounding_seed must be an integer"),
    ({"stochastic_rounding": True, "rounding_seed": "0"}, "rounding_seed must be"),
  ],
)
def test_bad_arguments_are_named(kwargs, fragment):
  with pytest.raises(ValueError, match=fragment):
    adafactor_jax.adafactor(**kwargs)


def test_transformation_errors_name_the_problem():
  with pytest.raises(ValueError, match="seed must be an integer"):
    stochastic_rounding(0.5)
  tx = stochastic_rounding(0)
  params = {"w": jnp.ones((3,), jnp.bfloat16)}
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="'v'"):
    tx.update({"v": params["w"]}, tx.init(params), params)
