"""Update clipping by the RMS of each parameter's update (Adafactor Section 6)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks, _telemetry
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
  telemetry: bool = False,
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
    telemetry: if True, the state records, per parameter (per slice), the
      :math:`\mathrm{RMS}(U_t)` it computes and :math:`\max(1,
      \mathrm{RMS}(U_t)/d)` (a :class:`adafactor_jax.TelemetryState`; read it
      with :func:`adafactor_jax.telemetry`).

  Returns:
    An `optax.GradientTransformation` with no state (without telemetry).

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018, Section 6.
  """
  _checks.check_scalar("clipping_threshold", clipping_threshold, low=0.0, low_open=True)
  _checks.check_bool("telemetry", telemetry)
  user_choice = _rules_fn(factor_dims)

  def slice_axes(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return _slice_axes(user_choice, name, shape)

  def init_fn(params: optax.Params) -> optax.EmptyState | _telemetry.TelemetryState:
    if not telemetry:
      return optax.EmptyState()
    per_parameter = {
      name: _telemetry.initial_figures(name, params, slice_axes)
      for name in (_telemetry.RMS_UPDATE, _telemetry.CLIPPING_DENOMINATOR)
    }
    return _telemetry.TelemetryState(optax.EmptyState(), {}, per_parameter)

  def update_fn(
    updates: optax.Updates,
    state: optax.EmptyState | _telemetry.TelemetryState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, optax.EmptyState | _telemetry.TelemetryState]:
    del params
    update_rms = per_slice_rms(updates, factor_dims=user_choice)
    denominators = jax.tree.map(lambda r: jnp.maximum(1.0, r / clipping_threshold), update_rms)
    clipped = jax.tree.map(lambda u, d: (widen(u) / d).astype(u.dtype), updates, denominators)
    if not telemetry:
      return clipped, state
    assert isinstance(state, _telemetry.TelemetryState)
    figures = {_telemetry.RMS_UPDATE: update_rms, _telemetry.CLIPPING_DENOMINATOR: denominators}
    per_parameter = {
      name: _telemetry.packed(jax.tree.leaves(figures[name]), like)
      for name, like in state.per_parameter.items()
    }
    return clipped, _telemetry.TelemetryState(optax.EmptyState(), {}, per_parameter)

  return optax.GradientTransformation(init_fn, update_fn)
