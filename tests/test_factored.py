"""scale_by_factored_rms: the choice of axes, the state, and the statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax._src import factorized as optax_factorized

import adafactor_jax
from adafactor_jax import default_factor_dims, scale_by_factored_rms


@pytest.mark.parametrize(
  "shape, expected",
  [
    ((300,), None),
    ((), None),
    ((256, 192), (0, 1)),
    ((192, 256), (0, 1)),
    ((8, 300), None),  # second largest 8 < 128
    ((3, 3, 128, 256), (2, 3)),  # a conv kernel
    ((4, 160, 144), (1, 2)),  # a leading batch axis
    ((256, 256, 256), (1, 2)),  # ties go to the later axes, as optax
    ((512, 3, 128), (0, 2)),
    ((127, 4096), None),
    ((128, 128), (0, 1)),
  ],
)
def test_default_factor_dims(shape, expected):
  assert default_factor_dims(shape, min_dim_size_to_factor=128) == expected
  # The same pair of axes as optax, where optax factors.
  theirs = optax_factorized._factored_dims(shape, True, 128)
  assert (None if theirs is None else tuple(sorted(theirs))) == expected


def test_state_holds_row_and_column_statistics_only():
  params = {
    "kernel": jnp.zeros((256, 192), jnp.bfloat16),
    "conv": jnp.zeros((3, 3, 128, 160)),
    "bias": jnp.zeros((300,), jnp.float16),
    "scalar": jnp.zeros(()),
  }
  state = scale_by_factored_rms().init(params)
  assert state.v_row["kernel"].shape == (256, 1) and state.v_col["kernel"].shape == (1, 192)
  assert state.v_row["conv"].shape == (3, 3, 128, 1)
  assert state.v_col["conv"].shape == (3, 3, 1, 160)
  assert state.v["kernel"] is None and state.v["conv"] is None
  assert state.v["bias"].shape == (300,) and state.v["scalar"].shape == ()
  assert state.v_row["bias"] is None and state.v_col["scalar"] is None
  # float32 statistics whatever the parameter dtype, and nothing else per leaf.
  stats = jax.tree.leaves((state.v_row, state.v_col, state.v))
  assert {x.dtype for x in stats} == {jnp.dtype(jnp.float32)}
  n_stats = sum(x.size for x in stats)
  assert n_stats == (256 + 192) + 3 * 3 * (128 + 160) + 300 + 1
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  # The first update fills them (beta2 = 0 at t = 1) with the means of G² + eps1, in float64:
  # over the column axis, over the row axis, or none; shapes and dtypes as init made them.
  rng = np.random.default_rng(0)
  grads = {k: jnp.asarray(rng.standard_normal(x.shape), x.dtype) for k, x in params.items()}
  _, new = jax.jit(scale_by_factored_rms().update)(grads, state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), new) == jax.tree.map(
    lambda x: (x.shape, x.dtype), state
  )
  assert int(new.count) == 1
  g2 = {k: np.square(np.asarray(g, np.float64)) + 1e-30 for k, g in grads.items()}
  expected = {
    ("v_row", "kernel"): g2["kernel"].mean(1, keepdims=True),
    ("v_col", "kernel"): g2["kernel"].mean(0, keepdims=True),
    ("v_row", "conv"): g2["conv"].mean(3, keepdims=True),
    ("v_col", "conv"): g2["conv"].mean(2, keepdims=True),
    ("v", "bias"): g2["bias"],
    ("v", "scalar"): g2["scalar"],
  }
  for (field, name), value in expected.items():
    np.testing.assert_allclose(getattr(new, field)[name], value, rtol=1e-6, err_msg=name)


def test_optimizer_state_bytes_have_no_per_leaf_placeholders():
  """adafactor()'s whole state: statistics plus a few scalars, however many leaves."""
  params = {f"layer{i}": {"w": jnp.zeros((512, 256)), "b": jnp.zeros(256)} for i in range(20)}
  state = adafactor_jax.adafactor().init(params)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  stats_bytes = 20 * 4 * ((512 + 256) + 256)
  assert state_bytes == stats_bytes + 8  # two int32 step counts: the statistics' and the schedule's
  # An update keeps it so: same leaves, same bytes.
  tx = adafactor_jax.adafactor()
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = jax.jit(tx.update)(grads, state, params)
  assert sum(x.nbytes for x in jax.tree.leaves(state)) == stats_bytes + 8


def test_statistics_stay_float32_for_bfloat16_parameters():
  params = {"w": jnp.ones((256, 192), jnp.bfloat16)}
  tx = adafactor_jax.adafactor()
  state = tx.init(params)
  grads = {"w": jnp.full((256, 192), 3e-3, jnp.bfloat16)}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["w"].dtype == jnp.bfloat16
  v_row, v_col = state[0].v_row["w"], state[0].v_col["w"]
  assert v_row.dtype == v_col.dtype == jnp.float32
  # G² = 9e-6 is kept to float32 precision (bfloat16 would round it to 3 digits).
  g = np.float32(np.asarray(grads["w"], np.float32)[0, 0])
  np.testing.assert_allclose(np.asarray(v_row), g * g + 1e-30, rtol=1e-6)


def _one_update(tx, grads, steps=3):
  state = tx.init(grads)
  for _ in range(steps):
    updates, state = tx.update(grads, state)
  return np.asarray(updates)


def test_factor_dims_callable_and_rules_choose_the_axes():
  rng = np.random.default_rng(0)
  grads = jnp.asarray(rng.standard_normal((6, 40, 50)), jnp.float32)
  # Factoring axes (0, 2) makes axis 1 a batch axis: each slice along it is
  # factored on its own, as a 6 x 50 matrix.
  chosen = _one_update(scale_by_factored_rms(factor_dims=lambda path, shape: (0, 2)), grads)
  matrix_tx = scale_by_factored_rms(min_dim_size_to_factor=6)
  for b in (0, 17, 39):
    np.testing.assert_allclose(chosen[:, b, :], _one_update(matrix_tx, grads[:, b, :]), rtol=1e-5)
  # ... which differs from the default factoring (axes 1 and 2).
  default = _one_update(scale_by_factored_rms(min_dim_size_to_factor=6), grads)
  assert not np.allclose(chosen, default, rtol=1e-2)
  # Rules: the first regex found in the path decides, None means a full moment,
  # and unmatched parameters take the default.
  tx = scale_by_factored_rms(
    factor_dims=[(r"attn/.*kernel$", (-2, -1)), (r"embed", None)],
    min_dim_size_to_factor=4,
  )
  params = {
    "attn": {"kernel": jnp.zeros((8, 4, 16))},
    "embed": jnp.zeros((32, 16)),
    "mlp": jnp.zeros((4, 16, 8)),
  }
  state = tx.init(params)
  assert state.v_row["attn"]["kernel"].shape == (8, 4, 1)
  assert state.v_col["attn"]["kernel"].shape == (8, 1, 16)
  assert state.v["embed"].shape == (32, 16) and state.v_row["embed"] is None
  assert state.v_row["mlp"].shape == (4, 16, 1) and state.v_col["mlp"].shape == (4, 1, 8)


def test_row_and_column_roles_are_interchangeable():
  """V̂ = R Cᵀ / mean(R) is symmetric in which axis is called the row."""
  grads = jnp.asarray(np.random.default_rng(1).standard_normal((30, 70)), jnp.float32)
  a = _one_update(scale_by_factored_rms(factor_dims=lambda p, s: (0, 1)), grads)
  b = _one_update(scale_by_factored_rms(factor_dims=lambda p, s: (1, 0)), grads)
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_decay_offset_is_finite_where_optax_gives_nan():
  grads = {"w": jnp.ones((256, 192))}
  ours = scale_by_factored_rms(decay_offset=5)
  state = ours.init(grads)
  for _ in range(8):
    updates, state = ours.update(grads, state)
    assert np.all(np.isfinite(updates["w"]))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
  theirs = optax.scale_by_factored_rms(step_offset=5)
  updates, _ = theirs.update(grads, theirs.init(grads), grads)
  assert np.all(np.isnan(updates["w"]))  # optax PR #1791, fixed here


def test_zero_gradients_and_a_zero_row_next_to_huge_rows_stay_finite():
  grads = np.zeros((256, 192), np.float32)
  tx = scale_by_factored_rms()
  updates = _one_update(tx, jnp.asarray(grads))
  assert np.all(updates == 0)
  grads[1:] = 1e15  # mean(R) ~ 1e30 while row 0 has R = epsilon1 = 1e-30
  updates = _one_update(tx, jnp.asarray(grads))
  assert np.all(np.isfinite(updates))
  assert np.all(updates[0] == 0)
  np.testing.assert_allclose(updates[1:], 1.0, rtol=1e-4)


def test_update_reads_the_factoring_from_the_state():
  """The hyperparameters that chose the axes are not needed by update()."""
  grads = {"w": jnp.ones((256, 192))}
  by_default = scale_by_factored_rms(min_dim_size_to_factor=128)
  state = by_default.init(grads)
  # A transformation built with another min_dim (as inject_hyperparams rebuilds
  # it inside update) applies the factoring the state was made with.
  other = scale_by_factored_rms(min_dim_size_to_factor=1000)
  _, new_state = other.update(grads, state)
  assert new_state.v["w"] is None and new_state.v_row["w"].shape == (256, 1)


def test_none_and_tuple_containers_in_the_parameter_tree():
  """None leaves (frozen parameters) and tuple containers pass through."""
  params = {"frozen": None, "pair": (jnp.zeros((256, 192)), jnp.zeros(3))}
  tx = adafactor_jax.adafactor()
  state = tx.init(params)
  grads = {"frozen": None, "pair": (jnp.ones((256, 192)), jnp.ones(3))}
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert updates["frozen"] is None
  assert updates["pair"][0].shape == (256, 192) and updates["pair"][1].shape == (3,)
  assert state[0].v["pair"][0] is None and state[0].v_row["pair"][0].shape == (256, 1)
  # ε2 = 1e-3 times ρ_1 = 1e-2 times a unit update, with the sign of descent.
  np.testing.assert_allclose(updates["pair"][1], -1e-5, rtol=1e-5)


FUSED_SHAPES = {
  "matrix": (384, 256),
  "batched": (3, 160, 144),  # a batch axis with its own statistics
  "conv": (3, 3, 128, 256),
  "vector": (300,),
  "scalar": (),
  "unfactored": (8, 300),
}


@pytest.mark.parametrize("threshold", [1.0, 0.05])
def test_fused_clipping_equals_chaining_clip_by_update_rms(threshold):
  keys = iter(jax.random.split(jax.random.key(3), 2 * len(FUSED_SHAPES)))
  params = {k: jax.random.normal(next(keys), s) for k, s in FUSED_SHAPES.items()}
  # Uneven gradient scales, so that some leaves are clipped and some not.
  grads = {
    k: 10.0 ** (i - 3) * jax.random.normal(next(keys), s)
    for i, (k, s) in enumerate(FUSED_SHAPES.items())
  }
  fused = scale_by_factored_rms(clipping_threshold=threshold)
  chained = optax.chain(scale_by_factored_rms(), adafactor_jax.clip_by_update_rms(threshold))
  fused_state, chained_state = fused.init(params), chained.init(params)
  clipped = set()
  for _ in range(3):
    fused_updates, fused_state = jax.jit(fused.update)(grads, fused_state)
    chained_updates, chained_state = jax.jit(chained.update)(grads, chained_state)
    unclipped, _ = scale_by_factored_rms().update(grads, chained_state[0])
    for k in FUSED_SHAPES:
      np.testing.assert_allclose(fused_updates[k], chained_updates[k], rtol=2e-6, atol=0, err_msg=k)
      if not np.allclose(unclipped[k], chained_updates[k]):
        clipped.add(k)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), fused_state, chained_state[0]
  )
  assert clipped
  if threshold == 1.0:
    assert clipped != set(FUSED_SHAPES)  # both branches ran


def _temp_bytes(tx, shapes) -> int:
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, shapes)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_fused_step_needs_no_parameter_sized_temporary():
  shapes = {
    "embed": jax.ShapeDtypeStruct((4096, 512), jnp.float32),
    "stacked": jax.ShapeDtypeStruct((4, 512, 1024), jnp.float32),
    "vector": jax.ShapeDtypeStruct((512,), jnp.float32),
  }
  param_bytes = sum(s.size * 4 for s in jax.tree.leaves(shapes))
  fused = adafactor_jax.adafactor(learning_rate=1e-2)
  assert _temp_bytes(fused, shapes) <= 0.02 * param_bytes
  bf16_momentum = adafactor_jax.adafactor(1e-2, momentum=0.9, momentum_dtype=jnp.bfloat16)
  assert _temp_bytes(bf16_momentum, shapes) <= 0.02 * param_bytes
  # What the fusion avoids: chained, the clip reads U twice and XLA stores it.
  chained = optax.chain(
    scale_by_factored_rms(),
    adafactor_jax.clip_by_update_rms(1.0),
    optax.scale(-1e-2),
  )
  assert _temp_bytes(chained, shapes) >= 4096 * 512 * 4
