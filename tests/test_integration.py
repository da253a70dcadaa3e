"""adafactor_jax where an optax user puts it: wrappers, chains, Flax NNX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from tests.conftest import assert_bit_identical, assert_tree_allclose

# --------------------------------------------------------------------------
# Helpers.


def _rand_tree(shapes: dict, seed: int, scale: float = 1.0, dtype=jnp.float32) -> dict:
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(scale * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _np_factored_step(grad, v_row, v_col, beta2, eps1=1e-30, dims=None):
  """float64 NumPy Adafactor second-moment step; dims=(row, col) or None."""
  g = np.asarray(grad, np.float64)
  g2 = g * g + eps1
  if dims is None:
    v = beta2 * v_row + (1 - beta2) * g2
    return g / np.sqrt(v), v, None
  row, col = dims
  v_row = beta2 * v_row + (1 - beta2) * g2.mean(axis=col, keepdims=True)
  v_col = beta2 * v_col + (1 - beta2) * g2.mean(axis=row, keepdims=True)
  v_hat = v_row * v_col / v_row.mean(axis=row, keepdims=True)
  return g / np.sqrt(v_hat), v_row, v_col


# --------------------------------------------------------------------------
# optax.inject_hyperparams.


INJECT_SHAPES = {"kernel": (256, 192), "bias": (192,), "conv": (3, 3, 128, 256)}


def test_inject_hyperparams_matches_plain_and_lr_is_live():
  params = _rand_tree(INJECT_SHAPES, 0, 0.05)
  injected = optax.inject_hyperparams(adafactor_jax.adafactor)(learning_rate=1e-2)
  plain = adafactor_jax.adafactor(learning_rate=1e-2)
  state = injected.init(params)  # outside jit
  plain_state = plain.init(params)
  # The factored choice is made from the concrete min_dim_size_to_factor.
  stats = state.inner_state[0]
  assert stats.v["kernel"] is None and stats.v["conv"] is None  # factored
  assert stats.v_row["conv"].shape == (3, 3, 128, 1)
  assert stats.v_col["conv"].shape == (3, 3, 1, 256)
  assert stats.v["bias"].shape == INJECT_SHAPES["bias"] and stats.v_row["bias"] is None

  update = jax.jit(injected.update)  # no static_args
  plain_update = jax.jit(plain.update)
  p, q = params, params
  for step in range(4):
    grads = _rand_tree(INJECT_SHAPES, 100 + step, 10.0 ** (step - 2))
    u, state = update(grads, state, p)
    v, plain_state = plain_update(grads, plain_state, q)
    assert_tree_allclose(u, v, rtol=1e-6, atol=1e-12)
    p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
  assert_tree_allclose(p, q, rtol=1e-6, atol=1e-9)
  assert_tree_allclose(state.inner_state, plain_state, rtol=1e-6, atol=0)
  assert int(state.count) == 4

  # Changing the injected learning rate changes the step, linearly: the step
  # size is applied after the clipping.
  grads = _rand_tree(INJECT_SHAPES, 200, 0.3)
  u_default, _ = update(grads, state, p)
  halved = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(5e-3)})
  u_halved, new_state = update(grads, halved, p)
  assert float(new_state.hyperparams["learning_rate"]) == pytest.approx(5e-3)
  for a, b in zip(jax.tree.leaves(u_halved), jax.tree.leaves(u_default), strict=True):
    assert np.any(np.asarray(a) != np.asarray(b))
    np.testing.assert_allclose(a, 0.5 * np.asarray(b), rtol=1e-6, atol=1e-12)
  # The same through the mutable dict, as the optax docs do it.
  state.hyperparams["learning_rate"] = 2e-2
  u_doubled, _ = update(grads, state, p)
  assert_tree_allclose(u_doubled, jax.tree.map(lambda x: 2 * x, u_default), rtol=1e-6, atol=1e-12)


def test_inject_hyperparams_schedule_and_other_hyperparams():
  shapes = {"kernel": (130, 140), "bias": (140,)}
  params = _rand_tree(shapes, 1, 0.1)
  schedule = optax.linear_schedule(1e-2, 1e-3, 3)
  injected = optax.inject_hyperparams(adafactor_jax.adafactor)(
    learning_rate=schedule, clipping_threshold=0.5, decay_rate=0.7
  )
  state = injected.init(params)
  update = jax.jit(injected.update)
  for step in range(3):
    grads = _rand_tree(shapes, 10 + step)
    expected_lr = float(schedule(step))
    reference = adafactor_jax.adafactor(
      learning_rate=expected_lr, clipping_threshold=0.5, decay_rate=0.7
    )
    ref_updates, _ = reference.update(grads, state.inner_state, params)
    updates, state = update(grads, state, params)
    # hyperparams hold the values this step used.
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(expected_lr)
    assert_tree_allclose(updates, ref_updates, rtol=1e-5, atol=1e-12)
  # clipping_threshold is live too.
  state.hyperparams["clipping_threshold"] = 1e6
  grads = _rand_tree(shapes, 99)
  updates, _ = update(grads, state, params)
  outs = {}
  for threshold in (1e6, 0.5):
    reference = adafactor_jax.adafactor(
      learning_rate=float(schedule(3)), clipping_threshold=threshold, decay_rate=0.7
    )
    outs[threshold], _ = reference.update(grads, state.inner_state, params)
  assert_tree_allclose(updates, outs[1e6], rtol=1e-5, atol=1e-12)
  assert not np.allclose(updates["kernel"], outs[0.5]["kernel"], rtol=1e-3)


# --------------------------------------------------------------------------
# optax.MultiSteps with bfloat16 parameters (optax #377).


def test_multisteps_bfloat16():
  shapes = {"w": (160, 130), "b": (130,), "s": ()}
  params = _rand_tree(shapes, 0, 1.0, jnp.bfloat16)
  grads = [_rand_tree(shapes, 10 + i, 1.0, jnp.bfloat16) for i in range(6)]
  tx = optax.MultiSteps(adafactor_jax.adafactor(), every_k_schedule=3)
  state = tx.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  inner_stats = state.inner_opt_state[0]
  assert inner_stats.v["w"] is None  # factored
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(inner_stats[1:]))

  @jax.jit
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, u

  history = [params]
  emitted = []
  p = params
  for i in range(6):
    p, state, u = step(p, state, grads[i])
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.inner_opt_state[0][1:]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    if i % 3 == 2:
      for new, old in zip(jax.tree.leaves(p), jax.tree.leaves(history[-1]), strict=True):
        assert np.any(np.asarray(new) != np.asarray(old))
      emitted.append(u)
    else:
      assert_bit_identical(p, history[-1])
    history.append(p)
  assert int(state.gradient_step) == 2
  assert int(state.inner_opt_state[0].count) == 2

  # The first emitted step is adafactor's step on the mean of the 3 gradients.
  reference = adafactor_jax.adafactor()
  mean = jax.tree.map(
    lambda *g: jnp.asarray(np.mean([np.asarray(x, np.float64) for x in g], axis=0), jnp.bfloat16),
    *grads[:3],
  )
  ref_u, ref_state = reference.update(mean, reference.init(params), params)
  for a, b in zip(jax.tree.leaves(emitted[0]), jax.tree.leaves(ref_u), strict=True):
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(
      np.asarray(a, np.float64), b, rtol=2**-6, atol=2**-8 * np.max(np.abs(b))
    )
  # The second one continues from the reference's statistics.
  ref_p = optax.apply_updates(params, ref_u)
  mean2 = jax.tree.map(
    lambda *g: jnp.asarray(np.mean([np.asarray(x, np.float64) for x in g], axis=0), jnp.bfloat16),
    *grads[3:],
  )
  ref_u2, _ = reference.update(mean2, ref_state, ref_p)
  for a, b in zip(jax.tree.leaves(emitted[1]), jax.tree.leaves(ref_u2), strict=True):
    b = np.asarray(b, np.float64)
    np.testing.assert_allclose(
      np.asarray(a, np.float64), b, rtol=2**-5, atol=2**-7 * np.max(np.abs(b))
    )


# --------------------------------------------------------------------------
# optax combinators.


CHAIN_SHAPES = {"a": {"w": (140, 130), "b": (130,)}, "c": {"w": (4, 5)}}


def _chain_tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(scale * rng.standard_normal(s), jnp.float32),
    CHAIN_SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def test_chain_with_clip_by_global_norm():
  params = _chain_tree(0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), adafactor_jax.adafactor(learning_rate=1e-2))
  plain = adafactor_jax.adafactor(learning_rate=1e-2)
  state, plain_state = tx.init(params), plain.init(params)
  for step in range(3):
    grads = _chain_tree(10 + step, 5.0)
    norm = float(optax.tree.norm(grads))
    assert norm > 1.0
    clipped = jax.tree.map(lambda g, n=norm: g / n, grads)
    updates, state = jax.jit(tx.update)(grads, state, params)
    ref_updates, plain_state = plain.update(clipped, plain_state, params)
    assert_tree_allclose(updates, ref_updates, rtol=1e-5, atol=1e-10)
    params = optax.apply_updates(params, updates)
  # The clipping matters: adafactor on the raw gradient differs after step 1.
  raw, _ = plain.update(_chain_tree(50, 5.0), plain_state, params)
  clipped_updates, _ = tx.update(_chain_tree(50, 5.0), state, params)
  assert any(
    not np.allclose(a, b, rtol=1e-3)
    for a, b in zip(jax.tree.leaves(raw), jax.tree.leaves(clipped_updates), strict=True)
  )


def test_masked():
  params = _chain_tree(0)
  grads = _chain_tree(1)
  mask = {"a": {"w": True, "b": False}, "c": {"w": True}}
  tx = optax.masked(adafactor_jax.adafactor(min_dim_size_to_factor=1), mask)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  # optax.masked passes the masked-out updates through untouched.
  assert_bit_identical(updates["a"]["b"], grads["a"]["b"])
  sub = {"a": {"w": params["a"]["w"]}, "c": {"w": params["c"]["w"]}}
  sub_grads = {"a": {"w": grads["a"]["w"]}, "c": {"w": grads["c"]["w"]}}
  plain = adafactor_jax.adafactor(min_dim_size_to_factor=1)
  ref, _ = plain.update(sub_grads, plain.init(sub), sub)
  assert_tree_allclose(updates["a"]["w"], ref["a"]["w"], rtol=1e-6, atol=1e-12)
  assert_tree_allclose(updates["c"]["w"], ref["c"]["w"], rtol=1e-6, atol=1e-12)
  assert not np.allclose(updates["a"]["w"], grads["a"]["w"])


def test_multi_transform():
  params = _chain_tree(0)
  labels = {"a": {"w": "a", "b": "a"}, "c": {"w": "b"}}
  tx = optax.multi_transform({"a": adafactor_jax.adafactor(), "b": optax.sgd(0.1)}, labels)
  plain = adafactor_jax.adafactor()
  state, plain_state = tx.init(params), plain.init(params["a"])
  update = jax.jit(tx.update)
  for step in range(3):
    grads = _chain_tree(10 + step)
    updates, state = update(grads, state, params)
    ref, plain_state = plain.update(grads["a"], plain_state, params["a"])
    assert_tree_allclose(updates["a"], ref, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(updates["c"]["w"], -0.1 * np.asarray(grads["c"]["w"]), rtol=1e-6)
    params = optax.apply_updates(params, updates)


def test_apply_if_finite_skips_nan_step():
  params = _chain_tree(0)
  tx = optax.apply_if_finite(adafactor_jax.adafactor(), 3)
  plain = adafactor_jax.adafactor()
  state = tx.init(params)
  update = jax.jit(tx.update)
  good = _chain_tree(1)
  updates, state = update(good, state, params)
  ref, ref_state = plain.update(good, plain.init(params), params)
  assert_tree_allclose(updates, ref, rtol=1e-6, atol=1e-12)
  params = optax.apply_updates(params, updates)

  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), _chain_tree(2))
  before = state
  updates, state = update(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
  assert_bit_identical(state.inner_state, before.inner_state)
  assert int(state.notfinite_count) == 1
  assert int(state.total_notfinite) == 1

  good2 = _chain_tree(3)
  updates, state = update(good2, state, params)
  ref2, _ = plain.update(good2, ref_state, params)
  assert_tree_allclose(updates, ref2, rtol=1e-6, atol=1e-12)
  assert int(state.notfinite_count) == 0


# --------------------------------------------------------------------------
# Each transformation alone, against NumPy.


def test_scale_by_factored_rms_alone_matches_numpy():
  shapes = {"m": (6, 5), "t": (3, 7, 4), "v": (5,), "s": ()}
  params = _rand_tree(shapes, 0)
  tx = optax.chain(adafactor_jax.scale_by_factored_rms(min_dim_size_to_factor=4))
  state = tx.init(params)
  dims = {"m": (0, 1), "t": (1, 2), "v": None, "s": None}
  stats = {
    k: (np.zeros(np.shape(params[k])), None)
    if dims[k] is None
    else (
      np.zeros([1 if i == dims[k][1] else n for i, n in enumerate(shapes[k])]),
      np.zeros([1 if i == dims[k][0] else n for i, n in enumerate(shapes[k])]),
    )
    for k in shapes
  }
  for step in range(3):
    grads = _rand_tree(shapes, 10 + step, 10.0 ** (step - 1))
    grads["m"] = grads["m"].at[2].set(0.0)  # an all-zero row
    updates, state = jax.jit(tx.update)(grads, state, params)
    beta2 = 1.0 - (step + 1.0) ** -0.8
    for k in shapes:
      expected, v_row, v_col = _np_factored_step(grads[k], *stats[k], beta2, dims=dims[k])
      stats[k] = (v_row, v_col)
      np.testing.assert_allclose(updates[k], expected, rtol=2e-5, atol=1e-30, err_msg=k)
      if dims[k] is None:
        np.testing.assert_allclose(state[0].v[k], v_row, rtol=2e-5, err_msg=k)
      else:
        np.testing.assert_allclose(state[0].v_row[k], v_row, rtol=2e-5, err_msg=k)
        np.testing.assert_allclose(state[0].v_col[k], v_col, rtol=2e-5, err_msg=k)
  assert int(state[0].count) == 3


@pytest.mark.parametrize(
  "warmup_init, count, expected",
  [
    (False, 0, 1e-2),
    (False, 9_999, 1e-2),
    (False, 39_999, 1 / np.sqrt(40_000)),
    (True, 0, 1e-6),
    (True, 4, 5e-6),
    (True, 10**6, 1 / np.sqrt(10**6 + 1)),
  ],
)
def test_relative_step_size_alone_matches_numpy(warmup_init, count, expected):
  updates = {"w": jnp.asarray([[1.0, -2.0], [3.0, 0.5]], jnp.float32)}
  tx = optax.chain(
    optax.scale_by_learning_rate(adafactor_jax.relative_step_size(warmup_init=warmup_init))
  )
  (state,) = tx.init(updates)
  state = state._replace(count=jnp.asarray(count, jnp.int32))
  out, (new_state,) = jax.jit(tx.update)(updates, (state,))
  np.testing.assert_allclose(out["w"], -expected * np.asarray(updates["w"]), rtol=1e-6)
  assert int(new_state.count) == count + 1


def test_relative_step_size_max_step_size():
  schedule = adafactor_jax.relative_step_size(max_step_size=0.3)
  counts = np.arange(20)
  expected = np.minimum(0.3, 1 / np.sqrt(counts + 1))
  np.testing.assert_allclose(jax.vmap(schedule)(counts), expected, rtol=1e-6)


# --------------------------------------------------------------------------
# Flax NNX.


def _nnx():
  return pytest.importorskip("flax.nnx")


def _make_mlp(nnx, rngs, din=4, hidden=16):
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(din, hidden, rngs=rngs)
      self.l2 = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, x):
      return self.l2(jax.nn.relu(self.l1(x)))

  return MLP(rngs)


def _regression_data(din=4, n=64):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, din)).astype(np.float32)
  w = rng.standard_normal((din, 1)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(x @ w + 0.5)


@pytest.mark.parametrize(
  "kwargs, factor",
  [({}, 0.5), ({"learning_rate": 3e-2}, 0.05)],
  ids=["relative_step", "lr=3e-2"],
)
def test_nnx_optimizer_training_reduces_loss(kwargs, factor):
  nnx = _nnx()
  model = _make_mlp(nnx, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, adafactor_jax.adafactor(**kwargs), wrt=nnx.Param)
  x, y = _regression_data()

  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)

  @nnx.jit
  def train_step(m, opt):
    loss, grads = nnx.value_and_grad(loss_fn)(m)
    opt.update(m, grads)
    return loss

  initial = float(loss_fn(model))
  losses = [float(train_step(model, optimizer)) for _ in range(40)]
  final = float(loss_fn(model))
  assert losses[0] == pytest.approx(initial, rel=1e-6)
  assert np.all(np.isfinite(losses))
  assert final < factor * initial
  assert losses[20] < losses[0]
  assert int(optimizer.step[...]) == 40


@pytest.mark.parametrize(
  "kwargs, factored",
  [({}, False), ({"learning_rate": 1e-2, "min_dim_size_to_factor": 1}, True)],
  ids=["defaults", "factored kernels"],
)
def test_nnx_optimizer_steps_equal_optax(kwargs, factored):
  """nnx.Optimizer carries the state between steps exactly as plain optax does."""
  nnx = _nnx()
  model = _make_mlp(nnx, nnx.Rngs(1))
  tx = adafactor_jax.adafactor(**kwargs)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x, y = _regression_data()

  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)

  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = tx.init(params)
  assert (state[0].v["l1"]["kernel"] is None) == factored
  pure_update = jax.jit(tx.update)
  nnx_update = nnx.jit(lambda m, o, g: o.update(m, g))
  for _ in range(3):
    grads = nnx.grad(loss_fn)(model)
    pure_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
    updates, state = pure_update(pure_grads, state, params)
    params = optax.apply_updates(params, updates)
    nnx_update(model, optimizer, grads)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    assert_tree_allclose(after, params, rtol=1e-6, atol=1e-9)
    assert any(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))
