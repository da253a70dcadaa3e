"""update_and_apply: the step in groups of parameters, one after another (adafactor_jax.ordered).

Its claim is numerics equal to the plain step (``tx.update`` then ``optax.apply_updates``)
with a state that is the plain step's; what the ordering buys on the TPU compiler is in
tests/test_tpu.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax.ordered import _only, size_groups

SHAPES = {  # an embedding beside small leaves, a bias, a scalar, a stacked leaf and a None
  "embed": (300, 64),
  "block": {"w": (64, 200), "b": (200,), "scale": ()},
  "stack": (3, 64, 64),
  "head": (64, 130),
  "unused": None,
}


def tree(seed: int) -> dict:
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
  return jax.tree.map(
    lambda shape: jax.random.normal(next(keys), shape),
    SHAPES,
    is_leaf=lambda x: isinstance(x, tuple),
  )


def plain_steps(tx, params, n):
  @jax.jit
  def step(grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for t in range(n):
    params, state = step(tree(100 + t), state, params)
  return params, state


def ordered_steps(tx, params, n, groups):
  state = tx.init(params)
  step = jax.jit(
    lambda g, s, p: adafactor_jax.update_and_apply(
      tx, grads=g, opt_state=s, params=p, groups=groups
    )
  )
  for t in range(n):
    params, state = step(tree(100 + t), state, params)
  return params, state


@pytest.mark.parametrize("groups", [2, 3, 6])
@pytest.mark.parametrize(
  "tx",
  [
    adafactor_jax.adafactor(1e-2),
    adafactor_jax.adafactor(),  # the relative step: a schedule on the count, in every group
    adafactor_jax.adafactor(1e-2, momentum=0.9, momentum_dtype=jnp.bfloat16),
    adafactor_jax.adafactor(1e-2, momentum=0.9, momentum_dtype=jnp.int8),
    adafactor_jax.adafactor(1e-2, factored=False, weight_decay_rate=1e-3),
  ],
  ids=["default", "relative_step", "bf16_momentum", "int8_momentum", "unfactored_decay"],
)
def test_the_same_parameters_and_state_as_the_plain_step(tx, groups):
  """Bit for bit, over steps: each group's update is the plain step's for its parameters
  (each parameter's own statistics, clipping and scale), and the shared count advances once."""
  params = tree(0)
  expected = plain_steps(tx, params, 3)
  got = ordered_steps(tx, params, 3, groups)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


def test_optax_transformations_go_in_groups_too():
  """Any per-parameter optax transformation: AdamW (its fusions may round the last bit
  differently, so within float32's resolution)."""
  tx = optax.adamw(1e-2, weight_decay=0.1)
  expected = plain_steps(tx, tree(0), 3)
  got = ordered_steps(tx, tree(0), 3, 3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_groups_hold_about_equal_shares_largest_first():
  sizes = {"a": (100,), "b": (10, 10), "c": (50,), "d": (30,), "e": (20,)}
  params = jax.tree.map(jnp.zeros, sizes, is_leaf=lambda x: isinstance(x, tuple))
  # 300 elements, shares of 100: a | b | c, d, e (after c the third share is not yet held).
  assert size_groups(params, groups=3) == [[0], [1], [2, 3, 4]]
  assert size_groups(params, groups=1) == [[0, 1, 2, 3, 4]]
  # One leaf larger than several shares: the groups it fills are not left empty.
  assert size_groups(params, groups=5) == [[0], [1], [2], [3], [4]]
  assert size_groups(params, groups=50) == [[0], [1], [2], [3], [4]]


def test_the_step_is_ordered_by_barriers_between_groups():
  """groups - 1 optimization barriers in the step, each holding the finished group's new
  values and the later groups' inputs; one group is the plain step."""
  tx = adafactor_jax.adafactor(1e-2)
  params = tree(0)
  state = tx.init(params)
  for groups, barriers in ((1, 0), (3, 2)):
    jaxpr = jax.make_jaxpr(
      lambda g, s, p, k=groups: adafactor_jax.update_and_apply(
        tx, grads=g, opt_state=s, params=p, groups=k
      )
    )(params, state, params)
    found = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "optimization_barrier"]
    assert len(found) == barriers
  # The first barrier: the embedding's new value (the largest leaf, alone in the first
  # group), then every other parameter's value and gradient, then the later groups' state
  # (its reads, too, wait for the group before).
  operands = [tuple(v.aval.shape) for v in found[0].invars]
  assert operands[0] == SHAPES["embed"] and operands.count(SHAPES["embed"]) == 1
  others = [np.shape(x) for x in jax.tree.leaves(params) if np.shape(x) != SHAPES["embed"]]
  assert sorted(operands[1 : 1 + 2 * len(others)]) == sorted(others * 2)
  later_states = [tx.init(_only(params, set(g))) for g in size_groups(params, groups=3)[1:]]
  assert len(operands) == 1 + 2 * len(others) + len(jax.tree.leaves(later_states))


@pytest.mark.parametrize("groups", [0, -1, 2.0, True, None])
def test_groups_must_be_a_positive_int(groups):
  tx = adafactor_jax.adafactor(1e-2)
  params = tree(0)
  with pytest.raises(ValueError, match=rf"groups must be an int >= 1, got {groups!r}"):
    adafactor_jax.update_and_apply(
      tx, grads=params, opt_state=tx.init(params), params=params, groups=groups
    )


def test_a_transformation_reading_other_gradients_is_refused_by_name():
  """A global-norm clip scales every update by the norm of all gradients: split in groups,
  each would see its own norm. Refused, naming a parameter and what it reads."""
  tx = optax.chain(optax.clip_by_global_norm(1.0), adafactor_jax.adafactor(1e-2))
  params = tree(0)
  with pytest.raises(ValueError, match=r"update_and_apply needs tx to update each parameter"):
    adafactor_jax.update_and_apply(tx, grads=params, opt_state=tx.init(params), params=params)
  # One group is the plain step: nothing to refuse.
  adafactor_jax.update_and_apply(
    tx, grads=params, opt_state=tx.init(params), params=params, groups=1
  )


@pytest.mark.parametrize(
  "tx",
  [
    adafactor_jax.adafactor(1e-2, telemetry=True),
    adafactor_jax.adafactor(1e-2, skip_nonfinite=True),
  ],
  ids=["telemetry", "skip_nonfinite"],
)
def test_a_state_or_step_of_all_parameters_at_once_is_refused(tx):
  params = tree(0)
  with pytest.raises(ValueError, match=r"update_and_apply needs tx") as raised:
    adafactor_jax.update_and_apply(tx, grads=params, opt_state=tx.init(params), params=params)
  assert "telemetry" in str(raised.value) or "skipped" in str(raised.value)


def test_gradients_of_another_tree_are_refused():
  tx = adafactor_jax.adafactor(1e-2)
  params = tree(0)
  grads = {k: v for k, v in params.items() if k != "head"}
  with pytest.raises(ValueError, match="head"):
    adafactor_jax.update_and_apply(tx, grads=grads, opt_state=tx.init(params), params=params)
