"""Update clipping by the RMS of each parameter's update (Adafactor Section 6)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks, _telemetry
from adafactor_jax.factored import (
  FactorDimsFn,
  FactorRules,
  UserChoice,
  abs_square,
  choice_fn,
  saturate,
  slice_axes_of,
  widen,
)


def rms(x: jax.Array, *, axes: Sequence[int] | None = None) -> jax.Array:
  """sqrt(mean(|x|²)) in float32 over ``axes`` (all), kept as size-1 axes; finite for finite x."""
  mean_square = jnp.mean(abs_square(x), axes, keepdims=axes is not None)
  return jnp.sqrt(saturate(mean_square))


def per_slice_rms(updates: optax.Updates, *, factor_dims: UserChoice | None) -> optax.Updates:
  """The RMS of each leaf of ``updates``, per slice along its batch axes."""

  def one(path: jax.tree_util.KeyPath, x: jax.Array) -> jax.Array:
    name = _checks.path_name(path)
    return rms(x, axes=slice_axes_of(factor_dims, name, jnp.shape(x)))

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
  user_choice = choice_fn(factor_dims)

  def step(
    updates: optax.Updates, params: optax.Params | None
  ) -> tuple[optax.Updates, dict[str, Any]]:
    del params
    update_rms = per_slice_rms(updates, factor_dims=user_choice)
    denominators = jax.tree.map(lambda r: jnp.maximum(1.0, r / clipping_threshold), update_rms)
    clipped = jax.tree.map(lambda u, d: (widen(u) / d).astype(u.dtype), updates, denominators)
    figures = {_telemetry.RMS_UPDATE: update_rms, _telemetry.CLIPPING_DENOMINATOR: denominators}
    return clipped, figures

  names = (_telemetry.RMS_UPDATE, _telemetry.CLIPPING_DENOMINATOR)
  return _telemetry.with_per_parameter_figures(
    step, names, functools.partial(slice_axes_of, user_choice), telemetry=telemetry
  )
