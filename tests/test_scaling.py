"""scale_by_parameter_scale (against the float64 reference of Section 8) and
scale_by_learning_rate (against optax's own)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import FactorAxes
from tests.conftest import assert_bit_identical, make_grads, make_params
from tests.reference import parameter_scale

STACKED = [("stacked", FactorAxes(row=(1,), col=(2,), batch=(0,)))]


def _params() -> dict[str, jax.Array]:
  """make_params (its 'bias' all zeros: the epsilon2 floor), with the four layers of
  'stacked' at scales 1e-4 (below the floor), 0.01, 1 and 30, and a negative scalar."""
  params = make_params()
  params["stacked"] = params["stacked"] * np.asarray([2e-3, 0.2, 20.0, 600.0])[:, None, None]
  params["scalar"] = np.float32(-2.0)
  return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _batch_axes(name: str, factor_dims) -> tuple[int, ...]:
  return (0,) if factor_dims and name == "stacked" else ()


@pytest.mark.parametrize("epsilon2", [1e-3, 0.0, 0.5])
@pytest.mark.parametrize("factor_dims", [None, STACKED], ids=["whole", "per slice"])
def test_scales_as_the_float64_reference(epsilon2, factor_dims):
  params = _params()
  updates = jax.tree.map(jnp.asarray, make_grads(params, 0))
  tx = adafactor_jax.scale_by_parameter_scale(epsilon2, factor_dims=factor_dims)
  scaled, state = jax.jit(tx.update)(updates, tx.init(params), params)
  for name, x in params.items():
    factor = parameter_scale(x, epsilon2, _batch_axes(name, factor_dims))
    expected = np.asarray(updates[name], np.float64) * factor
    assert scaled[name].dtype == jnp.float32
    np.testing.assert_allclose(scaled[name], expected, rtol=1e-6, atol=0, err_msg=name)
  # The all-zero bias moves by epsilon2 times its update: nothing with epsilon2 = 0.
  np.testing.assert_array_equal(scaled["bias"], epsilon2 * np.asarray(updates["bias"]))
  assert state == tx.init(params)  # stateless


def test_each_slice_takes_its_own_scale():
  params = _params()
  ones = {"stacked": jnp.ones_like(params["stacked"])}
  x = {"stacked": params["stacked"]}
  per_slice, _ = adafactor_jax.scale_by_parameter_scale(factor_dims=STACKED).update(ones, None, x)
  whole, _ = adafactor_jax.scale_by_parameter_scale().update(ones, None, x)
  factors = np.asarray(per_slice["stacked"])[:, 0, 0]
  np.testing.assert_allclose(factors, parameter_scale(x["stacked"], 1e-3, (0,)).ravel(), rtol=1e-6)
  assert factors[0] == np.float32(1e-3)  # the smallest layer is at the floor
  assert len(set(factors)) == 4
  assert len(set(np.asarray(whole["stacked"]).ravel())) == 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.complex64])
def test_low_precision_and_complex(dtype):
  """The scale is in float32 (the RMS of |X| for complex X); the update keeps its dtype."""
  rng = np.random.default_rng(4)
  x = 0.3 * rng.standard_normal((16, 24))
  u = rng.standard_normal((16, 24))
  if dtype == jnp.complex64:
    x, u = x + 0.4j * rng.standard_normal((16, 24)), u - 1j * rng.standard_normal((16, 24))
  x, u = jnp.asarray(x, dtype), jnp.asarray(u, dtype)
  tx = adafactor_jax.scale_by_parameter_scale()
  scaled, _ = jax.jit(tx.update)({"x": u}, tx.init({"x": x}), {"x": x})
  assert scaled["x"].dtype == dtype
  wide = np.complex128 if dtype == jnp.complex64 else np.float64
  expected = np.asarray(u, wide) * parameter_scale(np.asarray(x, wide), 1e-3)
  rtol = 1e-6 if dtype == jnp.complex64 else 2**-8
  np.testing.assert_allclose(np.asarray(scaled["x"], wide), expected, rtol=rtol)


def test_parameter_scale_telemetry_records_each_updates_scales_and_changes_no_bit():
  plain = adafactor_jax.scale_by_parameter_scale(factor_dims=STACKED)
  recorded = adafactor_jax.scale_by_parameter_scale(factor_dims=STACKED, telemetry=True)
  params = _params()
  state = recorded.init(params)
  for step in range(2):  # the parameters move, and the figures follow them
    params = jax.tree.map(lambda x, s=step: x * (1.0 + s), params)
    updates = jax.tree.map(jnp.asarray, make_grads(params, step))
    expected, _ = plain.update(updates, plain.init(params), params)
    scaled, state = jax.jit(recorded.update)(updates, state, params)
    assert_bit_identical(scaled, expected)
    figures = adafactor_jax.telemetry(state)
    for name, x in params.items():
      batch_axes = _batch_axes(name, STACKED)
      for i, scale in enumerate(parameter_scale(x, 1e-3, batch_axes).ravel()):
        where = f"{name}[{i}]" if batch_axes else name
        np.testing.assert_allclose(figures[f"{where}/parameter_scale"], scale, rtol=1e-6)


@pytest.mark.parametrize("learning_rate", [3e-3, optax.linear_schedule(1e-2, 1e-3, 4)])
@pytest.mark.parametrize("flip_sign", [True, False])
@pytest.mark.parametrize("telemetry", [False, True])
def test_scale_by_learning_rate_is_optax_bit_for_bit_and_records_the_step_size(
  learning_rate, flip_sign, telemetry
):
  ours = adafactor_jax.scale_by_learning_rate(
    learning_rate, flip_sign=flip_sign, telemetry=telemetry
  )
  theirs = optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign)
  params = jax.tree.map(jnp.asarray, make_params())
  ours_state, theirs_state = ours.init(params), theirs.init(params)
  for step in range(5):
    grads = jax.tree.map(jnp.asarray, make_grads(params, step))
    expected, theirs_state = theirs.update(grads, theirs_state, params)
    actual, ours_state = jax.jit(ours.update)(grads, ours_state, params)
    assert_bit_identical(actual, expected)
    if telemetry:
      step_size = float(learning_rate(step) if callable(learning_rate) else learning_rate)
      figures = adafactor_jax.telemetry(ours_state)
      assert figures == {"step_size": pytest.approx(step_size, rel=1e-7)}
    inner = ours_state.inner_state if telemetry else ours_state
    assert jax.tree.structure(inner) == jax.tree.structure(theirs_state)
    if jax.tree.leaves(theirs_state):  # a schedule's count
      assert_bit_identical(inner, theirs_state)
