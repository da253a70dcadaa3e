"""The Adafactor optimizer: the transformations chained with the paper's defaults."""

from __future__ import annotations

from typing import Any

import optax

from adafactor_jax import _checks, _probe
from adafactor_jax.factored import FactorDimsFn, FactorRules, scale_by_factored_rms
from adafactor_jax.momentum import FLOAT32, INT8, ema_momentum, momentum_dtype_or_error
from adafactor_jax.nonfinite import skip_nonfinite as skip_nonfinite_steps
from adafactor_jax.rounding import stochastic_rounding as stochastic_rounding_step
from adafactor_jax.scaling import scale_by_learning_rate, scale_by_parameter_scale
from adafactor_jax.schedules import relative_step_size


def adafactor(
  learning_rate: optax.ScalarOrSchedule | None = None,
  *,
  decay_rate: float = 0.8,
  decay_offset: int = 0,
  beta2_cap: float | None = None,
  clipping_threshold: float | None = 1.0,
  multiply_by_parameter_scale: bool = True,
  epsilon1: float = 1e-30,
  epsilon2: float = 1e-3,
  warmup_init: bool = False,
  momentum: float | None = None,
  momentum_dtype: Any = FLOAT32,
  weight_decay_rate: optax.ScalarOrSchedule | None = None,
  weight_decay_mask: Any = None,
  factored: bool = True,
  min_dim_size_to_factor: int | None = None,
  skip_nonfinite: bool = False,
  factor_dims: FactorDimsFn | FactorRules | None = None,
  stochastic_rounding: bool = False,
  rounding_seed: int = 0,
  weight_decay_scaled_by_step: bool = False,
  maximize: bool = False,
  telemetry: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The Adafactor optimizer, with the defaults of the paper's Algorithm 6.

  Each step, for every parameter :math:`X` with gradient :math:`G`, in order:

  1. :math:`U = G/\sqrt{\hat V}`, the factored second moment
     (:func:`scale_by_factored_rms`; float32 statistics, decay
     :math:`\hat\beta_{2t} = \min(\text{beta2\_cap}, 1 - (t - \text{decay\_offset})^{-c})`);
  2. clipping, :math:`U / \max(1, \mathrm{RMS}(U)/d)`
     (as :func:`clip_by_update_rms`, but fused into
     :func:`scale_by_factored_rms` so that :math:`U` is never stored; skipped
     when ``clipping_threshold`` is None);
  3. times the step size: ``learning_rate`` (a float or an optax schedule), or
     when it is None the relative step :math:`\rho_t = \min(10^{-2}, 1/\sqrt t)`
     (:func:`adafactor_jax.schedules.relative_step_size`);
  4. times the parameter scale :math:`\max(\epsilon_2, \mathrm{RMS}(X))`
     (:func:`scale_by_parameter_scale`), if ``multiply_by_parameter_scale``;
  5. momentum, if set: an exponential moving average
     :math:`M \leftarrow \beta_1 M + (1-\beta_1) U` of the update *after* steps
     1–4, i.e. of the clipped, step-size-scaled update, with no bias
     correction, stored in ``momentum_dtype`` (as optax and T5X; HF #34506),
     with float32 arithmetic; :math:`U \leftarrow M` as stored
     (:func:`adafactor_jax.ema_momentum`). int8 with clipping quantizes on
     the grid of :func:`adafactor_jax.momentum.chord_bound`, an upper bound of
     each line's maximum, exact when nothing is clipped, which the pass that
     computes the clipping denominator gives: one read of :math:`G` less;
  6. decoupled weight decay, if set: :math:`U + \lambda X` for the parameters
     ``weight_decay_mask`` selects; :math:`\lambda` is a *rate*, not multiplied
     by the step size (as ``optax.adafactor``'s and T5X's ``weight_decay_rate``:
     :math:`X (1 - \lambda)`; for AdamW's convention, :math:`X(1 - \eta_t
     \lambda)`, pass a schedule such as ``lambda t: wd * lr(t)``). With
     ``weight_decay_scaled_by_step`` it is added between steps 2 and 3
     instead, so that the step size and parameter scale multiply it (and
     momentum averages it): :math:`X(1 - \lambda\alpha_t)` (HF transformers);
  7. negated, so that ``optax.apply_updates`` descends:
     :math:`X_t = X_{t-1} - \alpha_t \hat U_t` (with ``maximize``, the
     step size of step 3 takes the other sign, so it ascends);
  8. if ``stochastic_rounding``, adjusted so that bfloat16 and float16
     parameters land on :math:`X_t` rounded stochastically rather than to
     nearest (:func:`adafactor_jax.stochastic_rounding`).

  With ``learning_rate`` a float, the numerics equal ``optax.adafactor`` with
  the same arguments, for float32 and complex64 parameters (:math:`G^2` is
  :math:`|G|^2`, as optax) and float32 momentum. Unlike
  ``optax.adafactor``, ``learning_rate=None`` means the paper's relative step
  (optax then takes no step size at all), statistics stay float32 for bf16
  parameters, momentum arithmetic is float32 whatever ``momentum_dtype``,
  ``decay_offset > 0`` is finite, and the state holds no placeholder arrays.

  Args:
    learning_rate: None for the relative step size :math:`\rho_t`, or an
      absolute step size > 0 (float or optax schedule), still multiplied by the
      parameter scale when that is on. Defaults to ``None``.
    decay_rate: :math:`c > 0` in :math:`\hat\beta_{2t} = 1 - t^{-c}`.
      HF/torch write ``-0.8`` for this. Defaults to ``0.8``.
    decay_offset: steps >= 0 after which the decay restarts (fine-tuning).
      Defaults to ``0``.
    beta2_cap: optional upper bound in (0, 1] on :math:`\hat\beta_{2t}`.
      Defaults to ``None``.
    clipping_threshold: :math:`d > 0`, or None for no update clipping.
      Defaults to ``1.0``.
    multiply_by_parameter_scale: scale steps by :math:`\max(\epsilon_2,
      \mathrm{RMS}(X))`. Defaults to ``True``.
    epsilon1: :math:`\epsilon_1 > 0` added to :math:`G^2`. Defaults to ``1e-30``.
    epsilon2: :math:`\epsilon_2 \ge 0`, the least parameter scale. Defaults to
      ``1e-3``.
    warmup_init: use :math:`\min(10^{-6}t, 1/\sqrt t)`; only with
      ``learning_rate=None``. Defaults to ``False``.
    momentum: :math:`\beta_1 \in [0, 1)`, or None for no first moment (and no
      memory for it). Defaults to ``None``.
    momentum_dtype: dtype of the momentum buffer (bfloat16 halves it; int8
      quarters it, plus a float32 scale per line along the parameter's longest
      axis: see :func:`ema_momentum`, and step 5 for its grid).
      Defaults to ``float32``.
    weight_decay_rate: decoupled weight decay rate >= 0 (float or schedule), or
      None; not multiplied by the step size (step 6). Defaults to ``None``.
    weight_decay_mask: a tree of bools (or a callable of the params giving
      one) selecting the parameters to decay, as ``optax.add_decayed_weights``.
      Defaults to ``None``, all of them.
    factored: factor the second moment of parameters of rank >= 2. Defaults to
      ``True``.
    min_dim_size_to_factor: factor only when the second largest dimension is
      at least this (>= 1). None means 128; it is None rather than 128 so that
      ``optax.inject_hyperparams`` leaves it static and ``jax.jit(tx.init)``
      works without ``static_args``. Defaults to ``None``.
    skip_nonfinite: if True, a step whose gradients hold a NaN or an Inf leaves
      the parameters and the whole state bit-identical and counts the step in
      ``state.skipped_steps`` (:func:`adafactor_jax.skip_nonfinite`). If False,
      non-finite gradients propagate into the parameters and statistics as they
      would in optax. Defaults to ``False``.
    factor_dims: overrides the default choice of factored axes per parameter
      (see :func:`scale_by_factored_rms`), e.g.
      :func:`adafactor_jax.logical_factor_dims` to choose them by Flax logical
      axis names. Batch axes it declares (scanned layers) get statistics,
      clipping and parameter scale per slice. Defaults to ``None``, the two
      largest dimensions.
    stochastic_rounding: round bfloat16 and float16 parameters stochastically
      (unbiased) when the update is applied, instead of to nearest, which
      drops updates under half a unit in the last place. Float32 parameters
      are unaffected. Adds a PRNG key to the state. Defaults to ``False``.
    rounding_seed: the integer seed of that key; the rounding is a pure
      function of the seed and the step. Defaults to ``0``.
    weight_decay_scaled_by_step: if True, weight decay is added before the
      step size and parameter scale, which then multiply it (step 6; HF
      transformers' convention), instead of after them. Defaults to ``False``.
    maximize: if True, ascend: the step is that of the negated gradient
      (:math:`U` is odd in :math:`G`, :math:`\hat V` even) while weight decay
      still shrinks the parameters (torch's ``maximize``). A sign on the step
      size: no extra pass over the update. Defaults to ``False``.
    telemetry: if True, the state also records, each step, :math:`\hat\beta_{2t}`,
      the step size, and per parameter (per slice along batch axes)
      :math:`\mathrm{RMS}(U_t)` before clipping, the clipping denominator
      :math:`\max(1, \mathrm{RMS}(U_t)/d)` and the parameter scale: scalars
      the step computes anyway, so it costs no extra pass over the parameters.
      Read them with :func:`adafactor_jax.telemetry`. If False, the state and
      the step are exactly those without this argument. Defaults to ``False``.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  _checks.check_scalar(
    "learning_rate",
    learning_rate,
    low=0.0,
    low_open=True,
    allow_none=True,
    allow_schedule=True,
    hint="Pass None for the paper's relative step size.",
  )
  _checks.check_bool("warmup_init", warmup_init)
  if warmup_init and learning_rate is not None:
    raise ValueError(
      "warmup_init=True is the warmup of the relative step size and needs "
      f"learning_rate=None, got learning_rate={learning_rate!r}. For an "
      "absolute step with warmup, pass an optax schedule as learning_rate."
    )
  _checks.check_bool("multiply_by_parameter_scale", multiply_by_parameter_scale)
  # Checked even without momentum; momentum itself is checked by ema_momentum.
  momentum_dtype = momentum_dtype_or_error(momentum_dtype)
  _checks.check_scalar(
    "weight_decay_rate",
    weight_decay_rate,
    low=0.0,
    allow_none=True,
    allow_schedule=True,
  )
  if weight_decay_rate is None and weight_decay_mask is not None:
    raise ValueError(
      "weight_decay_mask is set but weight_decay_rate is None: pass weight_decay_rate too, "
      "or drop the mask."
    )
  _checks.check_bool("skip_nonfinite", skip_nonfinite)
  _checks.check_scalar("epsilon2", epsilon2, low=0.0)
  _checks.check_bool("stochastic_rounding", stochastic_rounding)
  _checks.check_scalar("rounding_seed", rounding_seed, integer=True)
  _checks.check_bool("weight_decay_scaled_by_step", weight_decay_scaled_by_step)
  _checks.check_bool("maximize", maximize)
  _checks.check_bool("telemetry", telemetry)

  chain = [
    scale_by_factored_rms(
      decay_rate=decay_rate,
      decay_offset=decay_offset,
      beta2_cap=beta2_cap,
      epsilon1=epsilon1,
      factored=factored,
      min_dim_size_to_factor=min_dim_size_to_factor,
      factor_dims=factor_dims,
      clipping_threshold=clipping_threshold,
      telemetry=telemetry,
    )
  ]
  weight_decay_step = (
    None
    if weight_decay_rate is None
    else optax.add_decayed_weights(weight_decay_rate, weight_decay_mask)
  )
  if weight_decay_step is not None and weight_decay_scaled_by_step:
    chain.append(weight_decay_step)
  if learning_rate is None:
    learning_rate = relative_step_size(warmup_init)
  chain.append(scale_by_learning_rate(learning_rate, flip_sign=maximize, telemetry=telemetry))
  if multiply_by_parameter_scale:
    chain.append(scale_by_parameter_scale(epsilon2, factor_dims=factor_dims, telemetry=telemetry))
  if momentum is not None:
    chain.append(ema_momentum(momentum, momentum_dtype=momentum_dtype))
  if weight_decay_step is not None and not weight_decay_scaled_by_step:
    chain.append(weight_decay_step)
  chain.append(optax.scale(-1.0))
  if stochastic_rounding:
    chain.append(stochastic_rounding_step(rounding_seed))
  tx = optax.chain(*chain)
  if (
    momentum is not None
    and momentum_dtype == INT8
    and clipping_threshold is not None
    and not (weight_decay_step is not None and weight_decay_scaled_by_step)
  ):
    # Between the two only the step size and the parameter scale, factors per parameter.
    tx = _clipping_deferred_to_momentum(tx)
  return skip_nonfinite_steps(tx) if skip_nonfinite else tx


def _clipping_deferred_to_momentum(
  tx: optax.GradientTransformationExtraArgs,
) -> optax.GradientTransformationExtraArgs:
  """``tx``, the chain of :func:`adafactor` with int8 momentum, whose factored transformation
  leaves the clipping to the momentum (:class:`adafactor_jax._probe.DeferredClipping`), so
  that the momentum bounds its lines' maxima in the pass that computes the clipping
  denominator (:func:`adafactor_jax.momentum.chord_bound`). Same state, same update up to
  rounding; the int8 grid is the bound's."""

  def update_fn(
    updates: optax.Updates,
    state: optax.OptState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.OptState]:
    deferral = _probe.DeferredClipping()
    extra_args = {**extra_args, _probe.DEFERRED_CLIPPING_ARG: deferral}
    updates, state = tx.update(updates, state, params, **extra_args)
    deferral.check()
    return updates, state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
