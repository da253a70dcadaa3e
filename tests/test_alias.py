"""adafactor(): parity with the float64 reference, with optax, and under jit."""

from __future__ import annotations

import ast
import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from tests.conftest import (
  OPTAX_CASES,
  make_grads,
  make_params,
  relative_error,
  run_accumulating_float64,
  run_optax,
)
from tests.reference import Options, Reference

STEPS = 12
TOLERANCE = 1e-5  # relative to the total parameter movement
# A bfloat16 momentum buffer has a relative resolution of 2**-8: float32 noise
# of ~1e-7 in the update occasionally lands it on the other side of a rounding
# boundary, a one-ulp (0.4%) change of that element. No float32 implementation
# can stay closer than that to a float64 reference; measured: 3.1e-5.
BF16_STORAGE_TOLERANCE = 1e-4
# Every relative error measured, so the largest can be reported.
MEASURED: dict[str, float] = {}

WD_MASK = {"bias": False, "kernel": True, "narrow": True, "stacked": True, "conv": False}

CASES = {
  "paper defaults": {},
  "absolute lr": {"learning_rate": 1e-2},
  "absolute lr, no parameter scale": {
    "learning_rate": 1e-3,
    "multiply_by_parameter_scale": False,
  },
  "lr schedule": {"learning_rate": optax.linear_schedule(1e-2, 1e-3, STEPS)},
  "decay_rate 0.5": {"decay_rate": 0.5},
  "decay_offset 4": {"decay_offset": 4},
  "beta2_cap 0.6": {"beta2_cap": 0.6},
  "no clipping": {"clipping_threshold": None},
  "tight clipping": {"clipping_threshold": 0.3},
  "epsilons": {"epsilon1": 1e-3, "epsilon2": 0.1},
  "warmup_init": {"warmup_init": True},
  "momentum": {"momentum": 0.9},
  "momentum bf16": {"momentum": 0.9, "momentum_dtype": jnp.bfloat16},
  "weight decay": {"weight_decay_rate": 1e-2},
  "masked weight decay schedule": {
    "weight_decay_rate": optax.linear_schedule(1e-2, 0.0, STEPS),
    "weight_decay_mask": WD_MASK,
  },
  "not factored": {"factored": False},
  "min dim 16": {"min_dim_size_to_factor": 16},
  "min dim 1": {"min_dim_size_to_factor": 1},
  "skip_nonfinite": {"skip_nonfinite": True},
}


def _grads_list(params, with_nonfinite: bool):
  grads = [make_grads(params, step) for step in range(STEPS)]
  if with_nonfinite:
    grads[3]["kernel"][5, 7] = np.nan
    grads[7]["conv"][0, 1, 2, 3] = np.inf
  return grads


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
  kwargs = CASES[name]
  params = make_params()
  grads = _grads_list(params, kwargs.get("skip_nonfinite", False))
  options = dict(kwargs)
  if "momentum_dtype" in options:
    options["momentum_dtype"] = jnp.dtype(options["momentum_dtype"]).name
  reference = Reference(Options(**options), params)
  for g in grads:
    reference.step(g)

  actual, _ = run_accumulating_float64(adafactor_jax.adafactor(**kwargs), params, grads)

  errors = relative_error(actual, reference.params, params)
  MEASURED.update({f"{name}/{leaf}": e for leaf, e in errors.items()})
  tolerance = BF16_STORAGE_TOLERANCE if "momentum_dtype" in kwargs else TOLERANCE
  assert max(errors.values()) < tolerance, errors
  # The error is relative to the movement, so every leaf must have moved.
  for leaf in params:
    assert np.any(actual[leaf] != params[leaf]), leaf


def test_report_largest_reference_error():
  """Prints the largest error measured above (run after the parity cases)."""
  if not MEASURED:
    pytest.skip("run together with test_matches_float64_reference")
  float32_only = {k: v for k, v in MEASURED.items() if "bf16" not in k}
  bf16 = {k: v for k, v in MEASURED.items() if "bf16" in k}
  for label, errors, tolerance in (
    ("float32 state", float32_only, TOLERANCE),
    ("bf16 momentum", bf16, BF16_STORAGE_TOLERANCE),
  ):
    if errors:
      worst = max(errors, key=errors.get)
      print(
        f"\nlargest relative error vs float64 reference, {label}: {errors[worst]:.3g} ({worst})"
      )
      assert errors[worst] < tolerance


_OPTAX_NAMES = {"momentum_dtype": "dtype_momentum"}


@pytest.mark.parametrize("name", list(OPTAX_CASES))
def test_matches_optax_adafactor_with_a_float_learning_rate(name):
  kwargs = {"learning_rate": 1e-2, **OPTAX_CASES[name]}
  optax_kwargs = {_OPTAX_NAMES.get(k, k): v for k, v in kwargs.items()}
  params = make_params()
  grads = _grads_list(params, False)
  expected, _ = run_optax(optax.adafactor(**optax_kwargs), params, grads)
  actual, _ = run_optax(adafactor_jax.adafactor(**kwargs), params, grads)
  errors = relative_error(actual, expected, params)
  assert max(errors.values()) < 1e-6, errors


def test_jit_and_no_jit_agree():
  params = make_params()
  grads = _grads_list(params, False)[:4]
  tx = adafactor_jax.adafactor(momentum=0.9, weight_decay_rate=1e-3)
  jitted, jitted_state = run_accumulating_float64(tx, params, grads, jit=True)
  eager, eager_state = run_accumulating_float64(tx, params, grads, jit=False)
  errors = relative_error(jitted, eager, params)
  assert max(errors.values()) < 1e-6, errors
  for a, b in zip(jax.tree.leaves(jitted_state), jax.tree.leaves(eager_state), strict=True):
    assert a.dtype == b.dtype
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(a - b) <= 1e-6 * np.linalg.norm(b)


def test_signature_is_exactly_the_documented_one():
  expected = {
    "learning_rate": None,
    "decay_rate": 0.8,
    "decay_offset": 0,
    "beta2_cap": None,
    "clipping_threshold": 1.0,
    "multiply_by_parameter_scale": True,
    "epsilon1": 1e-30,
    "epsilon2": 1e-3,
    "warmup_init": False,
    "momentum": None,
    "momentum_dtype": jnp.float32,
    "weight_decay_rate": None,
    "weight_decay_mask": None,
    "factored": True,
    "min_dim_size_to_factor": None,  # 128; None stays static under optax.inject_hyperparams
    "skip_nonfinite": False,
    "factor_dims": None,
    "stochastic_rounding": False,
    "rounding_seed": 0,
    "weight_decay_scaled_by_step": False,
    "maximize": False,
    "telemetry": False,
  }
  signature = inspect.signature(adafactor_jax.adafactor)
  assert list(signature.parameters) == list(expected)
  for name, default in expected.items():
    assert signature.parameters[name].default == default, name
  # Keyword-only after the first, each annotated and documented in Args, in order.
  kinds = [p.kind for p in signature.parameters.values()]
  assert kinds == [inspect.Parameter.POSITIONAL_OR_KEYWORD] + [inspect.Parameter.KEYWORD_ONLY] * (
    len(kinds) - 1
  )
  assert all(p.annotation is not inspect.Parameter.empty for p in signature.parameters.values())
  doc = adafactor_jax.adafactor.__doc__
  args = doc[doc.index("Args:") : doc.index("Returns:")]
  paragraphs = dict(re.findall(r"^    (\w+):(.*?)(?=^    \w+:|\Z)", args, re.M | re.S))
  assert list(paragraphs) == list(expected)
  # ... each with its default, the signature's.
  for name, paragraph in paragraphs.items():
    (text,) = re.findall(r"Defaults to\s+``(.+?)``", paragraph)
    documented = jnp.dtype(text) if name == "momentum_dtype" else ast.literal_eval(text)
    assert documented == signature.parameters[name].default, name


@pytest.mark.parametrize(
  "kwargs",
  [
    {"weight_decay_rate": 0.1, "weight_decay_scaled_by_step": True},
    {"weight_decay_rate": 0.1, "weight_decay_scaled_by_step": True, "momentum": 0.9},
    {"maximize": True},
    {"maximize": True, "weight_decay_rate": 0.1, "learning_rate": 1e-2},
  ],
  ids=["scaled decay", "scaled decay, momentum", "maximize", "maximize with decay"],
)
def test_the_preset_knobs_match_the_float64_reference(kwargs):
  params = make_params()
  grads = _grads_list(params, False)[:5]
  reference = Reference(Options(**kwargs), params)
  for g in grads:
    reference.step(g)
  actual, _ = run_accumulating_float64(adafactor_jax.adafactor(**kwargs), params, grads)
  errors = relative_error(actual, reference.params, params)
  assert max(errors.values()) < 1e-5, errors


def test_maximize_is_the_step_of_the_negated_gradient_bit_for_bit():
  """U is odd in G and V̂ even, and weight decay is not flipped: maximize(G) == descend(-G)."""
  params = jax.tree.map(jnp.asarray, make_params())
  grads = jax.tree.map(jnp.asarray, _grads_list(params, False)[0])
  ascend = adafactor_jax.adafactor(maximize=True, weight_decay_rate=0.1)
  descend = adafactor_jax.adafactor(weight_decay_rate=0.1)
  up, _ = jax.jit(ascend.update)(grads, ascend.init(params), params)
  down, _ = jax.jit(descend.update)(jax.tree.map(jnp.negative, grads), descend.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, up, down)
  plain, _ = jax.jit(descend.update)(grads, descend.init(params), params)
  assert not np.array_equal(up["kernel"], plain["kernel"])


def test_relative_step_differs_from_optax_lr_none():
  """optax.adafactor(learning_rate=None) takes no step size at all; the paper's
  relative step (here) is min(1e-2, 1/sqrt(t)), 100x smaller at the start."""
  params = make_params()
  grads = _grads_list(params, False)[:1]
  ours, _ = run_optax(adafactor_jax.adafactor(), params, grads)
  theirs, _ = run_optax(optax.adafactor(learning_rate=None), params, grads)
  for leaf in ("kernel", "conv"):
    ratio = np.linalg.norm(theirs[leaf] - params[leaf]) / np.linalg.norm(ours[leaf] - params[leaf])
    np.testing.assert_allclose(ratio, 100.0, rtol=1e-3)


def test_a_chain_of_the_pieces_is_adafactor():
  """The README's own chain equals adafactor() to float32 rounding, step after step."""
  keys = iter(jax.random.split(jax.random.key(5), 16))
  params = {"w": jax.random.normal(next(keys), (256, 192)), "b": jnp.zeros(192)}
  chain = optax.chain(
    adafactor_jax.scale_by_factored_rms(clipping_threshold=1.0),
    optax.scale_by_learning_rate(adafactor_jax.relative_step_size()),
    adafactor_jax.scale_by_parameter_scale(1e-3),
  )
  ours, theirs = params, params
  ours_state, theirs_state = adafactor_jax.adafactor().init(params), chain.init(params)
  for _ in range(4):
    grads = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape), params)
    updates, ours_state = adafactor_jax.adafactor().update(grads, ours_state, ours)
    ours = optax.apply_updates(ours, updates)
    updates, theirs_state = chain.update(grads, theirs_state, theirs)
    theirs = optax.apply_updates(theirs, updates)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, theirs)
