"""Extreme gradients (zeros, 1e-38, subnormals, ±1e15, mixtures) and all-zero parameters.

What the platform does with such numbers decides what the right answer is:

* float32's smallest normal number is 1.18e-38, so 1e-38 is already a subnormal, as are
  1e-40 and 1e-45 (the least one, 1.4e-45).
* XLA:CPU flushes float32 subnormals to zero, as operands (DAZ) and as results (FTZ):
  under ``jax.jit``, ``x * 2`` of 1e-40 gives 0 and ``x > 0`` gives False
  (test_xla_cpu_flushes_float32_subnormals). ``x * 1`` does return 1e-40, but only
  because XLA's simplifier deletes the multiplication: it says nothing about flushing.

So the library computes as if G = 0 wherever |G| < 1.18e-38. In G² + ε1 that changes
nothing: such a G² is below 1.4e-76, 46 orders of magnitude under ε1 = 1e-30 (and it
underflows in float32 with or without flushing). It does change the numerator of
U = G/sqrt(V̂): a flushed G gives U = 0 instead of G/sqrt(V̂). Where V̂ >= ε1, as the
paper means it to be (the mean of G² + ε1), the exact U is below 1.2e-38/1e-15 = 1.2e-23,
nothing at all. But in a factored leaf that mixes 1e15 with subnormals in other rows and
columns, the exact rank-1 estimate R C / mean(R) there is about ε1²/1e29, far under ε1,
and the exact algorithm turns a 1e-40 gradient into |U| ~ 5e4: without clipping, the
float64 reference moves a parameter of size 0.05 by ~25 in one step, by ~1e6 in three
(see test_exact_adafactor_is_ill_conditioned_in_subnormal_gradients). The library's answer
is the exact algorithm's answer for the gradient with its subnormals set to zero, an
input within 1.2e-38 of the given one; that is what the reference is run on here,
wherever the platform flushes.

Gradients give the exact algorithm's step as long as the sums of G² fit float32 (n·G² <
3.4e38 over the n rows or columns averaged: |G| = 1e18 over 256 rows). Beyond, the
statistics saturate at 2^126 and the step stays finite, but is no longer the exact one
(test_gradients_too_large_to_square_in_float32_stay_finite).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from tests.conftest import the_node
from tests.reference import Options, Reference

STEPS = 4
# float32 rounding of a few steps, relative to the total parameter movement (as test_alias).
TOLERANCE = 1e-5
EPSILON1 = 1e-30
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 1.18e-38, the smallest normal float32

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# The extremes each dtype holds, by role. bfloat16 has float32's exponent range: 1e15 and
# 1e-38 fit (1e-38 as a subnormal); 1e-45 rounds to 0 in it, so its least subnormal stands
# in. float16 holds neither: 1e15 overflows (largest finite 65504) and 1e-38 underflows to 0
# (least subnormal 6e-8), so its extremes are its own largest, smallest normal and
# subnormals. Float32 statistics hold all of float16's as normal numbers.
EXTREMES = {
  "float32": {"huge": 1e15, "tiny": 1e-38, "subnormal": 1e-40, "least": 1e-45},
  "bfloat16": {
    "huge": 1e15,
    "tiny": 1e-38,
    "subnormal": 1e-39,
    "least": float(jnp.finfo(jnp.bfloat16).smallest_subnormal),
  },
  "float16": {
    "huge": float(jnp.finfo(jnp.float16).max),
    "tiny": float(jnp.finfo(jnp.float16).tiny),
    "subnormal": 1e-6,
    "least": float(jnp.finfo(jnp.float16).smallest_subnormal),
  },
}

SHAPES = {"matrix": (256, 130), "vector": (130,), "stacked": (3, 200, 140), "scalar": ()}

# The same names in adafactor() and the reference's Options.
OPTIONS = {
  "defaults": {},
  "unfactored": {"min_dim_size_to_factor": 1000},
  "momentum": {"momentum": 0.9},
  "no clipping": {"clipping_threshold": None},
  "learning rate": {"learning_rate": 1e-2},
  "no parameter scale": {"multiply_by_parameter_scale": False},
}


@functools.cache
def platform_flushes_subnormals() -> bool:
  """Whether float32 arithmetic under jit flushes subnormal operands and results to 0."""
  x = jnp.float32(1e-40)
  return float(jax.jit(lambda x: x * 2)(x)) == 0.0 and not bool(jax.jit(lambda x: x > 0)(x))


def flush_subnormals(x: np.ndarray) -> np.ndarray:
  """x with every float32 subnormal set to zero, as XLA:CPU's arithmetic reads it."""
  x = np.array(x, np.float64)
  x[np.abs(x) < FLOAT32_TINY] = 0.0
  return x


# --------------------------------------------------------------------------
# Gradient patterns: (shape, extremes, rng, step) -> float64 values before the cast.


def _signs(rng, shape):
  return rng.choice([-1.0, 1.0], size=shape)


def _constant(role, sign=1.0):
  return lambda shape, ex, rng, step: np.full(shape, sign * ex[role])


def _subnormal_mix(shape, ex, rng, step):
  values = np.array([0.0, ex["tiny"], ex["subnormal"], ex["least"]])
  return rng.choice(values, size=shape) * _signs(rng, shape)


def _blocks(shape, ex, rng, step):
  """Quadrants of the last two axes: huge | tiny above 0 | subnormal (1-D: quarters)."""
  if not shape:
    return np.asarray(ex["huge"])
  g = np.zeros(shape)
  if len(shape) == 1:
    q = shape[0] // 4
    g[:q], g[q : 2 * q], g[3 * q :] = ex["huge"], ex["tiny"], ex["subnormal"]
  else:
    n, m = shape[-2] // 2, shape[-1] // 2
    g[..., :n, :m], g[..., :n, m:], g[..., n:, m:] = ex["huge"], ex["tiny"], ex["subnormal"]
  return g * _signs(rng, shape)


def _one_huge_among_tiny(shape, ex, rng, step):
  g = ex["tiny"] * _signs(rng, shape)
  g.flat[rng.integers(g.size)] = ex["huge"]
  return g


def _zero_row_and_column(shape, ex, rng, step):
  """Huge everywhere but one all-zero row and column, a subnormal where they cross."""
  g = ex["huge"] * rng.uniform(0.5, 1.0, shape) * _signs(rng, shape)
  if len(shape) >= 2:
    g[..., 0, :] = 0.0
    g[..., :, 0] = 0.0
    g[..., 0, 0] = ex["subnormal"]
  elif len(shape) == 1:
    g[0], g[1] = 0.0, ex["subnormal"]
  return g


def _switch(first, then, at=2):
  def pattern(shape, ex, rng, step):
    return ex[first if step < at else then] * _signs(rng, shape)

  return pattern


# Named by their float32 values; each dtype substitutes its own extremes (EXTREMES).
PATTERNS = {
  "zeros": _constant("huge", 0.0),
  "1e-38": _constant("tiny"),
  "subnormal": _constant("subnormal"),
  "least subnormal": _constant("least"),
  "subnormal mix": _subnormal_mix,
  "1e15": _constant("huge"),
  "-1e15": _constant("huge", -1.0),
  "blocks": _blocks,
  "one huge among tiny": _one_huge_among_tiny,
  "zero row and column": _zero_row_and_column,
  "1e15 then 1e-38": _switch("huge", "tiny"),
  "1e-38 then 1e15": _switch("tiny", "huge"),
}
# Patterns with no float32 subnormal in them: their expectation does not depend on flushing.
_NO_SUBNORMALS = {"zeros", "1e15", "-1e15"}


def _params(dtype) -> dict[str, np.ndarray]:
  """Float64 values of the starting parameters, as stored in dtype; the vector is all zero."""
  rng = np.random.default_rng(0)
  params = {k: 0.05 * rng.standard_normal(s) for k, s in SHAPES.items()}
  params["vector"][:] = 0.0  # the parameter scale is epsilon2
  return {k: np.asarray(jnp.asarray(v, dtype), np.float64) for k, v in params.items()}


def _grads(pattern: str, dtype_name: str) -> list[dict[str, np.ndarray]]:
  """STEPS gradients, as float64 values of what the dtype holds."""
  dtype = DTYPES[dtype_name]
  out = []
  for step in range(STEPS):
    rng = np.random.default_rng([7, step])
    grads = {
      k: PATTERNS[pattern](shape, EXTREMES[dtype_name], rng, step) for k, shape in SHAPES.items()
    }
    out.append({k: np.asarray(jnp.asarray(g, dtype), np.float64) for k, g in grads.items()})
  return out


@functools.cache
def _stepper(option: str):
  tx = adafactor_jax.adafactor(**OPTIONS[option])

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state

  return tx, jax.jit(step)  # compiled once per dtype, reused by every pattern


@functools.cache
def _adafactor_update(**kwargs):
  """(tx, jitted tx.update), shared by the tests that use the same options."""
  tx = adafactor_jax.adafactor(**kwargs)
  return tx, jax.jit(tx.update)


def _assert_finite_state(state, where: str):
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64))), where
  stats = the_node(state, adafactor_jax.ScaleByFactoredRmsState)
  for name in ("v_row", "v_col", "v"):
    for v in jax.tree.leaves(getattr(stats, name)):
      assert v.dtype == jnp.float32, (where, name)
      # Each statistic averages G² + ε1, so none can be below ε1 (up to float32 rounding).
      assert np.all(np.asarray(v) >= 0.999 * EPSILON1), (where, name, float(np.min(v)))


def _run_library(option, dtype_name, params64, grads_list, checked_steps=STEPS):
  """Steps under jit; params kept in float64 by the harness (as run_accumulating_float64)
  and rounded to dtype for each step, so storage rounding stays out of the comparison.
  Checks the state every step and, for the first checked_steps, that the updates and the
  params as optax.apply_updates stores them in dtype are finite."""
  dtype = DTYPES[dtype_name]
  tx, step = _stepper(option)
  state = tx.init({k: jnp.asarray(v, dtype) for k, v in params64.items()})
  for t, grads in enumerate(grads_list, 1):
    stored, updates, state = step(
      {k: jnp.asarray(v, dtype) for k, v in params64.items()},
      state,
      {k: jnp.asarray(g, dtype) for k, g in grads.items()},
    )
    where = f"step {t}"
    for k in params64:
      assert updates[k].dtype == dtype and stored[k].dtype == dtype, (where, k)
      if t > checked_steps:
        continue
      assert np.all(np.isfinite(np.asarray(updates[k], np.float64))), (where, "update", k)
      assert np.all(np.isfinite(np.asarray(stored[k], np.float64))), (where, "params", k)
    _assert_finite_state(state, where)
    with np.errstate(invalid="ignore"):  # inf - inf, only after checked_steps
      params64 = {k: v + np.asarray(updates[k], np.float64) for k, v in params64.items()}
  return params64


def _norm(x) -> float:
  return float(np.sqrt(np.sum(np.square(x))))


def _run_reference(options: dict, params64, grads_list, flush: bool):
  """(final params, path length, peaks): per leaf, the path is the sum over steps of the
  norm of each step; peaks[t] is the largest |parameter| after step t + 1."""
  reference = Reference(Options(**options), params64)
  path = dict.fromkeys(params64, 0.0)
  peaks = []
  for grads in grads_list:
    before = dict(reference.params)
    reference.step({k: flush_subnormals(g) if flush else g for k, g in grads.items()})
    for k in path:
      path[k] += _norm(reference.params[k] - before[k])
    peaks.append(max(float(np.max(np.abs(x), initial=0.0)) for x in reference.params.values()))
  return reference.params, path, peaks


def _assert_matches(actual, expected, start, path, tolerance):
  """Per leaf, |actual - expected| <= tolerance * the reference's path length; a leaf the
  reference never moves must stay exactly in place. (The path, not the net movement:
  steps of opposite sign can cancel, and rounding accrues per step.)"""
  for k in expected:
    if path[k] == 0:
      np.testing.assert_array_equal(actual[k], start[k], err_msg=k)
    else:
      error = _norm(actual[k] - expected[k]) / path[k]
      assert error <= tolerance, f"{k}: error {error:.3g} of the path length"


# --------------------------------------------------------------------------
# The platform, and the values themselves.


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a fact about XLA:CPU")
def test_xla_cpu_flushes_float32_subnormals():
  x = jnp.float32(1e-40)
  assert np.float32(1e-40) != 0  # stored, and transferred, as a subnormal
  assert float(jax.device_put(x)) == np.float32(1e-40)
  assert float(jax.jit(lambda x: x * 2)(x)) == 0.0  # FTZ: the result is flushed
  assert not bool(jax.jit(lambda x: x > 0)(x))  # DAZ: the operand reads as 0
  assert platform_flushes_subnormals()


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_the_extremes_are_what_they_claim(dtype_name):
  dtype, ex = DTYPES[dtype_name], EXTREMES[dtype_name]
  held = {role: float(jnp.asarray(v, dtype)) for role, v in ex.items()}
  finfo = jnp.finfo(dtype)
  assert all(np.isfinite(v) and v != 0 for v in held.values()), held
  assert held["huge"] ** 2 < float(np.finfo(np.float32).max)  # G² fits float32
  assert held["tiny"] <= float(finfo.tiny)
  assert held["subnormal"] < float(finfo.tiny)
  assert held["least"] == float(finfo.smallest_subnormal)
  if dtype_name != "float16":
    # 1e-38 and below are subnormal, and flushed by float32 arithmetic on XLA:CPU.
    assert max(held["tiny"], held["subnormal"], held["least"]) < FLOAT32_TINY


# --------------------------------------------------------------------------
# Every pattern, option set and dtype: finite, and equal to the float64 reference.

# Relative to the path length (measured: float32 3.6e-7, bfloat16 2.5e-3, float16 1.4e-3).
# bfloat16: each step rounds U, ρU and the scaled update to it (2^-9 each) and reads X
# rounded for RMS(X). float16: the all-zero vector's steps ρ·ε2 = 1e-5 are float16
# subnormals, whose spacing 6e-8 is 0.6% of them.
LOW_PRECISION_TOLERANCE = {"bfloat16": 2**-7, "float16": 2**-8}

# Every option set in float32; bfloat16 with the defaults; float16 with and without
# clipping (its U saturates at 65504 before clipping brings it back). Each pair is one XLA
# compilation (~1.3 s on 2 cores), shared by all patterns: this list sets the file's time.
CASES = [(option, "float32") for option in OPTIONS] + [
  ("defaults", "bfloat16"),
  ("defaults", "float16"),
  ("no clipping", "float16"),
]


# float16 without clipping: on these mixtures the rank-1 V̂ at the small entries is far
# below their own G² (float16's small values keep G² above ε1), so U = G/sqrt(V̂) there is
# 6e6 to 9e12, and with the parameter scale feeding back the exact parameters pass
# float16's 65504 in the first step (blocks, zero row and column) or the second (one huge
# among tiny). No float16 answer is right from then on: the updates and params are checked
# finite while the exact ones fit (U saturates at 65504 rather than overflowing), the
# float32 statistics throughout.
OUT_OF_RANGE = {
  ("no clipping", "float16", pattern)
  for pattern in ("blocks", "one huge among tiny", "zero row and column")
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("option, dtype_name", CASES, ids=[f"{o}-{d}" for o, d in CASES])
def test_extreme_gradients_stay_finite_and_match_the_reference(option, dtype_name, pattern):
  dtype = DTYPES[dtype_name]
  params64 = _params(dtype)
  grads_list = _grads(pattern, dtype_name)
  flush = platform_flushes_subnormals()
  if not flush and pattern not in _NO_SUBNORMALS:
    pytest.skip("the expected values for subnormal gradients assume FTZ/DAZ arithmetic")

  expected, path, peaks = _run_reference(OPTIONS[option], params64, grads_list, flush)
  fits = [peak <= float(jnp.finfo(dtype).max) for peak in peaks]
  checked_steps = fits.index(False) if False in fits else STEPS
  in_range = (option, dtype_name, pattern) not in OUT_OF_RANGE
  assert in_range == (checked_steps == STEPS), peaks
  actual = _run_library(option, dtype_name, params64, grads_list, checked_steps)
  if not in_range:
    return
  if pattern == "zeros":  # U = 0 * rsqrt(ε1) exactly, for every option
    for k in params64:
      np.testing.assert_array_equal(actual[k], params64[k], err_msg=k)
  tolerance = TOLERANCE if dtype_name == "float32" else LOW_PRECISION_TOLERANCE[dtype_name]
  _assert_matches(actual, expected, params64, path, tolerance)


def test_exact_adafactor_is_ill_conditioned_in_subnormal_gradients():
  """Why the reference gets the flushed gradient: on the block pattern, the exact
  algorithm's answer jumps when the 1e-38 and 1e-40 entries become 0, and the
  library (which computes with them as 0) gives the flushed answer."""
  if not platform_flushes_subnormals():
    pytest.skip("the library's answer here assumes FTZ/DAZ arithmetic")
  options = {"clipping_threshold": None}
  params64 = _params(jnp.float32)
  grads_list = _grads("blocks", "float32")[:1]
  exact, _, _ = _run_reference(options, params64, grads_list, flush=False)
  flushed, path, _ = _run_reference(options, params64, grads_list, flush=True)
  n, m = (s // 2 for s in SHAPES["matrix"])
  moved_exact = np.abs(exact["matrix"] - params64["matrix"])
  moved_flushed = np.abs(flushed["matrix"] - params64["matrix"])
  # Exactly: G = ±1e-40 with V̂ = R C / mean(R) ~ 4e-90 gives |U| ~ 5e4 there, and a
  # parameter of size 0.05 moves by ~25 for a gradient of 1e-40.
  assert moved_exact[n:, m:].max() > 10.0
  # Flushed: the 1e15 block moves by ρ·RMS(X)·|U| with U = ±1, the rest not at all.
  assert moved_flushed[n:, m:].max() == 0.0
  np.testing.assert_allclose(
    moved_flushed[:n, :m], 1e-2 * np.sqrt(np.mean(params64["matrix"] ** 2))
  )
  actual = _run_library("no clipping", "float32", params64, grads_list)
  _assert_matches(actual, flushed, params64, path, TOLERANCE)


# --------------------------------------------------------------------------
# All-zero parameters: the parameter scale is epsilon2.


def _first_update(g: np.ndarray, axes, step_size: float, epsilon2: float) -> np.ndarray:
  """-ε2 · ρ · clipped(G / sqrt(V̂)) for all-zero params, in float64, written from the
  paper: β̂21 = 1 - 1^-0.8 = 0, so V̂ is G² + ε1 or its rank-1 factorization."""
  sq = g * g + EPSILON1
  if axes is None:
    v_hat = sq
  else:
    row_axis, col_axis = axes
    rows = sq.sum(col_axis, keepdims=True)
    cols = sq.sum(row_axis, keepdims=True)
    v_hat = rows * cols / rows.sum(row_axis, keepdims=True)
  u = g / np.sqrt(v_hat)
  u = u / max(1.0, np.sqrt(np.mean(u * u)))
  return -epsilon2 * step_size * u


FIRST_STEP_SHAPES = {  # shape: the factored (row, col) axes, None for a full second moment
  (256, 130): (0, 1),
  (130,): None,
  (3, 200, 140): (1, 2),
  (): None,
}


@pytest.mark.parametrize(
  "kwargs, step_size, epsilon2",
  [({}, 1e-2, 1e-3), ({"learning_rate": 0.5, "epsilon2": 0.1}, 0.5, 0.1)],
  ids=["relative step", "learning rate and epsilon2 0.1"],
)
@pytest.mark.parametrize("gradient", ["normal", "1e15", "blocks"])
def test_first_update_of_all_zero_params_is_epsilon2_times_the_step(
  gradient, kwargs, step_size, epsilon2
):
  rng = np.random.default_rng(3)
  params = {str(s): np.zeros(s) for s in FIRST_STEP_SHAPES}
  if gradient == "normal":
    grads = {str(s): rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 3) for s in FIRST_STEP_SHAPES}
  else:
    pattern = _constant("huge") if gradient == "1e15" else _blocks
    grads = {str(s): pattern(s, EXTREMES["float32"], rng, 0) for s in FIRST_STEP_SHAPES}
  # Subnormals set to 0 up front (see the module docstring), so that the formula, the
  # reference and the library all see the same numbers on any platform.
  grads = {k: flush_subnormals(np.asarray(g, np.float32)) for k, g in grads.items()}
  tx, update = _adafactor_update(**kwargs)
  updates, _ = update(
    {k: jnp.asarray(g, jnp.float32) for k, g in grads.items()},
    tx.init({k: jnp.asarray(p, jnp.float32) for k, p in params.items()}),
    {k: jnp.asarray(p, jnp.float32) for k, p in params.items()},
  )
  reference = Reference(Options(**kwargs), params)
  reference.step(grads)
  for shape, axes in FIRST_STEP_SHAPES.items():
    k = str(shape)
    expected = _first_update(grads[k], axes, step_size, epsilon2)
    u = np.asarray(updates[k], np.float64)
    # float32 rounding of G², the means (of up to 256 terms), rsqrt and the products:
    # a few ulps (measured 3.6e-7).
    np.testing.assert_allclose(u, expected, rtol=1e-6, atol=0, err_msg=k)
    # Both float64: only the order of operations differs.
    np.testing.assert_allclose(reference.params[k], expected, rtol=1e-12, atol=0, err_msg=k)
    # Whatever the size of G, the step of an all-zero parameter is ε2·ρ·Û with RMS(Û) <= 1.
    assert np.sqrt(np.mean(u * u)) <= epsilon2 * step_size * (1 + 1e-6)


def test_epsilon2_zero_keeps_all_zero_params_at_zero():
  """max(0, RMS(0)) = 0: no step at all, and no 0/0 on the way."""
  params = {str(s): jnp.zeros(s) for s in FIRST_STEP_SHAPES}
  for kwargs in ({}, {"momentum": 0.9, "learning_rate": 1e-2, "clipping_threshold": None}):
    tx, update = _adafactor_update(epsilon2=0.0, **kwargs)
    state = tx.init(params)
    for pattern in ("1e15", "blocks", "zeros"):
      grads = {
        k: jnp.asarray(PATTERNS[pattern](s, EXTREMES["float32"], np.random.default_rng(0), 0))
        for k, s in zip(params, FIRST_STEP_SHAPES, strict=True)
      }
      updates, state = update(jax.tree.map(lambda g: g.astype(jnp.float32), grads), state, params)
      for k, u in updates.items():
        np.testing.assert_array_equal(u, np.zeros(u.shape), err_msg=f"{kwargs} {pattern} {k}")
      _assert_finite_state(state, f"{kwargs} {pattern}")


@pytest.mark.parametrize(
  "param, epsilon2, factor",
  [
    (np.zeros(7), 1e-3, 1e-3),
    (np.zeros(()), 1e-3, 1e-3),
    (np.zeros((256, 130)), 0.25, 0.25),
    (np.zeros(7), 0.0, 0.0),
    (np.zeros(()), 0.0, 0.0),
    (np.full(7, 5e-4), 1e-3, 1e-3),  # RMS below ε2: ε2
    (np.full(7, 2e-3), 1e-3, 2e-3),  # RMS above ε2: the RMS
    (np.full(7, -2e-3), 0.0, 2e-3),
    (np.zeros(0), 1e-3, None),  # empty: nothing to scale, and no error
    (np.zeros((0, 200)), 0.0, None),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scale_by_parameter_scale_alone_on_zero_0d_and_empty_params(param, epsilon2, factor, dtype):
  tx = adafactor_jax.scale_by_parameter_scale(epsilon2=epsilon2)
  x = jnp.asarray(param, dtype)
  u = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, param.shape), dtype)
  out, _ = jax.jit(tx.update)({"x": u}, tx.init({"x": x}), {"x": x})
  out = out["x"]
  assert out.shape == u.shape and out.dtype == dtype
  assert np.all(np.isfinite(np.asarray(out, np.float64)))
  if factor is not None:
    expected = np.asarray(u, np.float64) * factor
    # float32: the RMS of a constant is its magnitude to a few ulps; bfloat16: the output is
    # rounded to bfloat16, half an ulp (2^-9) of it.
    rtol = 1e-6 if dtype == jnp.float32 else 2**-8
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=rtol, atol=0)


# --------------------------------------------------------------------------
# Gradients near float32's limit: G² must not overflow.


def _one_step(value: float, shape):
  """(library update, library state, float64 reference update) of one step."""
  params = {"x": np.ones(shape)}
  grads = {"x": np.full(shape, value)}
  tx, update = _adafactor_update()
  jparams = {"x": jnp.asarray(params["x"], jnp.float32)}
  updates, state = update({"x": jnp.asarray(grads["x"], jnp.float32)}, tx.init(jparams), jparams)
  reference = Reference(Options(), params)
  reference.step(grads)
  return np.asarray(updates["x"], np.float64), state, reference.params["x"] - params["x"]


@pytest.mark.parametrize(
  "value, shape",
  [
    (1e15, (256, 130)),
    (1e15, (130,)),
    (1e18, (256, 130)),
    (1e18, (130,)),
  ],
)
def test_large_gradients_whose_squares_fit_float32(value, shape):
  """(1e18)² = 1e36, and 256 of them sum to 2.6e38 < 3.4e38: U = sign(G), as exactly."""
  update, state, expected = _one_step(value, shape)
  _assert_finite_state(state, str(value))
  np.testing.assert_allclose(update, expected, rtol=1e-6)  # U = ±1 to float32 rounding
  np.testing.assert_allclose(expected, -1e-2)  # ρ1 · RMS(X) · sign(G), with X = 1


@pytest.mark.parametrize("clipping_threshold", [1.0, None])
@pytest.mark.parametrize(
  "value, shape",
  [
    (1e20, (130,)),  # (1e20)² = 1e40 > 3.4e38
    (1.5e18, (256, 130)),  # G² = 2.3e36 fits, but its sum over 256 rows does not
    (1e20, (256, 130)),
    (3e38, (130,)),  # near float32's largest, 3.4e38
    (3e38, (256, 130)),
    (-3e38, (3, 200, 140)),
  ],
)
def test_gradients_too_large_to_square_in_float32_stay_finite(value, shape, clipping_threshold):
  """G² = inf: the statistics saturate at 2^126 (no inf/inf), the update is finite, and
  the parameter keeps training afterwards, with finite steps (tiny ones: V̂ decays from
  2^126 as the exact algorithm's decays from G²)."""
  tx = adafactor_jax.adafactor(clipping_threshold=clipping_threshold)
  params = jnp.ones(shape)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in (jnp.full(shape, value), jnp.ones(shape), -jnp.ones(shape)):
    updates, state = step(g, state, params)
    assert np.all(np.isfinite(updates)), value
    _assert_finite_state(state, str(value))
    for leaf in jax.tree.leaves(the_node(state, adafactor_jax.ScaleByFactoredRmsState)):
      assert np.all(np.asarray(leaf) <= 2.0**126)
    params = optax.apply_updates(params, updates)
  assert np.all(np.isfinite(params))
