"""The relative step size and the decay schedules, as optax schedules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from adafactor_jax import schedules


@pytest.mark.parametrize("count", [0, 1, 3, 99, 9_999, 10_000, 1_000_000])
def test_relative_step_size(count):
  t = count + 1
  np.testing.assert_allclose(schedules.relative_step_size()(count), min(1e-2, t**-0.5), rtol=1e-6)
  np.testing.assert_allclose(
    schedules.relative_step_size(warmup_init=True)(count), min(1e-6 * t, t**-0.5), rtol=1e-6
  )
  np.testing.assert_allclose(
    schedules.relative_step_size(max_step_size=0.5)(count), min(0.5, t**-0.5), rtol=1e-6
  )


@pytest.mark.parametrize("count", [0, 1, 2, 10, 1000, 10**6])
def test_decay_rate_pow(count):
  t = count + 1
  np.testing.assert_allclose(schedules.decay_rate_pow()(count), 1 - t**-0.8, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    schedules.decay_rate_pow(0.5, beta2_cap=0.9)(count), min(0.9, 1 - t**-0.5), rtol=1e-6
  )
  offset = schedules.decay_rate_pow(decay_offset=100)(count)
  np.testing.assert_allclose(offset, 1 - max(t - 100, 1) ** -0.8, rtol=1e-6, atol=1e-7)
  assert np.isfinite(offset)


def test_first_step_has_no_memory():
  assert float(schedules.decay_rate_pow()(0)) == 0.0


def test_rsqrt_decay():
  schedule = schedules.rsqrt_decay()
  np.testing.assert_allclose(schedule(0), 0.01, rtol=1e-6)
  np.testing.assert_allclose(schedule(10_000), 0.01, rtol=1e-6)
  np.testing.assert_allclose(schedule(40_000), 0.005, rtol=1e-6)


def test_schedules_plug_into_optax_and_jit():
  tx = optax.scale_by_learning_rate(schedules.relative_step_size(), flip_sign=False)
  state = tx.init(jnp.zeros(3))
  update = jax.jit(tx.update)
  for count in range(4):
    updates, state = update(jnp.ones(3), state)
    np.testing.assert_allclose(updates, min(1e-2, (count + 1) ** -0.5), rtol=1e-6)
  beta2 = jax.jit(schedules.decay_rate_pow())(jnp.asarray(3))
  np.testing.assert_allclose(beta2, 1 - 4**-0.8, rtol=1e-6)
