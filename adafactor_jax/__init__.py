"""Adafactor for JAX, as composable Optax gradient transformations."""

from adafactor_jax import presets, schedules
from adafactor_jax._telemetry import TelemetryState, telemetry
from adafactor_jax.alias import adafactor
from adafactor_jax.clipping import clip_by_update_rms
from adafactor_jax.factored import (
  FactorAxes,
  ScaleByFactoredRmsState,
  default_factor_dims,
  scale_by_factored_rms,
)
from adafactor_jax.fused import FusedState, FusedTrainStep, fused_train_step
from adafactor_jax.momentum import EmaMomentumState, Int8MomentumState, ema_momentum
from adafactor_jax.nonfinite import SkipNonfiniteState, skip_nonfinite
from adafactor_jax.ordered import update_and_apply
from adafactor_jax.rounding import StochasticRoundingState, stochastic_round, stochastic_rounding
from adafactor_jax.scaling import scale_by_learning_rate, scale_by_parameter_scale
from adafactor_jax.schedules import decay_rate_pow, relative_step_size
from adafactor_jax.sharding import STANDARD_FACTOR_RULES, logical_factor_dims, state_shardings
from adafactor_jax.warm_start import warm_start_state

__version__ = "0.1.0"

__all__ = [
  "STANDARD_FACTOR_RULES",
  "EmaMomentumState",
  "FactorAxes",
  "FusedState",
  "FusedTrainStep",
  "Int8MomentumState",
  "ScaleByFactoredRmsState",
  "SkipNonfiniteState",
  "StochasticRoundingState",
  "TelemetryState",
  "adafactor",
  "clip_by_update_rms",
  "decay_rate_pow",
  "default_factor_dims",
  "ema_momentum",
  "fused_train_step",
  "logical_factor_dims",
  "presets",
  "relative_step_size",
  "scale_by_factored_rms",
  "scale_by_learning_rate",
  "scale_by_parameter_scale",
  "schedules",
  "skip_nonfinite",
  "state_shardings",
  "stochastic_round",
  "stochastic_rounding",
  "telemetry",
  "update_and_apply",
  "warm_start_state",
]
