"""Other systems' Adafactor semantics, rebuilt from this library's pieces.

Each preset returns an `optax.GradientTransformation` whose update equals (or,
where noted, closely approximates) what the named system computes, so that a
run can move here without changing its numerics. Differences that remain are
listed in each docstring. Each Adafactor preset also takes ``telemetry``, as
:func:`adafactor_jax.adafactor` does (read with :func:`adafactor_jax.telemetry`).

``paper``, ``t5x``, ``hf_transformers`` and ``torch_adafactor`` are
:func:`adafactor_jax.adafactor` called with only the arguments that differ from
its defaults (translated from the other system's names); ``big_vision``, whose
momentum comes before the learning rate, is a chain of the transformations.
``stable_adamw`` is AdamW with Adafactor's update clipping (Wortsman et al.
2023): optax's Adam moments and decoupled weight decay, clipped per tensor by
:func:`adafactor_jax.clipping.rms` of the gradient Adam's second moment
preconditions, then :func:`adafactor_jax.scale_by_learning_rate`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks, schedules
from adafactor_jax.alias import adafactor
from adafactor_jax.clipping import rms
from adafactor_jax.factored import scale_by_factored_rms, widen
from adafactor_jax.momentum import ema_momentum
from adafactor_jax.scaling import scale_by_learning_rate


def _last_two_axes(path: str, shape: tuple[int, ...]) -> tuple[int, int] | None:
  """Factor the last two axes of every parameter of rank >= 2 (torch, HF)."""
  del path
  return (len(shape) - 2, len(shape) - 1) if len(shape) >= 2 else None


def _check_eps(eps: Any, *, allow_none_first: bool) -> None:
  if not isinstance(eps, (tuple, list)) or len(eps) != 2:
    raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}.")
  _checks.check_scalar("eps[0]", eps[0], low=0.0, low_open=True, allow_none=allow_none_first)
  _checks.check_scalar("eps[1]", eps[1], low=0.0)


def paper(**overrides: Any) -> optax.GradientTransformationExtraArgs:
  """Algorithm 6 of Shazeer & Stern (2018): :func:`adafactor_jax.adafactor`'s defaults.

  Relative step :math:`\\min(10^{-2}, 1/\\sqrt t)` times the parameter scale,
  :math:`\\hat\\beta_{2t} = 1 - t^{-0.8}`, clipping at :math:`d = 1`,
  :math:`\\epsilon_1 = 10^{-30}`, :math:`\\epsilon_2 = 10^{-3}`, no momentum.
  ``overrides`` are passed on to :func:`adafactor_jax.adafactor`.
  """
  return adafactor(**overrides)


def t5x(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  weight_decay_rate: float | None = None,
  factor_dims: Any = None,
  momentum: float | None = None,
  telemetry: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """T5X's ``adafactor.Adafactor`` with T5's pre-training learning rate.

  ``learning_rate`` defaults to :func:`adafactor_jax.schedules.rsqrt_decay`
  (1/sqrt(max(step, 10,000)), T5's 'constant * rsqrt_decay'); for T5
  fine-tuning pass a constant such as 1e-3. Parameter scale on
  (:math:`\\epsilon_2 = 10^{-3}`), decay 0.8, clipping 1.0, min dim 128,
  float32 statistics, momentum off, ``weight_decay_rate`` (T5X's name) :math:`X(1 - \\lambda)`.

  For T5X's logical axis rules pass
  ``factor_dims=adafactor_jax.logical_factor_dims(param_axes)``: batch axes
  ('layers') then get their own clipping and parameter scale, as in T5X.
  Differences from T5X: a rank > 2 parameter without a rule takes the default
  two-largest choice where T5X fails (t5x #243); there is no
  ``max_parameter_scale``.
  """
  return adafactor(
    schedules.rsqrt_decay() if learning_rate is None else learning_rate,
    momentum=momentum,
    weight_decay_rate=weight_decay_rate,
    factor_dims=factor_dims,
    telemetry=telemetry,
  )


def big_vision(
  learning_rate: optax.ScalarOrSchedule,
  *,
  weight_decay: optax.ScalarOrSchedule | None = None,
  weight_decay_mask: Any = None,
  momentum: float = 0.9,
  momentum_dtype: Any = jnp.bfloat16,
  beta2_cap: float = 0.999,
  min_dim_size_to_factor: int = 32,
  factor_dims: Any = None,
  telemetry: bool = False,
) -> optax.GradientTransformation:
  """Big Vision's ``scale_by_adafactor`` (Zhai et al. 2021, ViT-G) plus its lr.

  Factored second moment with :math:`\\hat\\beta_{2t}` capped at 0.999 and
  ``min_dim_size_to_factor=32``, no update clipping, no parameter scale, then
  momentum 0.9 stored in bfloat16 *before* the learning rate (an average of
  :math:`G/\\sqrt{\\hat V}`, unlike :func:`adafactor_jax.adafactor` whose momentum
  averages the scaled step), then decoupled weight decay added before the
  learning rate, so that it is scaled by it: :math:`X \\leftarrow X -
  \\eta_t(M + \\lambda X)`.

  ``factor_dims`` overrides the choice of factored axes, as in
  :func:`adafactor_jax.scale_by_factored_rms` (e.g.
  ``logical_factor_dims(param_axes, min_dim_size_to_factor=32)``).

  Difference from Big Vision: Big Vision keeps statistics in the parameter
  dtype; here they are float32.

  References:
    Zhai et al., `Scaling Vision Transformers <https://arxiv.org/abs/2106.04560>`_, 2021.
  """
  chain = [
    scale_by_factored_rms(
      beta2_cap=beta2_cap,
      min_dim_size_to_factor=min_dim_size_to_factor,
      factor_dims=factor_dims,
      telemetry=telemetry,
    ),
    ema_momentum(momentum, momentum_dtype=momentum_dtype),
  ]
  if weight_decay is not None:
    chain.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  chain.append(scale_by_learning_rate(learning_rate, flip_sign=True, telemetry=telemetry))
  return optax.chain(*chain)


def hf_transformers(
  lr: float | None = None,
  *,
  eps: tuple[float, float] = (1e-30, 1e-3),
  clip_threshold: float = 1.0,
  decay_rate: float = -0.8,
  beta1: float | None = None,
  weight_decay: float = 0.0,
  scale_parameter: bool = True,
  relative_step: bool = True,
  warmup_init: bool = False,
  telemetry: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """``transformers.Adafactor`` with its own argument names and meanings.

  Translation: ``decay_rate=-0.8`` is this library's 0.8; ``eps`` is
  (``epsilon1``, ``epsilon2``); ``relative_step=True`` means ``lr=None`` here;
  ``scale_parameter`` is ``multiply_by_parameter_scale``; ``beta1`` is
  ``momentum``. Like HF, every parameter of rank >= 2 is factored over its last
  two axes, with no minimum size (HF #14830), and weight decay is multiplied by
  the full step size (relative step times parameter scale):
  :math:`X \\leftarrow X(1 - \\lambda\\alpha_t) - \\alpha_t \\hat U_t`. Exact
  without ``beta1``; with it, the weight-decay term is also averaged by the
  momentum (HF adds it outside the average).

  Raises:
    ValueError: for the combinations HF rejects (``lr`` with
      ``relative_step=True``, ``warmup_init`` without it) and for a positive
      ``decay_rate``, which HF would turn into a growing second moment.
  """
  _checks.check_scalar("lr", lr, low=0.0, low_open=True, allow_none=True)
  _checks.check_scalar("clip_threshold", clip_threshold, low=0.0, low_open=True)
  _checks.check_scalar("weight_decay", weight_decay, low=0.0)
  _checks.check_scalar("beta1", beta1, low=0.0, high=1.0, high_open=True, allow_none=True)
  _check_eps(eps, allow_none_first=False)
  _checks.check_scalar("decay_rate", decay_rate)
  if decay_rate >= 0:
    raise ValueError(
      f"decay_rate is HF's negative exponent (-0.8), got {decay_rate!r}. "
      "adafactor_jax.adafactor takes the positive 0.8."
    )
  if relative_step and lr is not None:
    raise ValueError("lr must be None with relative_step=True (as in HF).")
  if not relative_step and lr is None:
    raise ValueError("lr is required with relative_step=False (as in HF).")
  if warmup_init and not relative_step:
    raise ValueError("warmup_init=True requires relative_step=True (as in HF).")
  epsilon1, epsilon2 = eps
  return adafactor(
    None if relative_step else lr,
    decay_rate=-decay_rate,
    clipping_threshold=clip_threshold,
    multiply_by_parameter_scale=scale_parameter,
    epsilon1=epsilon1,
    epsilon2=epsilon2,
    warmup_init=warmup_init,
    momentum=beta1,
    weight_decay_rate=weight_decay or None,
    weight_decay_scaled_by_step=True,
    min_dim_size_to_factor=1,
    factor_dims=_last_two_axes,
    telemetry=telemetry,
  )


def torch_adafactor(
  lr: float = 1e-2,
  *,
  beta2_decay: float = -0.8,
  eps: tuple[float | None, float] = (None, 1e-3),
  d: float = 1.0,
  weight_decay: float = 0.0,
  maximize: bool = False,
  telemetry: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """``torch.optim.Adafactor`` with its own argument names and meanings.

  Translation: the step size is :math:`\\min(\\text{lr}, 1/\\sqrt t)` times the
  parameter scale (always on); ``beta2_decay=-0.8`` is this library's 0.8;
  ``d`` is ``clipping_threshold``; weight decay is
  :math:`X \\leftarrow X(1 - \\text{lr}\\,\\lambda)`; every parameter of rank >= 2
  is factored over its last two axes. ``maximize=True`` ascends, as torch's:
  the step is that of the negated gradient, and weight decay still shrinks
  the parameters.

  Difference from torch: torch *clamps* the second-moment estimate at
  ``eps[0]`` squared (default: the dtype's machine epsilon, 0.0078 in bf16) where
  the paper and this library *add* :math:`\\epsilon_1` to :math:`G^2`; here
  ``eps[0]`` (default float32 machine epsilon) squared is added. The two agree
  whenever gradients are not tiny.
  """
  _checks.check_scalar("lr", lr, low=0.0, low_open=True)
  _checks.check_scalar("d", d, low=0.0, low_open=True)
  _checks.check_scalar("weight_decay", weight_decay, low=0.0)
  _check_eps(eps, allow_none_first=True)
  _checks.check_bool("maximize", maximize)
  _checks.check_scalar("beta2_decay", beta2_decay)
  if beta2_decay >= 0:
    raise ValueError(
      f"beta2_decay is torch's negative exponent (-0.8), got {beta2_decay!r}. "
      "adafactor_jax.adafactor takes the positive decay_rate=0.8."
    )
  epsilon1 = eps[0] if eps[0] is not None else float(jnp.finfo(jnp.float32).eps)
  return adafactor(
    schedules.relative_step_size(max_step_size=lr),
    decay_rate=-beta2_decay,
    clipping_threshold=d,
    epsilon1=epsilon1**2,
    epsilon2=eps[1],
    weight_decay_rate=lr * weight_decay if weight_decay else None,
    min_dim_size_to_factor=1,
    factor_dims=_last_two_axes,
    maximize=maximize,
    telemetry=telemetry,
  )


def stable_adamw(
  learning_rate: optax.ScalarOrSchedule,
  *,
  b1: float = 0.9,
  b2: float = 0.99,
  eps: float = 1e-8,
  weight_decay: optax.ScalarOrSchedule = 1e-4,
  weight_decay_mask: Any = None,
  clipping_threshold: float = 1.0,
) -> optax.GradientTransformation:
  r"""StableAdamW (Wortsman et al. 2023, Algorithm 1): AdamW with Adafactor's update clipping.

  Per tensor (each parameter as a whole), with :math:`\alpha_t` the learning rate:

  .. math::
    \hat m_t = \frac{m_t}{1 - \beta_1^t},\quad
    \hat v_t = \frac{v_t}{1 - \beta_2^t},\quad
    \mathrm{RMS}_t = \sqrt{\operatorname{mean}\Big(\frac{g_t^2}{\max(\hat v_t,
    \epsilon^2)}\Big)},\quad
    \eta_t = \frac{\alpha_t}{\max(1, \mathrm{RMS}_t / d)},

  .. math::
    \theta_t = \theta_{t-1} - \eta_t \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
    - \eta_t \lambda \theta_{t-1},

  with :math:`m_t, v_t` Adam's moving averages of :math:`g_t` and :math:`g_t^2`
  (``optax.scale_by_adam``'s). The paper writes the bias correction into the
  averages (:math:`\hat\beta_2 = \beta_2 (1 - \beta_2^{t-1}) / (1 - \beta_2^t)`),
  which makes its :math:`u_t` this :math:`\hat v_t`: the RMS is taken with the
  bias-corrected second moment, which includes :math:`g_t`. :math:`\epsilon` is
  added to :math:`\sqrt{\hat v_t}` in the step, as in Adam, and bounds
  :math:`\hat v_t` from below by :math:`\epsilon^2` in the RMS (the paper's
  :math:`\sqrt{E[g_t^2 / u_t]}`; the authors' code guards the division so). This is
  Adafactor's update clipping (:func:`adafactor_jax.clip_by_update_rms`, at
  :math:`d = 1` in the paper) measured on the gradient preconditioned by Adam's
  second moment, not on the update that the momentum makes, and applied to the
  step size, so that the weight decay term is clipped too. Without clipping
  (:math:`\mathrm{RMS}_t \le d` everywhere) this is ``optax.adamw``.

  Args:
    learning_rate: :math:`\alpha_t`, a float or an optax schedule.
    b1: :math:`\beta_1` in [0, 1).
    b2: :math:`\beta_2` in [0, 1); 0.99, the authors' implementation's default (AdamW's
      loss spikes at 0.99 are what the clipping removes in the paper).
    eps: :math:`\epsilon > 0`; 1e-8, ``optax.adamw``'s.
    weight_decay: decoupled weight decay :math:`\lambda \ge 0` (a float or a
      schedule), multiplied by the clipped step :math:`\eta_t`; ``optax.adamw``'s default.
    weight_decay_mask: tree of bools (or a callable giving one) selecting the
      parameters to decay, as ``optax.adamw``'s ``mask``.
    clipping_threshold: :math:`d > 0`, the RMS above which the step is scaled down
      (1.0 in the paper).

  Returns:
    An `optax.GradientTransformation` whose state holds ``optax.ScaleByAdamState``
    (so that :func:`adafactor_jax.warm_start_state` reads it as Adam's).

  References:
    Wortsman et al., `Stable and low-precision training for large-scale
    vision-language models <https://arxiv.org/abs/2304.13013>`_, 2023, Algorithm 1.
  """
  _checks.check_scalar("b1", b1, low=0.0, high=1.0, high_open=True)
  _checks.check_scalar("b2", b2, low=0.0, high=1.0, high_open=True)
  _checks.check_scalar("eps", eps, low=0.0, low_open=True)
  _checks.check_scalar("weight_decay", weight_decay, low=0.0, allow_schedule=True)
  _checks.check_scalar("clipping_threshold", clipping_threshold, low=0.0, low_open=True)
  return optax.chain(
    _scale_by_stable_adam(b1, b2, eps, clipping_threshold, weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate, flip_sign=True),
  )


def _scale_by_stable_adam(
  b1: float,
  b2: float,
  eps: float,
  clipping_threshold: float,
  weight_decay: optax.ScalarOrSchedule,
  weight_decay_mask: Any,
) -> optax.GradientTransformation:
  """Adam's update plus the decay term, divided per tensor by max(1, RMS_t / d): what
  :func:`stable_adamw` multiplies by the learning rate. One transformation rather than a
  chain, because the denominator needs the gradient and Adam's second moment, which a chain
  hands on to no later transformation."""
  adam = optax.scale_by_adam(b1, b2, eps)
  decay = optax.add_decayed_weights(weight_decay, weight_decay_mask)

  def init_fn(params: optax.Params) -> tuple[optax.OptState, optax.OptState]:
    return adam.init(params), decay.init(params)

  def update_fn(
    updates: optax.Updates,
    state: tuple[optax.OptState, optax.OptState],
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, tuple[optax.OptState, optax.OptState]]:
    grads, (adam_state, decay_state) = updates, state
    updates, adam_state = adam.update(grads, adam_state, params)
    updates, decay_state = decay.update(updates, decay_state, params)
    # The v-hat that scale_by_adam divided by: the same count and the same correction.
    nu_hat = optax.tree.bias_correction(adam_state.nu, b2, adam_state.count)

    def denominator(g: jax.Array, v: jax.Array) -> jax.Array:
      preconditioned = widen(g) / jnp.sqrt(jnp.maximum(widen(v), eps**2))
      return jnp.maximum(1.0, rms(preconditioned) / clipping_threshold)

    denominators = jax.tree.map(denominator, grads, nu_hat)
    clipped = jax.tree.map(lambda u, d: (widen(u) / d).astype(u.dtype), updates, denominators)
    return clipped, (adam_state, decay_state)

  return optax.GradientTransformation(init_fn, update_fn)
