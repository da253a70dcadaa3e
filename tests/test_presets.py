"""Presets reproduce the other systems' semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adafactor_jax
from adafactor_jax import presets, schedules
from tests.conftest import (
  make_grads,
  make_params,
  relative_error,
  run_accumulating_float64,
  run_optax,
)
from tests.reference import Options, Reference

STEPS = 6


def _last_two(shape):
  return (len(shape) - 2, len(shape) - 1) if len(shape) >= 2 else None


def _compare_with_reference(tx, options: Options, tolerance=1e-5):
  params = make_params()
  grads = [make_grads(params, step) for step in range(STEPS)]
  reference = Reference(options, params)
  for g in grads:
    reference.step(g)
  actual, _ = run_accumulating_float64(tx, params, grads)
  errors = relative_error(actual, reference.params, params)
  assert max(errors.values()) < tolerance, errors


def test_paper_is_algorithm_6_and_takes_overrides():
  _compare_with_reference(presets.paper(), Options())
  _compare_with_reference(presets.paper(momentum=0.5), Options(momentum=0.5))


def test_t5x_uses_the_rsqrt_schedule():
  schedule = schedules.rsqrt_decay(warmup_steps=3)
  _compare_with_reference(presets.t5x(learning_rate=schedule), Options(learning_rate=schedule))
  default = presets.t5x()  # 1/sqrt(max(step, 10k)) = 0.01 for the first 10k steps
  _compare_with_reference(default, Options(learning_rate=0.01))


def test_big_vision_matches_the_optax_chain_it_describes():
  learning_rate = optax.cosine_decay_schedule(1e-3, 10)

  def capped(step, exponent):
    return jnp.minimum(0.999, 1.0 - (jnp.asarray(step, jnp.float32) + 1.0) ** -exponent)

  expected_tx = optax.chain(
    optax.scale_by_factored_rms(min_dim_size_to_factor=32, decay_rate_fn=capped),
    optax.ema(0.9, debias=False, accumulator_dtype=jnp.float32),
    optax.scale_by_learning_rate(learning_rate),
  )
  params = make_params()
  grads = [make_grads(params, step) for step in range(STEPS)]
  expected, _ = run_optax(expected_tx, params, grads)
  actual, _ = run_optax(
    presets.big_vision(learning_rate, momentum_dtype=jnp.float32), params, grads
  )
  assert max(relative_error(actual, expected, params).values()) < 1e-6
  # The default keeps momentum in bfloat16, and factors at 32.
  state = presets.big_vision(1e-3).init({"w": jnp.zeros((64, 40))})
  assert state[1].momentum["w"].dtype == jnp.bfloat16
  assert state[0].v["w"] is None and state[0].v_row["w"].shape == (64, 1)
  # factor_dims chooses the axes, as for scale_by_factored_rms: here by logical names.
  names = adafactor_jax.logical_factor_dims({"w": ("mlp", "embed")}, min_dim_size_to_factor=32)
  state = presets.big_vision(1e-3, factor_dims=names).init({"w": jnp.zeros((64, 40))})
  assert state[0].v_row["w"].shape == (1, 40) and state[0].v_col["w"].shape == (64, 1)


def test_hf_transformers_defaults_and_absolute_lr():
  _compare_with_reference(
    presets.hf_transformers(), Options(min_dim_size_to_factor=1, factor_axes=_last_two)
  )
  _compare_with_reference(
    presets.hf_transformers(lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9),
    Options(
      learning_rate=1e-3,
      multiply_by_parameter_scale=False,
      momentum=0.9,
      factor_axes=_last_two,
    ),
  )


def test_hf_weight_decay_is_scaled_by_the_full_step_size():
  x = jnp.asarray(np.linspace(-1.0, 1.0, 12, dtype=np.float32))
  g = jnp.full((12,), 0.5, jnp.float32)
  tx = presets.hf_transformers(weight_decay=0.1)
  updates, _ = tx.update(g, tx.init(x), x)
  # HF, step 1: U = G/sqrt(G² + ε1) = 1 (clipping inactive), α = 1e-2 · RMS(x);
  # x ← x(1 - λα) - αU.
  alpha = 1e-2 * float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))
  expected = -0.1 * alpha * np.asarray(x) - alpha
  np.testing.assert_allclose(updates, expected, rtol=1e-5)


def test_torch_adafactor():
  eps = float(jnp.finfo(jnp.float32).eps)
  _compare_with_reference(
    presets.torch_adafactor(),
    Options(epsilon1=eps**2, min_dim_size_to_factor=1, factor_axes=_last_two),
  )
  x = jnp.ones((4,), jnp.float32)
  tx = presets.torch_adafactor(lr=1e-2, weight_decay=0.5)
  updates, _ = jax.jit(tx.update)(jnp.ones(4), tx.init(x), x)
  # torch: x ← x(1 - lr λ) - min(lr, 1)·max(1e-3, RMS(x))·U, with U = 1.
  np.testing.assert_allclose(updates, -(1e-2 * 0.5) - 1e-2, rtol=1e-5)
