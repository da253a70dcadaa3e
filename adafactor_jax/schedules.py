"""Adafactor's step-size and second-moment decay schedules, as optax schedules.

Each function returns a plain `optax.Schedule`: a function of optax's step
count (0 for the first update) that any optax transformation accepts, for
example `optax.scale_by_learning_rate(relative_step_size())`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks


def relative_step_size(warmup_init: bool = False, *, max_step_size: float = 1e-2) -> optax.Schedule:
  r"""The relative step size :math:`\rho_t` of Adafactor (Algorithm 6).

  .. math::
    \rho_t = \min(\text{max\_step\_size}, 1/\sqrt{t})
    \qquad\text{or, with warmup,}\qquad
    \rho_t = \min(10^{-6}\, t, 1/\sqrt{t}),

  with :math:`t = \text{count} + 1`. Multiplied by the parameter scale
  (:func:`adafactor_jax.scale_by_parameter_scale`) it gives the paper's
  absolute step :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(X_{t-1}))\rho_t`.

  Args:
    warmup_init: if True, use the linear warmup :math:`10^{-6} t` (as HF and
      fairseq's ``warmup_init``) in place of ``max_step_size``.
    max_step_size: the cap on the step size when ``warmup_init`` is False:
      1e-2 in the paper; torch.optim.Adafactor's ``lr`` plays this role.

  Returns:
    An `optax.Schedule` of the step count.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018, Section 8 and Algorithm 6.
  """
  _checks.check_bool("warmup_init", warmup_init)
  _checks.check_scalar("max_step_size", max_step_size, low=0.0, low_open=True)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.asarray(count, jnp.float32) + 1.0
    limit = 1e-6 * t if warmup_init else max_step_size
    return jnp.minimum(limit, jax.lax.rsqrt(t))

  return schedule


def decay_rate_pow(
  decay_rate: float = 0.8,
  *,
  decay_offset: int = 0,
  beta2_cap: float | None = None,
) -> optax.Schedule:
  r"""The second-moment decay :math:`\hat\beta_{2t}` of Adafactor.

  .. math::
    \hat\beta_{2t} = \min\big(\text{beta2\_cap},\;
      1 - \max(t - \text{decay\_offset}, 1)^{-c}\big), \qquad c = \text{decay\_rate},

  with :math:`t = \text{count} + 1`. At the first step (and, with an offset, at
  every step up to ``decay_offset + 1``) :math:`\hat\beta_{2t} = 0`: the
  statistics start afresh, so no bias correction is needed. Unlike
  ``optax.scale_by_factored_rms(step_offset=...)``, the value is finite for every
  offset (optax PR #1791: a negative base to a fractional power gave NaN).

  Args:
    decay_rate: the exponent :math:`c > 0` (0.8 in the paper). HF transformers
      and torch write the same schedule as ``decay_rate=-0.8``.
    decay_offset: a step offset >= 0, for fine-tuning from a checkpoint whose
      step count keeps running: the schedule restarts after that many steps.
    beta2_cap: an upper bound in (0, 1] on :math:`\hat\beta_{2t}` (Big Vision
      uses 0.999), or None for none.

  Returns:
    An `optax.Schedule` of the step count.
  """
  check_decay_args(decay_rate, decay_offset=decay_offset, beta2_cap=beta2_cap)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    t = jnp.asarray(count, jnp.float32) + 1.0 - decay_offset
    beta2 = 1.0 - jnp.maximum(t, 1.0) ** (-jnp.asarray(decay_rate, jnp.float32))
    if beta2_cap is not None:
      beta2 = jnp.minimum(beta2, beta2_cap)
    return beta2

  return schedule


def check_decay_args(decay_rate: float, *, decay_offset: int, beta2_cap: float | None) -> None:
  """Raises ValueError naming the first of the decay's arguments out of range."""
  _checks.check_scalar(
    "decay_rate",
    decay_rate,
    low=0.0,
    low_open=True,
    hint=(
      "It is the positive exponent c of 1 - t^(-c); HF transformers and "
      "torch write -0.8 for the paper's 0.8, so pass 0.8."
    ),
  )
  _checks.check_scalar("decay_offset", decay_offset, low=0, integer=True)
  _checks.check_scalar("beta2_cap", beta2_cap, low=0.0, high=1.0, low_open=True, allow_none=True)


def rsqrt_decay(base_learning_rate: float = 1.0, *, warmup_steps: int = 10_000) -> optax.Schedule:
  r"""T5's learning rate :math:`\text{base} / \sqrt{\max(\text{count}, \text{warmup\_steps})}`.

  The T5/T5X pre-training schedule ('constant * rsqrt_decay'): constant for
  ``warmup_steps`` steps at :math:`\text{base}/\sqrt{\text{warmup\_steps}}`
  (0.01 with the defaults), then decaying as :math:`1/\sqrt{t}`.

  Args:
    base_learning_rate: the constant factor > 0 (1.0 in T5).
    warmup_steps: the number of steps >= 1 at the constant rate (10,000 in T5).

  Returns:
    An `optax.Schedule` of the step count.
  """
  _checks.check_scalar("base_learning_rate", base_learning_rate, low=0.0, low_open=True)
  _checks.check_scalar("warmup_steps", warmup_steps, low=1, integer=True)

  def schedule(count: jax.typing.ArrayLike) -> jax.Array:
    step = jnp.maximum(jnp.asarray(count, jnp.float32), float(warmup_steps))
    return base_learning_rate * jax.lax.rsqrt(step)

  return schedule
