"""warm_start_state: Adafactor state from optax.adafactor's, Adam's or its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import FactorAxes, warm_start_state
from adafactor_jax.momentum import dequantize
from tests.conftest import (
  OPTAX_CASES,
  assert_bit_identical,
  make_grads,
  make_params,
  run_check_script,
  run_optax,
  the_node,
)


def _adam_state(params, count: int, seed: int = 0, mu_scale: dict | None = None):
  """optax.adamw's state with a ScaleByAdamState of known moments at ``count``.

  The bias-corrected ν̂ is positive with a spread of scales; μ̂ is about
  √ν̂ · mu_scale[leaf] (0.3 unless given) with random signs.
  """
  rng = np.random.default_rng(seed)
  state = optax.adamw(1e-3).init(params)
  nu, mu = {}, {}
  for k, p in params.items():
    nu_hat = 10.0 ** rng.uniform(-6, -2, p.shape)
    mu_hat = (mu_scale or {}).get(k, 0.3) * np.sqrt(nu_hat) * rng.standard_normal(p.shape)
    nu[k] = (nu_hat * (1 - 0.999**count)).astype(np.float32)
    mu[k] = (mu_hat * (1 - 0.9**count)).astype(np.float32)
  adam = optax.ScaleByAdamState(jnp.asarray(count, jnp.int32), mu, nu)
  return (adam, *state[1:])


def _corrected(moment, decay: float, count: int) -> np.ndarray:
  return np.asarray(moment, np.float64) / (1.0 - decay**count)


def _stats(state):
  """The ScaleByFactoredRmsState of an adafactor state (plain or skip_nonfinite)."""
  return [n for n in jax.tree.leaves(state, is_leaf=_is_stats) if _is_stats(n)][0]


def _is_stats(x) -> bool:
  return isinstance(x, adafactor_jax.ScaleByFactoredRmsState)


def _momentum(state):
  return [
    n.momentum
    for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, adafactor_jax.EmaMomentumState))
    if isinstance(n, adafactor_jax.EmaMomentumState)
  ][0]


# --------------------------------------------------------------------------
# From optax.adafactor: exact.


@pytest.mark.parametrize("name", list(OPTAX_CASES))
def test_from_optax_adafactor_the_same_updates_follow(name):
  kwargs = {"learning_rate": 1e-2, **OPTAX_CASES[name]}
  source_tx = optax.adafactor(**kwargs)
  tx = adafactor_jax.adafactor(**kwargs)
  params = make_params()
  grads = [make_grads(params, step) for step in range(8)]
  params, source = run_optax(source_tx, params, grads[:5])

  state = warm_start_state(tx, params=params, source_state=source)

  # The statistics are optax's, laid out as this library's (no arithmetic).
  theirs, ours = source[0], _stats(state)
  assert int(ours.count) == int(theirs.count) == 5
  for k, p in params.items():
    if ours.v[k] is not None:
      np.testing.assert_array_equal(ours.v[k], theirs.v[k])
      continue
    order = np.argsort(p.shape, kind="stable")  # optax's d1, d0: the two largest axes
    d1, d0 = int(order[-2]), int(order[-1])
    by_averaged_axis = {d0: theirs.v_row[k], d1: theirs.v_col[k]}
    rows, cols = min(d0, d1), max(d0, d1)
    np.testing.assert_array_equal(ours.v_row[k], np.expand_dims(by_averaged_axis[cols], cols))
    np.testing.assert_array_equal(ours.v_col[k], np.expand_dims(by_averaged_axis[rows], rows))

  # And the updates that follow are optax's, to float32 rounding.
  update, source_update = jax.jit(tx.update), jax.jit(source_tx.update)
  ours_p, theirs_p = params, params
  for g in grads[5:]:
    u, state = update(g, state, ours_p)
    v, source = source_update(g, source, theirs_p)
    for k in params:
      assert np.max(np.abs(u[k] - v[k])) <= 1e-6 * np.max(np.abs(v[k])), (k, name)
    ours_p, theirs_p = optax.apply_updates(ours_p, u), optax.apply_updates(theirs_p, v)


def test_from_optax_adafactor_bfloat16_statistics_become_float32():
  params = {k: jnp.asarray(v, jnp.bfloat16) for k, v in make_params().items()}
  source_tx = optax.adafactor(1e-2)
  _, source = jax.jit(source_tx.update)(make_grads(params, 0), source_tx.init(params), params)
  assert source[0].v_row["kernel"].dtype == jnp.bfloat16
  state = warm_start_state(adafactor_jax.adafactor(1e-2), params=params, source_state=source)
  stats = _stats(state)
  assert stats.v_row["kernel"].dtype == stats.v["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(stats.v["bias"], np.asarray(source[0].v["bias"], np.float32))


# --------------------------------------------------------------------------
# From Adam: row and column means of the bias-corrected nu.

ADAM_SHAPES = {
  "kernel": ((256, 192), FactorAxes((0,), (1,))),
  "stacked": ((4, 160, 144), FactorAxes((1,), (2,), (0,))),  # a batch axis
  "experts": ((3, 160, 144), FactorAxes((2,), (1,), (0,))),  # R keeps the later axis
  "attention": ((256, 4, 32), FactorAxes((0,), (1, 2))),  # two column axes
  "conv": ((3, 3, 128, 160), FactorAxes((2,), (3,))),  # no batch: statistics per (h, w)
  "narrow": ((8, 300), None),  # full
  "bias": ((300,), None),
}


def _adam_params():
  rng = np.random.default_rng(3)
  return {
    k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, (s, _) in ADAM_SHAPES.items()
  }


def _rules():
  return [(f"^{k}$", axes) for k, (_, axes) in ADAM_SHAPES.items()]


@pytest.mark.parametrize("b2, via", [(0.999, "default"), (0.95, "argument"), (0.95, "injected")])
def test_from_adam_statistics_are_means_of_bias_corrected_nu(b2, via):
  params = _adam_params()
  count = 7  # bias correction 1 - b2^7: 0.007 for 0.999, 0.30 for 0.95
  source = _adam_state(params, count)
  kwargs = {}
  if via == "argument":
    kwargs["b2"] = b2
  elif via == "injected":
    injected = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, b2=b2)
    base = injected.init(params)
    source = base._replace(inner_state=source)
  tx = adafactor_jax.adafactor(factor_dims=_rules())

  stats = _stats(warm_start_state(tx, params=params, source_state=source, **kwargs))

  assert int(stats.count) == count
  nu = source[0].nu if via != "injected" else source.inner_state[0].nu
  for k, (_, axes) in ADAM_SHAPES.items():
    expected = _corrected(nu[k], b2, count)
    if axes is None:
      assert stats.v_row[k] is None
      np.testing.assert_allclose(stats.v[k], expected, rtol=1e-6)
      continue
    row = expected.mean(axis=axes.col, keepdims=True)
    col = expected.mean(axis=axes.row, keepdims=True)
    assert stats.v[k] is None
    np.testing.assert_allclose(stats.v_row[k], row, rtol=1e-6)
    np.testing.assert_allclose(stats.v_col[k], col, rtol=1e-6)


def _expected_momentum(params, source, tx_kwargs, count, b1=0.9, b2=0.999):
  """float64: M = step · max(ε2, RMS(X)) · clip(μ̂ / √V̂), V̂ from the warm statistics."""
  adam = source[0]
  out, clipped = {}, {}
  for k, p in params.items():
    mu = _corrected(adam.mu[k], b1, count)
    nu = _corrected(adam.nu[k], b2, count)
    axes = adafactor_jax.default_factor_dims(p.shape)
    if axes is None:
      v_hat = nu
    else:
      row_axis, col_axis = axes
      row = nu.mean(axis=col_axis, keepdims=True)
      col = nu.mean(axis=row_axis, keepdims=True)
      v_hat = row * col / row.mean(axis=row_axis, keepdims=True)
    u = mu / np.sqrt(v_hat)
    rms = np.sqrt(np.mean(u * u))
    clipped[k] = rms > tx_kwargs["clipping_threshold"]
    u = u / max(1.0, rms / tx_kwargs["clipping_threshold"])
    scale = max(1e-3, np.sqrt(np.mean(np.asarray(p, np.float64) ** 2)))
    out[k] = float(tx_kwargs["learning_rate"](count)) * scale * u
  return out, clipped


@pytest.mark.parametrize("momentum_dtype", ["float32", "bfloat16"])
def test_from_adam_momentum_is_the_update_of_mu_hat(momentum_dtype):
  """The momentum averages finished updates: it is tx's update of μ̂ with the
  warm statistics, clipped, times the step size at the count and the parameter scale."""
  params = make_params()
  params["bias"][:] = 0.01
  count = 40
  # 'kernel' has a consistent gradient (μ̂ ≈ 2√ν̂): its update is clipped.
  source = _adam_state(params, count, mu_scale={"kernel": 2.0})
  tx_kwargs = {
    "learning_rate": optax.linear_schedule(1e-2, 1e-3, 100),
    "clipping_threshold": 1.0,
  }
  tx = adafactor_jax.adafactor(
    momentum=0.9, momentum_dtype=jnp.dtype(momentum_dtype), skip_nonfinite=True, **tx_kwargs
  )

  momentum = _momentum(warm_start_state(tx, params=params, source_state=source))

  expected, clipped = _expected_momentum(params, source, tx_kwargs, count)
  assert clipped["kernel"] and not clipped["narrow"]
  rtol = 1e-5 if momentum_dtype == "float32" else 2**-8
  for k in params:
    assert momentum[k].dtype == jnp.dtype(momentum_dtype)
    np.testing.assert_allclose(np.asarray(momentum[k], np.float64), expected[k], rtol=rtol, atol=0)


def _counts(state) -> list[int]:
  return [
    int(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    if getattr(path[-1], "name", None) == "count"
  ]


def test_the_count_carries_over_to_every_schedule_and_the_decay_continues():
  params = make_params()
  source = _adam_state(params, 200)
  schedule = optax.linear_schedule(1e-2, 1e-3, 1000)
  tx = optax.inject_hyperparams(adafactor_jax.adafactor)(learning_rate=schedule, momentum=0.9)

  state = warm_start_state(tx, params=params, source_state=source)

  counts = _counts(state)
  assert len(counts) == 3 and set(counts) == {200}  # inject, its lr schedule, statistics
  # The next step uses β̂2 = 1 - 201^-0.8 on the warm statistics and the
  # step size at count 200.
  g = make_grads(params, 0)
  updates, new_state = tx.update(g, state, params)
  beta2 = 1.0 - 201.0**-0.8
  old, new = _stats(state), _stats(new_state)
  square = np.asarray(g["kernel"], np.float64) ** 2 + 1e-30
  np.testing.assert_allclose(
    new.v_row["kernel"],
    beta2 * old.v_row["kernel"] + (1 - beta2) * square.mean(1, keepdims=True),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    new.v["bias"],
    beta2 * old.v["bias"] + (1 - beta2) * np.asarray(g["bias"], np.float64) ** 2,
    rtol=1e-5,
  )
  assert float(new_state.hyperparams["learning_rate"]) == pytest.approx(float(schedule(200)))

  # count= overrides: statistics as before, the step size of the new count.
  restarted = warm_start_state(tx, params=params, source_state=source, count=0)
  assert set(_counts(restarted)) == {0}
  np.testing.assert_array_equal(_stats(restarted).v["bias"], old.v["bias"])
  ratio = np.asarray(_momentum(restarted)["narrow"]) / np.asarray(_momentum(state)["narrow"])
  np.testing.assert_allclose(ratio, float(schedule(0)) / float(schedule(200)), rtol=1e-5)


def test_a_fresh_adam_state_gives_exactly_init():
  params = jax.tree.map(jnp.asarray, make_params())
  tx = adafactor_jax.adafactor(momentum=0.9)
  assert_bit_identical(
    warm_start_state(tx, params=params, source_state=optax.adamw(1e-3).init(params)),
    tx.init(params),
  )


def test_zero_second_moments_give_finite_state_and_updates():
  """A parameter whose gradient was always zero (an unused embedding row) has ν = μ = 0."""
  params = make_params()
  source = _adam_state(params, 10)
  source[0].nu["kernel"][:5] = 0.0
  source[0].mu["kernel"][:5] = 0.0
  source[0].nu["bias"][:7] = 0.0
  source[0].mu["bias"][:7] = 0.0
  tx = adafactor_jax.adafactor(momentum=0.9)
  state = warm_start_state(tx, params=params, source_state=source)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  assert np.all(np.asarray(_momentum(state)["bias"][:7]) == 0)
  updates, _ = tx.update(make_grads(params, 0), state, params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(updates))


# --------------------------------------------------------------------------
# Targets and sources of every shape: chains, wrappers, own states, jit.


def test_a_chain_of_the_pieces_gets_the_same_state_as_adafactor():
  params = make_params()
  source = _adam_state(params, 30)
  chain = optax.chain(
    adafactor_jax.scale_by_factored_rms(clipping_threshold=1.0),
    optax.scale_by_learning_rate(1e-3, flip_sign=False),
    adafactor_jax.ema_momentum(0.9),
    optax.scale(-1.0),
  )
  alias = adafactor_jax.adafactor(1e-3, multiply_by_parameter_scale=False, momentum=0.9)
  assert_bit_identical(
    warm_start_state(chain, params=params, source_state=source),
    warm_start_state(alias, params=params, source_state=source),
  )


def test_multi_transform_on_both_sides():
  params = make_params()
  grads = [make_grads(params, step) for step in range(4)]
  labels = {k: "a" if k in ("kernel", "bias") else "b" for k in params}
  source_tx = optax.multi_transform({"a": optax.adamw(1e-3), "b": optax.adam(1e-3)}, labels)
  params, source = run_optax(source_tx, params, grads)
  tx = optax.multi_transform(
    {"a": adafactor_jax.adafactor(momentum=0.9), "b": adafactor_jax.adafactor()}, labels
  )
  state = warm_start_state(tx, params=params, source_state=source)
  plain = warm_start_state(
    adafactor_jax.adafactor(momentum=0.9), params=params, source_state=source
  )
  group_a = state.inner_states["a"].inner_state
  np.testing.assert_array_equal(group_a[0].v["bias"], _stats(plain).v["bias"])
  np.testing.assert_array_equal(group_a[0].v_row["kernel"], _stats(plain).v_row["kernel"])
  np.testing.assert_allclose(group_a[3].momentum["kernel"], _momentum(plain)["kernel"], rtol=1e-6)
  group_b = state.inner_states["b"].inner_state
  np.testing.assert_array_equal(group_b[0].v_col["conv"], _stats(plain).v_col["conv"])
  assert isinstance(group_b[0].v_row["kernel"], optax.MaskedNode)


def test_from_its_own_state_refactored_and_with_momentum_added():
  params = make_params()
  grads = [make_grads(params, step) for step in range(4)]
  source_tx = adafactor_jax.adafactor(momentum=0.9)
  params, source = run_optax(source_tx, params, grads)
  # The same optimizer: the same state.
  assert_bit_identical(warm_start_state(source_tx, params=params, source_state=source), source)
  # Unfactored: V̂ = R C / mean(R) of the factored statistics, in float64.
  full = _stats(
    warm_start_state(adafactor_jax.adafactor(factored=False), params=params, source_state=source)
  )
  old = _stats(source)
  row, col = (np.asarray(x, np.float64) for x in (old.v_row["kernel"], old.v_col["kernel"]))
  np.testing.assert_allclose(full.v["kernel"], row * col / row.mean(), rtol=1e-6)
  np.testing.assert_array_equal(full.v["bias"], old.v["bias"])
  # Factored from 1 instead of 128: 'narrow' (8, 300) gets the means of its full moment.
  small = _stats(
    warm_start_state(
      adafactor_jax.adafactor(min_dim_size_to_factor=1), params=params, source_state=source
    )
  )
  narrow = np.asarray(old.v["narrow"], np.float64)
  np.testing.assert_allclose(small.v_row["narrow"], narrow.mean(1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(small.v_col["narrow"], narrow.mean(0, keepdims=True), rtol=1e-6)
  # Momentum from an Adafactor is in update units already: copied.
  bf16 = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(
    _momentum(warm_start_state(bf16, params=params, source_state=source))["kernel"],
    np.asarray(_momentum(source)["kernel"]).astype(jnp.bfloat16),
  )
  # Without momentum in the source, the target's starts at zero.
  plain = warm_start_state(adafactor_jax.adafactor(), params=params, source_state=source)
  started = warm_start_state(
    adafactor_jax.adafactor(momentum=0.9), params=params, source_state=plain
  )
  assert not any(np.any(np.asarray(m)) for m in jax.tree.leaves(_momentum(started)))


def test_under_jit_equals_eager():
  params = jax.tree.map(jnp.asarray, make_params())
  source = _adam_state(params, 12)
  tx = adafactor_jax.adafactor(momentum=0.9, stochastic_rounding=True)
  jitted = jax.jit(lambda p, s: warm_start_state(tx, params=p, source_state=s))(params, source)
  eager = warm_start_state(tx, params=params, source_state=source)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sharded_params_shard_the_state_like_init():
  """tests/warm_start_sharded_checks.py on 8 simulated devices, in a subprocess."""
  observed = run_check_script("warm_start_sharded_checks.py")
  assert set(observed) == {
    f"{a}-{s}" for a in ("auto", "explicit") for s in ("like-params", "replicated")
  }
  for case, o in observed.items():
    assert "error" not in o, (case, o.get("error"))
    # Statistics sharded like their parameter, the averaged axis replicated.
    assert o["init"]["[0].v_col['kernel']"] == [None, "model"], case
    assert o["warm"] == o["init"], case
    assert o["jitted"] == o["init"], case
    assert o["jitted_equal"], case
    assert o["max_relative_error"] < 1e-6, case


# --------------------------------------------------------------------------
# Errors.


def _source_and_params():
  params = make_params()
  return params, _adam_state(params, 5)


@pytest.mark.parametrize(
  "make, fragment",
  [
    (
      lambda p, s: (adafactor_jax.adafactor(), p, optax.sgd(0.1, momentum=0.9).init(p)),
      "source_state must hold one of",
    ),
    (
      lambda p, s: (adafactor_jax.adafactor(), p, (s, optax.adafactor(1e-2).init(p))),
      "more than one kind",
    ),
    (
      lambda p, s: (adafactor_jax.adafactor(), {**p, "extra": np.ones(3, np.float32)}, s),
      "'extra'",
    ),
    (
      lambda p, s: (adafactor_jax.adafactor(), {**p, "kernel": p["kernel"].T}, s),
      "parameter 'kernel' has shape",
    ),
    (lambda p, s: (optax.adam(1e-3), p, s), "tx must be an adafactor_jax optimizer"),
    (lambda p, s: (optax.MultiSteps(adafactor_jax.adafactor(), 2), p, s), "optax.MultiSteps"),
    (
      lambda p, s: (
        optax.GradientTransformation(
          (tx := adafactor_jax.adafactor(momentum=0.9)).init,
          lambda u, st, p=None: tx.update(u, st, p),
        ),
        p,
        s,
      ),
      "did not pass extra arguments",
    ),
  ],
  ids=[
    "unsupported source",
    "two kinds",
    "unknown param",
    "wrong shape",
    "not adafactor",
    "multisteps",
    "wrapper",
  ],
)
def test_errors_name_what_is_wrong(make, fragment):
  params, source = _source_and_params()
  tx, params, source = make(params, source)
  with pytest.raises(ValueError, match=fragment):
    warm_start_state(tx, params=params, source_state=source)


def test_optax_statistics_of_the_wrong_shape_name_the_parameter():
  params = make_params()
  source = optax.adafactor(1e-2).init(params)
  stats = source[0]
  source = (stats._replace(v_row={**stats.v_row, "kernel": jnp.zeros(7)}), *source[1:])
  with pytest.raises(ValueError, match="parameter 'kernel'"):
    warm_start_state(adafactor_jax.adafactor(1e-2), params=params, source_state=source)


@pytest.mark.parametrize(
  "kwargs, fragment",
  [
    ({"b1": 1.0}, "b1 must be in"),
    ({"b2": -0.1}, "b2 must be in"),
    ({"count": -1}, "count must be in"),
    ({"count": 2.5}, "count must be an integer"),
  ],
)
def test_bad_arguments_are_named(kwargs, fragment):
  params, source = _source_and_params()
  with pytest.raises(ValueError, match=fragment):
    warm_start_state(adafactor_jax.adafactor(), params=params, source_state=source, **kwargs)


def test_arguments_after_the_first_are_keyword_only():
  params, source = _source_and_params()
  with pytest.raises(TypeError):
    warm_start_state(adafactor_jax.adafactor(), params, source)  # type: ignore[misc]


# --------------------------------------------------------------------------
# What it is for: switching from AdamW mid-run.


def _regression_problem():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4096, 32)).astype(np.float32)
  teacher = rng.standard_normal((32, 64)) / np.sqrt(32)
  y = np.tanh(x @ teacher) @ rng.standard_normal((64, 1)) + 0.1 * rng.standard_normal((4096, 1))
  init = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
  params = {"w1": init(32, 128), "b1": np.zeros(128, np.float32), "w2": init(128, 128)}
  params.update(b2=np.zeros(128, np.float32), w3=init(128, 1))
  return jnp.asarray(x), jnp.asarray(y, jnp.float32), jax.tree.map(jnp.asarray, params)


def _loss(p, x, y):
  h = jax.nn.gelu(x @ p["w1"] + p["b1"])
  h = jax.nn.gelu(h @ p["w2"] + p["b2"])
  return jnp.mean((h @ p["w3"] - y) ** 2)


def _train(tx, params, state, x, y, steps, seed):
  @jax.jit
  def step(p, s, batch):
    updates, s = tx.update(jax.grad(_loss)(p, x[batch], y[batch]), s, p)
    p = optax.apply_updates(p, updates)
    return p, s, _loss(p, x, y)

  rng = np.random.default_rng(seed)
  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state, rng.integers(0, x.shape[0], 128))
    losses.append(float(loss))
  return params, state, np.asarray(losses)


def test_switching_from_adamw_warm_continues_the_run_and_cold_falls_behind():
  """500 AdamW steps, then 50 of Adafactor (same step size, β1 = b1, factored
  from 32) from a warm and from a cold state, against 50 more of AdamW on the
  same batches. Measured over 6 seeds: the warm run's loss stays within
  0.002-0.013 of AdamW's and averages +0.0003..+0.0012 above it; the cold run
  averages +0.007..+0.010 above it, at most 0.017-0.027 away."""
  x, y, params = _regression_problem()
  adamw = optax.adamw(1e-3, weight_decay=1e-4)
  params, adam_state, _ = _train(adamw, params, adamw.init(params), x, y, 500, seed=10)
  at_switch = float(_loss(params, x, y))
  _, _, continued = _train(adamw, params, adam_state, x, y, 50, seed=20)
  tx = adafactor_jax.adafactor(
    1e-3, multiply_by_parameter_scale=False, momentum=0.9, min_dim_size_to_factor=32
  )
  _, _, cold = _train(tx, params, tx.init(params), x, y, 50, seed=20)
  _, _, warm = _train(
    tx, params, warm_start_state(tx, params=params, source_state=adam_state), x, y, 50, seed=20
  )

  cold_excess, warm_excess = np.mean(cold - continued), np.mean(warm - continued)
  print(
    f"\nloss above AdamW's over 50 steps after the switch: cold {cold_excess:+.4f} "
    f"(at most {np.max(np.abs(cold - continued)):.4f}), warm {warm_excess:+.4f} "
    f"(at most {np.max(np.abs(warm - continued)):.4f}); largest jump over the loss at the "
    f"switch: AdamW {continued.max() - at_switch:+.4f}, cold {cold.max() - at_switch:+.4f}, "
    f"warm {warm.max() - at_switch:+.4f}"
  )
  assert cold_excess > 0.004
  assert abs(warm_excess) < 0.25 * cold_excess
  assert np.max(np.abs(warm - continued)) < np.max(np.abs(cold - continued))


def _within_half_a_grid_step(node: adafactor_jax.Int8MomentumState, expected: dict) -> None:
  """int8 momentum holds ``expected`` rounded to its block grids (32 along the last axis)."""
  for k, want in expected.items():
    stored = np.asarray(dequantize(node.momentum[k], node.scale[k]), np.float64)
    step = np.asarray(dequantize(jnp.ones_like(node.momentum[k]), node.scale[k]), np.float64)
    want = np.asarray(want, np.float64)
    assert np.all(np.abs(stored - want) <= 0.5 * step * (1 + 1e-5) + 1e-12 * np.abs(want)), k
    assert np.any(stored != 0), k


def test_int8_momentum_is_the_float32_warm_start_quantized_and_reads_back_as_its_values():
  params = make_params()
  int8 = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8)
  float32 = adafactor_jax.adafactor(momentum=0.9)
  # From Adam (through the probe that updates the momentum) and from float32 momentum
  # (copied): the float32 target's momentum, quantized.
  adam = _adam_state(params, 40)
  warm = the_node(
    warm_start_state(int8, params=params, source_state=adam), adafactor_jax.Int8MomentumState
  )
  _within_half_a_grid_step(
    warm, _momentum(warm_start_state(float32, params=params, source_state=adam))
  )
  _, source = run_optax(float32, params, [make_grads(params, step) for step in range(3)])
  copied = the_node(
    warm_start_state(int8, params=params, source_state=source), adafactor_jax.Int8MomentumState
  )
  _within_half_a_grid_step(copied, _momentum(source))
  # Back to float32: the int8 state's values, exactly.
  _, int8_source = run_optax(int8, params, [make_grads(params, step) for step in range(3)])
  node = the_node(int8_source, adafactor_jax.Int8MomentumState)
  back = _momentum(warm_start_state(float32, params=params, source_state=int8_source))
  for k in params:
    np.testing.assert_array_equal(back[k], dequantize(node.momentum[k], node.scale[k]))
  # int8 to int8: the same values; the scales, re-taken from 127 q s, within a float32 rounding.
  again = warm_start_state(int8, params=params, source_state=int8_source)
  assert_bit_identical(
    the_node(again, adafactor_jax.Int8MomentumState).momentum, node.momentum, "int8 values"
  )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-7, atol=0),
    the_node(again, adafactor_jax.Int8MomentumState).scale,
    node.scale,
  )
