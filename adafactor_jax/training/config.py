"""Checks a training config against ``configs/default.py``, which defines every key.

A config is refused with :class:`ConfigError`, naming the key, before the job
touches anything: an unknown key (with the nearest known one), a value of the
wrong type, or a value out of range.
"""

from __future__ import annotations

import difflib
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from adafactor_jax.training.configs import default as default_config

# Keys that may be None although their default is not (those whose default is None may too).
NULLABLE_KEYS = frozenset({"optimizer.clipping_threshold", "optimizer.learning_rate"})
MESH_AXES = ("data", "model")


class ConfigError(ValueError):
  """A config or workdir that the job refuses before it touches anything."""


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """The config's values by dotted key."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def field_types(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type | None]:
  """The declared type of every field of the default config (None where any type goes)."""
  types = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      types.update(field_types(value, f"{prefix}{key}."))
    else:
      types[f"{prefix}{key}"] = config.get_ref(key).get_type()
  return types


def nullable_keys(default: ml_collections.ConfigDict) -> frozenset[str]:
  return NULLABLE_KEYS | {key for key, value in flatten(default).items() if value is None}


def unknown_key(key: str, types: dict[str, Any], flag: str | None = None) -> ConfigError:
  """The error for a key the default config lacks, naming its nearest known key."""
  close = difflib.get_close_matches(key, list(types), n=1)
  if flag is None:
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint}")
  hint = f" Did you mean --config.{close[0]}?" if close else ""
  return ConfigError(f"unknown config key {key!r} in {flag!r}.{hint}")


def set_config_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key, None included (ml_collections types a field by its first value)."""
  *parents, leaf = key.split(".")
  for part in parents:
    config = config[part]
  with config.ignore_type():
    config[leaf] = value


def resolve_config(config: Any) -> ml_collections.ConfigDict:
  """Checks a user config against the default's keys and types, and returns a full copy.

  Raises:
    ConfigError: for a config that is not a ConfigDict, an unknown key (with
      the nearest known one), or a value of the wrong type or out of range.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"the config must be an ml_collections.ConfigDict (get_config() returned a "
      f"{type(config).__name__})."
    )
  resolved = default_config.get_config()
  types = field_types(resolved)
  nullable = nullable_keys(resolved)
  for key, value in flatten(config).items():
    if key not in types:
      raise unknown_key(key, types)
    expected = types[key]
    if value is None and key not in nullable:
      raise ConfigError(f"config key {key!r} cannot be None.")
    if value is not None and expected is not None:
      if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      elif expected is tuple and isinstance(value, list):
        value = tuple(value)
      elif not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(
          f"config key {key!r} must be {expected.__name__}, got {type(value).__name__} {value!r}."
        )
    set_config_value(resolved, key, value)
  _check_values(resolved)
  return resolved


def _check_values(config: ml_collections.ConfigDict) -> None:
  def positive(key: str, value: Any) -> None:
    if value is None or value <= 0:
      raise ConfigError(f"config key {key!r} must be > 0, got {value!r}.")

  for key in (
    "num_steps",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
  ):
    positive(key, config[key])
  for key in ("seq_len", "batch_size", "max_bytes"):
    positive(f"data.{key}", config.data[key])
  if not 0.0 < config.data.eval_fraction < 1.0:
    raise ConfigError(
      f"config key 'data.eval_fraction' must be in (0, 1), got {config.data.eval_fraction!r}."
    )
  for key in ("d_model", "num_layers", "num_heads", "mlp_dim", "embed_init_scale"):
    positive(f"model.{key}", config.model[key])
  if config.model.d_model % config.model.num_heads:
    raise ConfigError(
      f"config key 'model.d_model' ({config.model.d_model}) must be a multiple of "
      f"'model.num_heads' ({config.model.num_heads})."
    )
  dtype("model.param_dtype", config.model.param_dtype)
  if config.checkpoint_every % config.log_every:
    raise ConfigError(
      f"config key 'checkpoint_every' ({config.checkpoint_every}) must be a multiple of "
      f"'log_every' ({config.log_every}), so a resumed run logs the same windows."
    )
  if config.optimizer.weight_decay is not None and not config.optimizer.weight_decay >= 0:
    raise ConfigError(
      f"config key 'optimizer.weight_decay' must be >= 0, got {config.optimizer.weight_decay!r}."
    )
  _check_mesh(config.mesh)
  _check_switch(config.optimizer)
  _check_fused_backward(config)


OPTIMIZERS = ("adafactor", "big_vision", "t5x", "adamw", "optax_adafactor")


def _check_switch(opt: ml_collections.ConfigDict) -> None:
  if opt.switch_from is None:
    return
  if opt.switch_from not in OPTIMIZERS or opt.switch_from == opt.name:
    raise ConfigError(
      f"config key 'optimizer.switch_from' must name the optimizer the workdir's run used, "
      f"one of {OPTIMIZERS} other than 'optimizer.name' ({opt.name!r}), got {opt.switch_from!r}."
    )
  if opt.warm_start and opt.name == "adamw":
    raise ConfigError(
      "config key 'optimizer.warm_start' converts the state into an Adafactor of this library; "
      "'optimizer.name' is 'adamw': pass --config.optimizer.warm_start=False for a cold start."
    )


def _check_fused_backward(config: ml_collections.ConfigDict) -> None:
  """What the fused step (adafactor_jax.fused_train_step) cannot do is refused by its key."""
  opt = config.optimizer
  if not opt.fused_backward:
    return
  cannot = None
  if not config.model.scan_layers:
    cannot = (
      "needs the blocks stacked on a leading axis: set 'model.scan_layers' = True too (a new "
      "run: its checkpoints are not an unscanned model's)"
    )
  elif opt.name != "adafactor":
    cannot = f"applies 'optimizer.name' = 'adafactor' only, got {opt.name!r}"
  elif opt.skip_nonfinite:
    cannot = (
      "cannot skip a whole step on a non-finite gradient ('optimizer.skip_nonfinite'): the "
      "last layers are updated before the first layers' gradients exist"
    )
  elif opt.stochastic_rounding:
    cannot = (
      "cannot round stochastically ('optimizer.stochastic_rounding'): each layer's update "
      "would draw the same rounding noise"
    )
  elif opt.switch_from is not None:
    cannot = (
      "cannot switch optimizers mid-run ('optimizer.switch_from'): its state is kept per "
      "layer, which warm_start_state does not convert into"
    )
  if cannot:
    raise ConfigError(f"config key 'optimizer.fused_backward' {cannot}.")


def _check_mesh(mesh: ml_collections.ConfigDict) -> None:
  sizes = {axis: mesh[axis] for axis in MESH_AXES}
  for axis, size in sizes.items():
    if size != -1 and size < 1:
      raise ConfigError(
        f"config key 'mesh.{axis}' must be >= 1, or -1 for all the remaining devices, got {size!r}."
      )
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(
      "config keys 'mesh.data' and 'mesh.model' cannot both be -1: set one of them."
    )
  for rule in mesh.logical_axis_rules:
    if not (
      isinstance(rule, tuple)
      and len(rule) == 2
      and isinstance(rule[0], str)
      and (rule[1] is None or isinstance(rule[1], str))
    ):
      raise ConfigError(
        f"config key 'mesh.logical_axis_rules' holds {rule!r}: each rule is a pair "
        "(logical axis name, mesh axis or None), e.g. ('embed', 'data')."
      )
    if rule[1] is not None and rule[1] not in MESH_AXES:
      raise ConfigError(
        f"config key 'mesh.logical_axis_rules': the rule {rule!r} names the mesh axis "
        f"{rule[1]!r}; the mesh axes are {MESH_AXES} (None for replicated)."
      )


def dtype(key: str, name: str) -> np.dtype:
  """The dtype a config key names, or ConfigError naming the key."""
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ConfigError(f"config key {key!r}: {name!r} is not a dtype name.") from None
