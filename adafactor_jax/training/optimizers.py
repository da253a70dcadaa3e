"""The job's optimizer, built from the config's ``optimizer`` section.

``create_optimizer`` turns ``config.optimizer`` into an optax transformation: the learning rate
schedule (warmup, then constant, cosine or rsqrt decay) and the optimizer that
``optimizer.name`` picks. With ``optimizer.fused_backward`` it is a :class:`Layerwise`
optimizer, whose state the fused train step keeps per layer. ``switched_state`` converts the
state of the optimizer a run switches from.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import PartitionSpec

import adafactor_jax
from adafactor_jax.training.config import (
  ADAM_OPTIMIZERS,
  OPTIMIZERS,
  TRAINER_KEYS,
  ConfigError,
  dtype,
  not_an_argument,
  optimizer_arguments,
)

# The optimizers that record no telemetry: optax's, and StableAdamW (an AdamW).
WITHOUT_TELEMETRY = ("adamw", "optax_adafactor", "stable_adamw")


def warmup_steps(steps: int, fraction: float, num_steps: int) -> int:
  """The steps of warmup that 'optimizer.warmup_steps' or 'optimizer.warmup_fraction' make."""
  return steps or round(fraction * num_steps)


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule | None:
  """The configured schedule: linear warmup, then constant, cosine or rsqrt decay."""
  fraction = opt.warmup_fraction
  if opt.learning_rate is None:
    if opt.schedule != "constant" or opt.warmup_steps or fraction:
      raise ConfigError(
        "config keys 'optimizer.schedule', 'optimizer.warmup_steps' and "
        "'optimizer.warmup_fraction' need 'optimizer.learning_rate'; without one Adafactor uses "
        "its relative step size."
      )
    return None
  peak, warmup = opt.learning_rate, opt.warmup_steps
  if peak <= 0:
    raise ConfigError(f"config key 'optimizer.learning_rate' must be > 0, got {peak!r}.")
  if not 0 <= fraction < 1:
    raise ConfigError(
      f"config key 'optimizer.warmup_fraction' must be in [0, 1), got {fraction!r}."
    )
  if fraction and warmup:
    raise ConfigError(
      f"config keys 'optimizer.warmup_steps' ({warmup!r}) and 'optimizer.warmup_fraction' "
      f"({fraction!r}) both set a warmup: set one, the other to 0."
    )
  warmup = warmup_steps(warmup, fraction, num_steps)
  if warmup < 0 or warmup >= num_steps:
    raise ConfigError(
      f"config key 'optimizer.warmup_steps' must be in [0, num_steps={num_steps}), got {warmup!r}."
    )
  if opt.schedule == "constant":
    decay = optax.constant_schedule(peak)
  elif opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, num_steps - warmup, alpha=0.1)
  elif opt.schedule == "rsqrt":
    # rsqrt_decay holds the peak for its warmup steps rather than ramping up to it.
    return adafactor_jax.schedules.rsqrt_decay(peak, warmup_steps=max(warmup, 1))
  else:
    raise ConfigError(
      f"config key 'optimizer.schedule' must be 'constant', 'cosine' or 'rsqrt', got "
      f"{opt.schedule!r}."
    )
  if not warmup:
    return decay
  ramp = optax.linear_schedule(peak / warmup, peak, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def create_optimizer(
  opt: ml_collections.ConfigDict, num_steps: int, param_axes: Any = None
) -> optax.GradientTransformation:
  """Builds the optimizer ``optimizer.name`` picks (config.OPTIMIZERS) from the section's other
  keys, its keyword arguments; invalid settings raise ConfigError naming the key.

  The trainer passes the arguments of its own keys (config.SUPPLIED): the learning
  rate schedule; with ``param_axes`` (the params' logical axis names), factored
  axes chosen by those names (``adafactor_jax.logical_factor_dims``), the names
  that shard the parameters, rather than by their shapes; telemetry; stochastic
  rounding (chained after an optimizer that does not take it); and
  ``optimizer.weight_decay`` as ``optax.adamw``'s, in whatever form the
  optimizer takes it. With ``optimizer.clip_global_norm``, the optimizer is
  ``optax.chain(optax.clip_by_global_norm(c), optimizer)``. With
  ``optimizer.fused_backward``, a :class:`Layerwise` optimizer: the fused step's.
  """
  lr = learning_rate_schedule(opt, num_steps)
  clip = opt.clip_global_norm
  if clip is not None and not clip > 0:
    raise ConfigError(f"config key 'optimizer.clip_global_norm' must be > 0 or None, got {clip!r}.")
  arguments = optimizer_arguments(opt.name)
  for key in opt:
    if key not in TRAINER_KEYS:
      if key not in arguments:
        raise not_an_argument(key, opt.name)
      arguments[key] = opt[key]
  for key, value in arguments.items():
    if "dtype" in key and isinstance(value, str):
      arguments[key] = dtype(f"optimizer.{key}", value)
  try:
    if param_axes is not None and opt.fused_backward:  # the optimizer sees one layer at a time
      param_axes = _one_layer_axes(param_axes)
    supplied = _supplied(opt, lr, arguments, param_axes)
    function = OPTIMIZERS[opt.name]
    takes = inspect.signature(function).parameters
    tx = function(**arguments, **{k: v for k, v in supplied.items() if k in takes})
    if opt.stochastic_rounding and "stochastic_rounding" not in takes:
      tx = optax.chain(tx, adafactor_jax.stochastic_rounding(opt.rounding_seed))
    if opt.clip_global_norm is not None:  # stateless: warm starts find the optimizer's state
      tx = optax.chain(optax.clip_by_global_norm(opt.clip_global_norm), tx)
    return layerwise(tx) if opt.fused_backward else tx
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer {opt.name!r}: {e}") from e


def _supplied(
  opt: ml_collections.ConfigDict,
  lr: optax.Schedule | None,
  arguments: dict[str, Any],
  param_axes: Any,
) -> dict[str, Any]:
  """The arguments the trainer passes from its own keys (those the optimizer takes are)."""
  if opt.telemetry and opt.name in WITHOUT_TELEMETRY:
    raise ConfigError(
      "config key 'optimizer.telemetry' asks for this library's figures (adafactor_jax.telemetry);"
      f" 'optimizer.name' {opt.name!r} records none: pass --config.optimizer.telemetry=False "
      "(configs/adamw.py does)."
    )
  if lr is None and opt.name in WITHOUT_TELEMETRY:  # optax's and StableAdamW need one
    raise ConfigError(f"config key 'optimizer.learning_rate' is required for {opt.name}.")
  factor_dims = None
  if param_axes is not None and arguments.get("factored", True):
    size = arguments.get("min_dim_size_to_factor")  # None: logical_factor_dims' default
    factor_dims = adafactor_jax.logical_factor_dims(
      param_axes, **({} if size is None else {"min_dim_size_to_factor": size})
    )
  # The step size that 'optimizer.weight_decay' is multiplied by: without a learning rate,
  # Adafactor's relative step, or presets.t5x's default learning rate.
  step_size: Any = lr
  if lr is None and opt.name == "adafactor":
    step_size = adafactor_jax.relative_step_size(arguments["warmup_init"])
  elif lr is None and opt.name == "t5x":
    step_size = adafactor_jax.schedules.rsqrt_decay()
  decay = opt.weight_decay
  return {
    "learning_rate": lr,
    "factor_dims": factor_dims,
    "telemetry": opt.telemetry,
    "stochastic_rounding": opt.stochastic_rounding,
    "rounding_seed": opt.rounding_seed,
    # optax.adamw's own weight decay (whose None is 0), StableAdamW's and big_vision's, are the
    # key's.
    "weight_decay": decay if decay is not None or opt.name not in ADAM_OPTIMIZERS else 0.0,
    # The library's weight_decay_rate is not multiplied by the step size.
    "weight_decay_rate": None if decay is None else (lambda count: decay * step_size(count)),
  }


class Layerwise(optax.GradientTransformation):
  """``layer_tx`` with its state kept as the fused backward step keeps it.

  ``init(params)`` gives an ``adafactor_jax.FusedState``: ``layer_tx``'s state of
  each layer of the scanned stack (``params['blocks']``, stacked on its leading
  axis) and of the other parameters. The update is applied inside the backward
  pass by the train step (``make_steps``), never through ``update``.
  """

  layer_tx: optax.GradientTransformation


def layerwise(layer_tx: optax.GradientTransformation) -> Layerwise:
  """The job's optimizer with ``optimizer.fused_backward``: its ``init`` is the fused step's."""
  tx = Layerwise(functools.partial(_layerwise_init, layer_tx), _layerwise_update)
  tx.layer_tx = layer_tx
  return tx


def _layerwise_init(layer_tx: optax.GradientTransformation, params: Any) -> Any:
  layers, rest = split_layers(params)
  return adafactor_jax.FusedState(jax.vmap(layer_tx.init)(layers), layer_tx.init(rest))


def _layerwise_update(updates: Any, state: Any, params: Any = None) -> Any:
  raise ValueError(
    "with 'optimizer.fused_backward' the update is applied inside the backward pass by "
    "adafactor_jax.fused_train_step (train.make_steps), not by update()."
  )


def split_layers(params: nnx.State) -> tuple[nnx.State, nnx.State]:
  """(the scanned stack of blocks, every other parameter)."""
  raw = params.raw_mapping  # nested dicts, as nnx.split makes them (not nested States)
  return nnx.State(raw["blocks"]), nnx.State({k: v for k, v in raw.items() if k != "blocks"})


def join_layers(layers: nnx.State, rest: nnx.State) -> nnx.State:
  """The params again, from what split_layers gave."""
  return nnx.State({**rest.raw_mapping, "blocks": layers.raw_mapping})


def _one_layer_axes(param_axes: Any) -> Any:
  """The logical names that the fused step's optimizer sees: one block (its 'layers' axis
  dropped) and the other parameters, in one tree (their paths do not collide)."""
  layers, rest = split_layers(param_axes)
  one_layer = jax.tree.map(
    lambda names: PartitionSpec(*names[1:]), layers, is_leaf=lambda x: isinstance(x, PartitionSpec)
  )
  return nnx.State({**rest.raw_mapping, **one_layer.raw_mapping})


def switched_state(
  opt: ml_collections.ConfigDict,
  source_opt: ml_collections.ConfigDict,
  tx: optax.GradientTransformation,
  params: Any,
  source_state: Any,
) -> Any:
  """The state ``tx`` starts from when the run switches to it from ``source_opt``'s optimizer.

  Warm (``optimizer.warm_start``): the source's statistics, momentum and step
  count, converted by ``adafactor_jax.warm_start_state`` (Adam's bias
  corrections with the source's own b1 and b2). Cold: ``tx.init(params)``.
  """
  if not opt.warm_start:
    return tx.init(params)
  adam = source_opt.name in ADAM_OPTIMIZERS
  betas = {"b1": source_opt.b1, "b2": source_opt.b2} if adam else {}
  try:
    return adafactor_jax.warm_start_state(tx, params=params, source_state=source_state, **betas)
  except ValueError as e:
    raise ConfigError(
      f"config key 'optimizer.warm_start': the state of {source_opt.name!r} does not convert "
      f"into {opt.name!r}'s ({e}) Pass --config.optimizer.warm_start=False for a cold start."
    ) from e
