"""Stochastic rounding of low-precision parameters."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax import _checks


class StochasticRoundingState(NamedTuple):
  """State of :func:`stochastic_rounding`."""

  # A raw uint32[2] PRNG key: a plain array, so it checkpoints and shards like
  # any other state leaf.
  key: jax.Array


def stochastic_round(x: jax.Array, *, dtype: Any, key: jax.Array) -> jax.Array:
  r"""Rounds ``x`` to ``dtype``, up or down at random, unbiased.

  With :math:`a \le x \le b` the two neighbours of :math:`x` in ``dtype``, the
  result is :math:`b` with probability :math:`(x - a)/(b - a)` and :math:`a`
  otherwise, so :math:`\mathbb E[\mathrm{round}(x)] = x`: a value that round to
  nearest would always pull back (an update smaller than half a unit in the
  last place) moves the parameter in expectation. Values ``dtype`` holds
  exactly, NaN and values beyond its range round as ``x.astype(dtype)`` does.

  Args:
    x: floating-point values, computed in float32.
    dtype: a floating-point dtype narrower than float32 (bfloat16, float16).
    key: a PRNG key; one uniform number is drawn per element.

  Returns:
    An array of ``dtype`` with ``x``'s shape.
  """
  x = jnp.asarray(x, jnp.float32)
  nearest = x.astype(dtype)
  wide = nearest.astype(jnp.float32)
  error = x - wide  # exact: x and its nearest neighbour are close
  other = jnp.nextafter(nearest, jnp.where(error > 0, jnp.inf, -jnp.inf).astype(dtype))
  # In [0, 1/2]; NaN (never below a draw) when nearest is inf or x is NaN.
  probability = error / (other.astype(jnp.float32) - wide)
  draw = jax.random.uniform(key, x.shape, jnp.float32)
  return jnp.where(draw < probability, other, nearest)


def _rounds_stochastically(dtype: Any) -> bool:
  dtype = np.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def stochastic_rounding(seed: int = 0) -> optax.GradientTransformation:
  r"""Makes ``optax.apply_updates`` round bfloat16 and float16 parameters stochastically.

  For a parameter :math:`X` stored in a dtype narrower than float32 and its
  update :math:`U`, the update becomes

  .. math::
    U' = \mathrm{sr}(X + U) - X, \qquad X + U' = \mathrm{sr}(X + U),

  with :math:`X + U` formed in float32 and :math:`\mathrm{sr}` the unbiased
  :func:`stochastic_round` to :math:`X`'s dtype. Round to nearest drops every
  update smaller than half a unit in the last place of :math:`X` (for
  bfloat16, :math:`2^{-9}|X|`: Adafactor's relative step of :math:`10^{-2}`
  with clipping sits right there, and decayed learning rates go well below);
  stochastic rounding keeps such updates in expectation.

  :math:`U'` is float32 (the difference of two bfloat16 values need not be a
  bfloat16 value), and ``optax.apply_updates(X, U')``, which adds in float32
  and casts to :math:`X`'s dtype, gives :math:`\mathrm{sr}(X + U)` exactly
  whenever old and new value are within :math:`2^{16}` of each other in
  magnitude (:math:`2^{13}` for float16), to a unit in the last place beyond.
  Float32 and wider parameters, and their updates, pass through unchanged.

  Put it last in a chain, after everything that changes the update. The key
  is split once per step, so the rounding is a pure function of ``seed`` and
  the step: the same seed on every data-parallel replica keeps replicated
  parameters identical.

  Args:
    seed: an integer seed for the PRNG key kept in the state.

  Returns:
    An `optax.GradientTransformation` whose state is
    :class:`StochasticRoundingState`; its update needs ``params``.

  References:
    Gupta et al., `Deep Learning with Limited Numerical Precision
    <https://arxiv.org/abs/1502.02551>`_, 2015; Zamirai et al., `Revisiting
    BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
  """
  _checks.check_scalar("seed", seed, integer=True)
  # A traced seed (optax.inject_hyperparams under jax.jit) is an integer array already.
  concrete_seed = _checks.concrete_value(seed)
  key_seed = seed if concrete_seed is None else int(concrete_seed)

  def init_fn(params: optax.Params) -> StochasticRoundingState:
    del params
    return StochasticRoundingState(jax.random.PRNGKey(key_seed))

  def update_fn(
    updates: optax.Updates, state: StochasticRoundingState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, StochasticRoundingState]:
    if params is None:
      raise ValueError(
        "stochastic_rounding needs the parameters: call update(updates, state, params)."
      )
    _checks.check_tree_matches(updates, params)
    next_key, step_key = jax.random.split(state.key)
    treedef: Any  # jaxlib has no type stub for PyTreeDef
    leaves, treedef = jax.tree.flatten(updates)
    leaf_keys = jax.random.split(step_key, len(leaves))

    def rounded(update: jax.Array, param: jax.Array, key: jax.Array) -> jax.Array:
      if not _rounds_stochastically(param.dtype):
        return update
      wide = param.astype(jnp.float32)
      new = stochastic_round(wide + update.astype(jnp.float32), dtype=param.dtype, key=key)
      return new.astype(jnp.float32) - wide

    params_leaves = treedef.flatten_up_to(params)
    new_leaves = [
      rounded(u, p, k) for u, p, k in zip(leaves, params_leaves, leaf_keys, strict=True)
    ]
    return treedef.unflatten(new_leaves), StochasticRoundingState(next_key)

  return optax.GradientTransformation(init_fn, update_fn)
