"""The parameter-scale multiplier of Adafactor (Section 8)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks, _telemetry
from adafactor_jax.clipping import per_slice_rms
from adafactor_jax.factored import FactorDimsFn, FactorRules, _rules_fn, _slice_axes, widen


def scale_by_parameter_scale(
  epsilon2: float = 1e-3,
  *,
  factor_dims: FactorDimsFn | FactorRules | None = None,
  telemetry: bool = False,
) -> optax.GradientTransformation:
  r"""Multiplies each parameter's update by the parameter's own scale.

  .. math::
    U_t \leftarrow U_t \cdot \max\big(\epsilon_2, \mathrm{RMS}(X_{t-1})\big),

  the RMS over the whole parameter (over each slice along the batch axes that
  ``factor_dims`` declares, e.g. each of a stack of scanned layers), in
  float32, of :math:`|X|` for complex parameters. Chained after a relative
  step size :math:`\rho_t` it gives the paper's absolute step
  :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(X_{t-1}))\,\rho_t`; ``epsilon2``
  lets parameters that start at zero move.

  Args:
    epsilon2: the lower bound :math:`\epsilon_2 \ge 0` on the scale (paper: 1e-3).
    factor_dims: the choice given to :func:`adafactor_jax.scale_by_factored_rms`;
      only the batch axes of its :class:`adafactor_jax.FactorAxes` are used.
    telemetry: if True, the state records, per parameter (per slice), the
      scale :math:`\max(\epsilon_2, \mathrm{RMS}(X_{t-1}))` it multiplied by (a
      :class:`adafactor_jax.TelemetryState`; read it with
      :func:`adafactor_jax.telemetry`).

  Returns:
    An `optax.GradientTransformation` with no state (without telemetry); its
    update needs ``params``.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018, Section 8.
  """
  _checks.check_scalar("epsilon2", epsilon2, low=0.0)
  _checks.check_bool("telemetry", telemetry)
  user_choice = _rules_fn(factor_dims)

  def slice_axes(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return _slice_axes(user_choice, name, shape)

  def init_fn(params: optax.Params) -> optax.EmptyState | _telemetry.TelemetryState:
    if not telemetry:
      return optax.EmptyState()
    scales = _telemetry.initial_figures(_telemetry.PARAMETER_SCALE, params, slice_axes)
    return _telemetry.TelemetryState(optax.EmptyState(), {}, {_telemetry.PARAMETER_SCALE: scales})

  def update_fn(
    updates: optax.Updates,
    state: optax.EmptyState | _telemetry.TelemetryState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, optax.EmptyState | _telemetry.TelemetryState]:
    if params is None:
      raise ValueError(
        "scale_by_parameter_scale needs the parameters: call update(updates, state, params)."
      )
    _checks.check_tree_matches(updates, params)
    param_rms = per_slice_rms(params, factor_dims=user_choice)
    factors = jax.tree.map(lambda r: jnp.maximum(epsilon2, r), param_rms)
    scaled = jax.tree.map(lambda u, f: (widen(u) * f).astype(u.dtype), updates, factors)
    if not telemetry:
      return scaled, state
    assert isinstance(state, _telemetry.TelemetryState)
    scales = _telemetry.packed(
      jax.tree.leaves(factors), state.per_parameter[_telemetry.PARAMETER_SCALE]
    )
    return scaled, _telemetry.TelemetryState(
      optax.EmptyState(), {}, {_telemetry.PARAMETER_SCALE: scales}
    )

  return optax.GradientTransformation(init_fn, update_fn)
