"""Skipping steps whose gradients are not finite."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`."""

  inner_state: optax.OptState
  skipped_steps: jax.Array  # int32: steps skipped so far for non-finite gradients.


def all_finite(tree: Any) -> jax.Array:
  """True when every element of every leaf of ``tree`` is finite."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def skip_nonfinite(
  inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Skips, bit-exactly, every step whose gradients hold a NaN or an Inf.

  On such a step the inner state is returned unchanged, the skipped-step count
  goes up by one, and every update is ``-0.0``: the additive identity of IEEE
  floats, so ``optax.apply_updates`` leaves each parameter bit-identical, a
  ``-0.0`` parameter included (a ``+0.0`` update would turn it into ``+0.0``).
  Unlike ``optax.apply_if_finite``, there is no limit after which the step is
  taken anyway.

  Args:
    inner: the transformation to guard.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is
    :class:`SkipNonfiniteState`.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> SkipNonfiniteState:
    return SkipNonfiniteState(inner.init(params), jnp.zeros([], jnp.int32))

  def update_fn(
    updates: optax.Updates,
    state: SkipNonfiniteState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, SkipNonfiniteState]:
    finite = all_finite(updates)
    new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
    inner_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
    )
    new_updates = jax.tree.map(
      lambda u: jnp.where(finite, u, jnp.asarray(-0.0, u.dtype)), new_updates
    )
    skipped = jnp.where(finite, state.skipped_steps, optax.safe_increment(state.skipped_steps))
    return new_updates, SkipNonfiniteState(inner_state, skipped)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
