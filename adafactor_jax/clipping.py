"""Update clipping by the RMS of each parameter's update (Adafactor Section 6)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks
from adafactor_jax.factored import (
  FactorDimsFn,
  FactorRules,
  _rules_fn,
  _slice_axes,
  _UserChoice,
  abs_square,
  saturate,
  widen,
)


def rms(x: jax.Array, *, axes: Sequence[int] | None = None) -> jax.Array:
  """sqrt(mean(|x|²)) in float32 over ``axes`` (all), kept as size-1 axes; finite for finite x."""
  mean_square = jnp.mean(abs_square(x), axes, keepdims=axes is not None)
  return jnp.sqrt(saturate(mean_square))


def per_slice_rms(updates: optax.Updates, *, factor_dims: _UserChoice | None) -> optax.Updates:
  """The RMS of each leaf of ``updates``, per slice along its batch axes."""

  def one(path: jax.tree_util.KeyPath, x: jax.Array) -> jax.Array:
    name = _checks.path_name(path)
    return rms(x, axes=_slice_axes(factor_dims, name, jnp.shape(x)))

  return jax.tree_util.tree_map_with_path(one, updates)


def clip_by_update_rms(
  clipping_threshold: float = 1.0,
  *,
  factor_dims: FactorDimsFn | FactorRules | None = None,
) -> optax.GradientTransformation:
  r"""Clips each parameter's update to an RMS of at most ``clipping_threshold``.

  .. math::
    \hat U_t = U_t / \max\big(1, \mathrm{RMS}(U_t) / d\big),

  the RMS taken over the whole parameter (over each slice along the batch
  axes that ``factor_dims`` declares, e.g. each of a stack of scanned layers),
  in float32, of :math:`|U_t|` for complex updates. With :math:`d = 1` and
  the factored second moment, this keeps updates bounded when the second-moment
  estimate is stale (slow decay without warmup). The same math as
  ``optax.clip_by_block_rms``, plus validation and float32 arithmetic for
  low-precision updates.

  Args:
    clipping_threshold: the threshold :math:`d > 0` (paper: 1.0).
    factor_dims: the choice given to :func:`adafactor_jax.scale_by_factored_rms`;
      only the batch axes of its :class:`adafactor_jax.FactorAxes` are used.

  Returns:
    An `optax.GradientTransformation` with no state.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018, Section 6.
  """
  _checks.check_scalar("clipping_threshold", clipping_threshold, low=0.0, low_open=True)
  user_choice = _rules_fn(factor_dims)

  def update_fn(
    updates: optax.Updates, state: optax.EmptyState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, optax.EmptyState]:
    del params

    def clip(update: jax.Array, update_rms: jax.Array) -> jax.Array:
      denominator = jnp.maximum(1.0, update_rms / clipping_threshold)
      return (widen(update) / denominator).astype(update.dtype)

    update_rms = per_slice_rms(updates, factor_dims=user_choice)
    return jax.tree.map(clip, updates, update_rms), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
