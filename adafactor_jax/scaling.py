"""Scaling the step: by the learning rate, and by the parameter scale of Adafactor (Section 8)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks, _telemetry
from adafactor_jax.clipping import per_slice_rms
from adafactor_jax.factored import FactorDimsFn, FactorRules, choice_fn, slice_axes_of, widen


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
  user_choice = choice_fn(factor_dims)

  def step(
    updates: optax.Updates, params: optax.Params | None
  ) -> tuple[optax.Updates, dict[str, Any]]:
    if params is None:
      raise ValueError(
        "scale_by_parameter_scale needs the parameters: call update(updates, state, params)."
      )
    _checks.check_tree_matches(updates, params)
    param_rms = per_slice_rms(params, factor_dims=user_choice)
    factors = jax.tree.map(lambda r: jnp.maximum(epsilon2, r), param_rms)
    scaled = jax.tree.map(lambda u, f: (widen(u) * f).astype(u.dtype), updates, factors)
    return scaled, {_telemetry.PARAMETER_SCALE: factors}

  return _telemetry.with_per_parameter_figures(
    step,
    (_telemetry.PARAMETER_SCALE,),
    functools.partial(slice_axes_of, user_choice),
    telemetry=telemetry,
  )


def scale_by_learning_rate(
  learning_rate: optax.ScalarOrSchedule,
  *,
  flip_sign: bool = True,
  telemetry: bool = False,
) -> optax.GradientTransformation:
  r"""Scales updates by the learning rate: ``optax.scale_by_learning_rate``, plus telemetry.

  .. math::
    U_t \leftarrow \mp\,\eta_t U_t,

  with :math:`\eta_t` ``learning_rate`` (a schedule at the step count), negated
  when ``flip_sign``. The updates are optax's own, bit for bit.

  Args:
    learning_rate: a float, or an optax schedule of the step count.
    flip_sign: negate the step size (the default, as optax), so that
      ``optax.apply_updates`` descends.
    telemetry: if True, the state records the step size :math:`\eta_t`, without
      the sign ``flip_sign`` gives it (a :class:`adafactor_jax.TelemetryState`
      around optax's state; read it with :func:`adafactor_jax.telemetry`).

  Returns:
    An `optax.GradientTransformation`; without telemetry, optax's own.

  References:
    `optax.scale_by_learning_rate
    <https://optax.readthedocs.io/en/latest/api/transformations.html#optax.scale_by_learning_rate>`_.
  """
  _checks.check_scalar("learning_rate", learning_rate, allow_schedule=True)
  _checks.check_bool("flip_sign", flip_sign)
  _checks.check_bool("telemetry", telemetry)
  inner = optax.scale_by_learning_rate(learning_rate, flip_sign=flip_sign)
  if not telemetry:
    return inner

  def init_fn(params: optax.Params) -> _telemetry.TelemetryState:
    step_size = _telemetry.scalar_zeros(_telemetry.STEP_SIZE)
    return _telemetry.TelemetryState(inner.init(params), step_size, {})

  def update_fn(
    updates: optax.Updates, state: _telemetry.TelemetryState, params: optax.Params | None = None
  ) -> tuple[optax.Updates, _telemetry.TelemetryState]:
    if callable(learning_rate):
      step_size = learning_rate(state.inner_state.count)
    else:
      step_size = learning_rate
    updates, inner_state = inner.update(updates, state.inner_state, params)
    figures = {_telemetry.STEP_SIZE: jnp.asarray(step_size, jnp.float32)}
    return updates, _telemetry.TelemetryState(inner_state, figures, {})

  return optax.GradientTransformation(init_fn, update_fn)
