"""Presets reproduce the other systems' semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import presets, schedules
from tests.conftest import (
  make_grads,
  make_params,
  relative_error,
  run_accumulating_float64,
  run_optax,
)
from tests.reference import Options, Reference, StableAdamW

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


def _stable_adamw_case(steps: int = 8) -> tuple[dict, list[dict]]:
  """A scalar, a vector and a matrix whose gradients' scale jumps from step to step (so that
  the second moment lags behind some of them), and a vector whose gradient is always zero
  (Adam's second moment stays 0: the eps^2 floor keeps the RMS finite)."""
  rng = np.random.default_rng(3)
  params = {
    "scalar": np.asarray(0.7, np.float32),
    "vector": rng.normal(size=(7,)).astype(np.float32),
    "matrix": rng.normal(size=(5, 3)).astype(np.float32),
    "unused": rng.normal(size=(6,)).astype(np.float32),
  }
  grads = []
  for step in range(steps):
    scale = 10.0 ** rng.uniform(-2, 1) * (30.0 if step == 4 else 1.0)
    grads.append(
      {k: (scale * rng.normal(size=p.shape)).astype(np.float32) for k, p in params.items()}
    )
    grads[-1]["unused"][:] = 0.0
  return params, grads


def test_stable_adamw_is_algorithm_1_of_wortsman_et_al():
  """Step by step against the float64 reference of the paper's algorithm (its bias correction
  written into the decay rates), with weight decay and a schedule: each step's movement of
  each tensor to 1e-5 of its size. The clipping fires on every tensor with a gradient at some
  steps and not at others, so both branches are compared."""
  schedule = optax.linear_schedule(1e-2, 1e-3, 8)
  params, grads = _stable_adamw_case()
  tx = presets.stable_adamw(schedule, weight_decay=0.1)
  reference = StableAdamW(params, schedule, weight_decay=0.1)
  state = tx.init(jax.tree.map(jnp.asarray, params))
  update = jax.jit(tx.update)
  denominators = []
  for g in grads:
    current = {k: jnp.asarray(v, jnp.float32) for k, v in reference.params.items()}
    updates, state = update(jax.tree.map(jnp.asarray, g), state, current)
    start = dict(reference.params)
    reference.step(g)
    denominators.append(dict(reference.denominators))
    for name, x in start.items():
      expected = reference.params[name] - x
      error = np.linalg.norm(np.asarray(updates[name], np.float64) - expected)
      assert error < 1e-5 * np.linalg.norm(expected), (name, len(denominators), denominators)
  clipped = {name for step in denominators for name, d in step.items() if d > 1}
  assert clipped == {"scalar", "vector", "matrix"}, denominators
  assert sum(d > 1 for step in denominators for d in step.values()) < 3 * len(grads)


def test_stable_adamw_divides_adamws_step_by_the_rms_of_the_preconditioned_gradient():
  """Five equal gradients (g/sqrt(v-hat) = 1: no clipping, the same state as optax.adamw's),
  then one 10x larger: its update is optax.adamw's, weight decay included, divided by
  RMS(g / sqrt(v-hat)) computed here in float64 from Adam's averages."""
  b2, wd, lr = 0.99, 0.1, 1e-2
  x = jnp.asarray(np.linspace(-1.0, 1.0, 12), jnp.float32)
  g = jnp.asarray(np.linspace(0.5, 2.0, 12), jnp.float32)
  stable, adamw = (
    presets.stable_adamw(lr, b2=b2, weight_decay=wd),
    optax.adamw(lr, b2=b2, weight_decay=wd),
  )
  stable_state, adamw_state = stable.init(x), adamw.init(x)
  for grad in [g] * 5 + [10 * g]:
    stable_update, stable_state = stable.update(grad, stable_state, x)
    adamw_update, adamw_state = adamw.update(grad, adamw_state, x)
  g64 = np.asarray(g, np.float64)
  nu = sum((1 - b2) * b2 ** (5 - s) * g64**2 for s in range(5)) + (1 - b2) * (10 * g64) ** 2
  rms = np.sqrt(np.mean((10 * g64) ** 2 / (nu / (1 - b2**6))))
  assert rms > 2  # v-hat holds a sixth of the 100x larger square: RMS 2.36
  np.testing.assert_allclose(stable_update, np.asarray(adamw_update) / rms, rtol=1e-5)


def test_stable_adamw_refuses_bad_arguments():
  for kwargs, name in (
    ({"b2": 1.0}, "b2"),
    ({"eps": 0.0}, "eps"),
    ({"clipping_threshold": 0.0}, "clipping_threshold"),
    ({"weight_decay": -0.1}, "weight_decay"),
  ):
    with pytest.raises(ValueError, match=name):
      presets.stable_adamw(1e-3, **kwargs)
