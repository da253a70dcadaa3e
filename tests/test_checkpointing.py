"""Orbax checkpoints of adafactor states, and training under Flax NNX and Flax Linen.

A checkpoint is only useful if resuming from it is indistinguishable from never
having stopped: every leaf must come back bit-identical and in its dtype, the
``None`` statistics of factored and unfactored parameters must stay where they
were, and training on from the restored state must give bit-identical results.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from tests.conftest import assert_bit_identical, bits, changed

ocp = pytest.importorskip("orbax.checkpoint")
nnx = pytest.importorskip("flax.nnx")
nn = pytest.importorskip("flax.linen")
train_state = pytest.importorskip("flax.training.train_state")

# --------------------------------------------------------------------------
# Helpers.


def _is_none(x) -> bool:
  return x is None


def _none_mask(tree):
  """The tree with True where it holds None and False at every array leaf."""
  return jax.tree.map(_is_none, tree, is_leaf=_is_none)


def _assert_bit_identical(actual, expected):
  """Bit-identical, with the None statistics in the same places."""
  assert _none_mask(actual) == _none_mask(expected)
  assert_bit_identical(actual, expected)


def _find(tree, cls):
  """Every node of type cls in tree (NamedTuple states inside optax chains)."""
  found = []

  def visit(x):
    if isinstance(x, cls):
      found.append(x)
    return isinstance(x, cls)

  jax.tree.leaves(tree, is_leaf=visit)
  return found


# --------------------------------------------------------------------------
# Plain optax states through orbax.


def _param_tree(dtype):
  rng = np.random.default_rng(0)
  shapes = {
    "kernel": (256, 192),  # factored
    "bias": (192,),  # a vector: full second moment
    "small": (8, 16),  # below min_dim_size_to_factor: full second moment
  }
  return {k: jnp.asarray(0.05 * rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _grads(params, step: int, nan: bool = False):
  rng = np.random.default_rng([7, step])
  grads = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in params.items()}
  if nan:
    grads["kernel"][3, 5] = np.nan
  return {k: jnp.asarray(g, params[k].dtype) for k, g in grads.items()}


@jax.jit(static_argnums=0)
def _optax_step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


CONFIGS = {
  "defaults": ({}, jnp.float32),
  "momentum_bf16": ({"momentum": 0.9, "momentum_dtype": jnp.bfloat16}, jnp.bfloat16),
  # int8 values and their float32 block scales, both in the state.
  "momentum_int8": ({"momentum": 0.9, "momentum_dtype": jnp.int8}, jnp.float32),
  "skip_nonfinite": ({"skip_nonfinite": True}, jnp.float32),
  # The PRNG key in the state must come back too, or the resumed rounding differs.
  "stochastic_rounding_bf16": ({"stochastic_rounding": True, "rounding_seed": 3}, jnp.bfloat16),
  # The figures must come back too, and be read from the restored state.
  "telemetry_skip_nonfinite": ({"telemetry": True, "skip_nonfinite": True}, jnp.float32),
}
# Built once: tx is a static argument of _optax_step, one compilation each.
TXS = {name: adafactor_jax.adafactor(**kwargs) for name, (kwargs, _) in CONFIGS.items()}
# The steps whose gradients hold a NaN (only fed to the skip_nonfinite config).
NAN_STEPS = {1, 5}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_orbax_round_trip_is_bit_exact_and_training_resumes_identically(name, tmp_path):
  kwargs, dtype = CONFIGS[name]
  skip = kwargs.get("skip_nonfinite", False)
  tx = TXS[name]
  params = _param_tree(dtype)
  state = tx.init(params)
  initial_state = state
  for step in range(4):
    grads = _grads(params, step, nan=skip and step in NAN_STEPS)
    params, state = _optax_step(tx, params, state, grads)

  # The states hold what the test is about, so a bit-exact match means something.
  stats = _find(state, adafactor_jax.ScaleByFactoredRmsState)
  assert len(stats) == 1
  stats = stats[0]
  assert int(stats.count) == (3 if skip else 4)
  assert stats.v["kernel"] is None and stats.v_row["kernel"].shape == (256, 1)
  assert stats.v_col["kernel"].shape == (1, 192)
  for key in ("bias", "small"):
    assert stats.v_row[key] is None and stats.v_col[key] is None
    assert stats.v[key].shape == params[key].shape
  assert changed(state, initial_state)
  for leaf in jax.tree.leaves(params):
    assert leaf.dtype == dtype
  if kwargs.get("momentum"):
    int8 = kwargs["momentum_dtype"] == jnp.int8
    kind = adafactor_jax.Int8MomentumState if int8 else adafactor_jax.EmaMomentumState
    (momentum,) = _find(state, kind)
    for leaf in jax.tree.leaves(momentum.momentum):
      assert leaf.dtype == kwargs["momentum_dtype"]
      assert np.any(np.asarray(leaf, np.float32) != 0)
    if int8:
      assert momentum.scale["kernel"].shape == (1, 192)  # a block per column of 256
      assert all(np.all(np.asarray(s) > 0) for s in jax.tree.leaves(momentum.scale))
  if skip:
    assert isinstance(state, adafactor_jax.SkipNonfiniteState)
    assert int(state.skipped_steps) == 1
  if kwargs.get("stochastic_rounding"):
    (rounding,) = _find(state, adafactor_jax.StochasticRoundingState)
    assert not np.array_equal(rounding.key, jax.random.PRNGKey(3))

  tree = {"params": params, "opt_state": state}
  # As adafactor_jax.train does: a CheckpointManager and StandardSave.
  with ocp.CheckpointManager(
    tmp_path / "managed",
    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
  ) as manager:
    manager.save(4, args=ocp.args.StandardSave(tree))
    manager.wait_until_finished()
  # And a bare StandardCheckpointer.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "standard", tree)
  checkpointer.wait_until_finished()

  # Restore the way a resumed job does: nothing but shapes and dtypes in hand.
  fresh_params = _param_tree(dtype)
  target = {
    "params": jax.eval_shape(lambda: fresh_params),
    "opt_state": jax.eval_shape(tx.init, fresh_params),
  }
  with ocp.CheckpointManager(tmp_path / "managed") as manager:
    assert manager.latest_step() == 4
    restored = manager.restore(4, args=ocp.args.StandardRestore(target))
  # A target made from the live arrays must do the same.
  restored_standard = checkpointer.restore(
    tmp_path / "standard", jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  )
  checkpointer.close()

  _assert_bit_identical(restored, tree)
  _assert_bit_identical(restored_standard, tree)
  if kwargs.get("telemetry"):
    figures = adafactor_jax.telemetry(state)
    assert float(figures["kernel/rms_update_before_clipping"]) > 0
    assert int(figures["skipped_steps"]) == 1
    assert_bit_identical(adafactor_jax.telemetry(restored["opt_state"]), figures)
  assert type(restored["opt_state"]) is type(state)
  (restored_stats,) = _find(restored["opt_state"], adafactor_jax.ScaleByFactoredRmsState)
  assert restored_stats.v["kernel"] is None and restored_stats.v_row["bias"] is None

  # Train on from both: the restored run cannot be told from the uninterrupted one.
  params_a, state_a = params, state
  params_b, state_b = restored["params"], restored["opt_state"]
  for step in range(4, 7):
    grads = _grads(params, step, nan=skip and step in NAN_STEPS)
    params_a, state_a = _optax_step(tx, params_a, state_a, grads)
    params_b, state_b = _optax_step(tx, params_b, state_b, grads)
  assert changed(params_a, params)
  _assert_bit_identical(params_b, params_a)
  _assert_bit_identical(state_b, state_a)
  if skip:
    assert int(state_b.skipped_steps) == 2


def test_an_int8_checkpoint_of_the_old_blocks_of_32_is_refused_not_misread(tmp_path):
  """int8 momentum's scales were one per 32 elements along the last axis, now one per line
  along the longest axis: a checkpoint of the old layout restored into today's state is
  refused by Orbax (shapes differ); restored as written, the update refuses it, naming the
  parameter. (A row of 16, one block before and now, reads the same.)"""
  tx = TXS["momentum_int8"]
  params = _param_tree(jnp.float32)
  state = tx.init(params)
  (node,) = _find(state, adafactor_jax.Int8MomentumState)
  old_blocks = {k: p.shape[-1] // 32 if p.shape[-1] % 32 == 0 else 1 for k, p in params.items()}
  old_scales = {k: jnp.ones((*p.shape[:-1], old_blocks[k])) for k, p in params.items()}
  old = jax.tree.map(
    lambda x: x._replace(scale=old_scales) if x is node else x, state, is_leaf=lambda x: x is node
  )
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "old", old)
  checkpointer.wait_until_finished()
  refusal = r"'bias' have shape \(6,\).*blocks of 32.*tx\.init"
  try:
    into_today = checkpointer.restore(tmp_path / "old", jax.eval_shape(tx.init, params))
  except ValueError as e:
    assert "not compatible with the stored shape" in str(e)
  else:  # Orbax 0.11.17 (the floor) restores the stored shapes: the update refuses them
    with pytest.raises(ValueError, match=refusal):
      tx.update(_grads(params, 0), into_today, params)
  restored = checkpointer.restore(
    tmp_path / "old", jax.tree.map(ocp.utils.to_shape_dtype_struct, old)
  )
  checkpointer.close()
  with pytest.raises(ValueError, match=refusal):
    tx.update(_grads(params, 0), restored, params)


# --------------------------------------------------------------------------
# Flax NNX.


class _NnxMlp(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(16, 192, rngs=rngs)  # 16 x 192: unfactored
    self.l2 = nnx.Linear(192, 128, rngs=rngs)  # 192 x 128: factored
    self.l3 = nnx.Linear(128, 1, rngs=rngs)

  def __call__(self, x):
    return self.l3(jax.nn.relu(self.l2(jax.nn.relu(self.l1(x)))))


# One transformation for every optimizer: tx is static in the graph that nnx.jit
# caches on, so a new instance per optimizer would mean a new compilation.
_NNX_TX = adafactor_jax.adafactor()


def _nnx_build(seed):
  model = _NnxMlp(nnx.Rngs(seed))
  return model, nnx.Optimizer(model, _NNX_TX, wrt=nnx.Param)


def _regression_data(din=16, n=64):
  rng = np.random.default_rng(3)
  x = rng.standard_normal((n, din)).astype(np.float32)
  y = np.sin(x[:, :1]) + 0.5 * x[:, 1:2]
  return jnp.asarray(x), jnp.asarray(y, jnp.float32)


def _nnx_loss(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def _nnx_train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
  optimizer.update(model, grads)
  return loss


def _nnx_snapshot(model, optimizer):
  """Copies of the model's and the optimizer's arrays (nnx updates in place)."""
  return jax.tree.map(np.array, nnx.as_pure((nnx.state(model), nnx.state(optimizer))))


@pytest.mark.parametrize("how", ["abstract_merge", "pure_dict"])
def test_nnx_optimizer_checkpoint_round_trip(how, tmp_path):
  x, y = _regression_data()
  model, optimizer = _nnx_build(0)
  stats = optimizer.opt_state[0]
  assert isinstance(stats, adafactor_jax.ScaleByFactoredRmsState)
  assert stats.v["l2"]["kernel"].get_value() is None  # factored
  assert stats.v_row["l1"]["kernel"].get_value() is None  # unfactored
  losses = [float(_nnx_train_step(model, optimizer, x, y)) for _ in range(3)]
  assert losses[-1] < losses[0]
  assert int(optimizer.step[...]) == 3
  saved = _nnx_snapshot(model, optimizer)

  checkpointer = ocp.StandardCheckpointer()
  if how == "abstract_merge":
    # Flax's documented way: save the states, restore into abstract ones.
    checkpointer.save(
      tmp_path / "ckpt", {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    )
    checkpointer.wait_until_finished()
    abstract_model, abstract_optimizer = nnx.eval_shape(lambda: _nnx_build(1))
    model_def, model_target = nnx.split(abstract_model)
    optimizer_def, optimizer_target = nnx.split(abstract_optimizer)
    restored = checkpointer.restore(
      tmp_path / "ckpt", {"model": model_target, "optimizer": optimizer_target}
    )
    new_model = nnx.merge(model_def, restored["model"])
    new_optimizer = nnx.merge(optimizer_def, restored["optimizer"])
  else:
    # Pure dicts, restored without a target, put into a freshly built pair.
    checkpointer.save(
      tmp_path / "ckpt",
      {
        "model": nnx.to_pure_dict(nnx.state(model)),
        "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
      },
    )
    checkpointer.wait_until_finished()
    restored = nnx.restore_int_paths(checkpointer.restore(tmp_path / "ckpt"))
    new_model, new_optimizer = _nnx_build(1)
    assert changed(nnx.state(new_model), saved[0])  # a different initialisation
    for obj, pure in ((new_model, restored["model"]), (new_optimizer, restored["optimizer"])):
      state = nnx.state(obj)
      nnx.replace_by_pure_dict(state, pure)
      nnx.update(obj, state)
  checkpointer.close()

  _assert_bit_identical(_nnx_snapshot(new_model, new_optimizer), saved)
  new_stats = new_optimizer.opt_state[0]
  assert isinstance(new_stats, adafactor_jax.ScaleByFactoredRmsState)
  assert new_stats.v["l2"]["kernel"].get_value() is None
  assert new_stats.v_col["l2"]["kernel"].get_value().shape == (1, 128)
  assert int(new_optimizer.step[...]) == 3

  for _ in range(3):
    loss_a = _nnx_train_step(model, optimizer, x, y)
    loss_b = _nnx_train_step(new_model, new_optimizer, x, y)
    assert np.array_equal(bits(loss_a), bits(loss_b))
  after = _nnx_snapshot(model, optimizer)
  assert changed(after[0], saved[0])
  _assert_bit_identical(_nnx_snapshot(new_model, new_optimizer), after)
  assert int(new_optimizer.step[...]) == 6


# --------------------------------------------------------------------------
# Flax Linen with flax.training.train_state.TrainState.


class _LinenMlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(192)(x))  # 16 x 192: unfactored
    x = nn.relu(nn.Dense(128)(x))  # 192 x 128: factored
    return nn.Dense(1)(x)


_LINEN_MODEL = _LinenMlp()


def _linen_state(seed, tx):
  x, _ = _regression_data()
  params = _LINEN_MODEL.init(jax.random.key(seed), x)["params"]
  state = train_state.TrainState.create(apply_fn=_LINEN_MODEL.apply, params=params, tx=tx)
  # A strongly typed step (create() sets a Python 0), as a restored one is, so that
  # the live and the restored state share one compilation of the train step.
  return state.replace(step=jnp.zeros([], jnp.int32))


_LINEN_TRACES = []


@jax.jit
def _linen_train_step(state, x, y):
  _LINEN_TRACES.append(jax.tree.map(lambda a: (a.shape, a.dtype), state.opt_state))

  def loss_fn(params):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def _linen_arrays(state):
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


@pytest.mark.parametrize(
  "kwargs",
  [{}, {"momentum": 0.9, "momentum_dtype": jnp.bfloat16}],
  ids=["defaults", "momentum_bf16"],
)
def test_linen_train_state_trains_and_checkpoints(kwargs, tmp_path):
  x, y = _regression_data()
  tx = adafactor_jax.adafactor(**kwargs)
  state = _linen_state(0, tx)
  (stats,) = _find(state.opt_state, adafactor_jax.ScaleByFactoredRmsState)
  assert stats.v["Dense_1"]["kernel"] is None  # factored
  assert stats.v_row["Dense_0"]["kernel"] is None  # unfactored
  initial_loss = float(jnp.mean((_LINEN_MODEL.apply({"params": state.params}, x) - y) ** 2))

  _LINEN_TRACES.clear()
  losses = []
  for _ in range(20):
    state, loss = _linen_train_step(state, x, y)
    losses.append(float(loss))
    if kwargs:
      (momentum,) = _find(state.opt_state, adafactor_jax.EmaMomentumState)
      assert {leaf.dtype for leaf in jax.tree.leaves(momentum)} == {jnp.dtype(jnp.bfloat16)}
  # The state keeps its dtypes from step to step: one trace, no retracing.
  assert len(_LINEN_TRACES) == 1
  assert losses[0] == pytest.approx(initial_loss, rel=1e-5)
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.25 * losses[0]
  assert losses[10] < losses[0]
  assert int(state.step) == 20
  (stats,) = _find(state.opt_state, adafactor_jax.ScaleByFactoredRmsState)
  assert int(stats.count) == 20
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.float32
  if kwargs:
    (momentum,) = _find(state.opt_state, adafactor_jax.EmaMomentumState)
    assert all(np.any(np.asarray(m, np.float32) != 0) for m in jax.tree.leaves(momentum))

  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  # The target carries apply_fn and tx (static fields); the arrays come from disk.
  target = jax.eval_shape(lambda: _linen_state(1, tx))
  restored = checkpointer.restore(tmp_path / "ckpt", target)
  checkpointer.close()
  assert isinstance(restored, train_state.TrainState)
  assert restored.tx is tx
  _assert_bit_identical(_linen_arrays(restored), _linen_arrays(state))

  state_a, state_b = state, restored
  for _ in range(3):
    state_a, loss_a = _linen_train_step(state_a, x, y)
    state_b, loss_b = _linen_train_step(state_b, x, y)
    assert np.array_equal(bits(loss_a), bits(loss_b))
  assert changed(state_a.params, state.params)
  _assert_bit_identical(_linen_arrays(state_b), _linen_arrays(state_a))
  assert int(state_b.step) == 23
  # The restored state has the live one's types: the train step was not retraced.
  assert len(_LINEN_TRACES) == 1
