"""The job's config: loaded by name or file, overridden by flags, checked, completed.

``configs/default.py`` defines every key of the job. The ``optimizer`` section
holds the trainer's keys (default.py's) and, as big_vision's ``config.optax``
does, keyword arguments of the optimizer that ``optimizer.name`` picks
(:data:`OPTIMIZERS`): a library function or preset, whose signature gives every
argument a config leaves out (:func:`resolve_config` fills them in, so that
``config.json`` records the whole run). A key the chosen optimizer does not take
is refused, naming the key and the optimizer.

A config is refused with :class:`ConfigError`, naming the key, before the job
touches anything: an unknown key (with the nearest known one), a value of the
wrong type, or a value out of range.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import inspect
import os
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from ml_collections import config_dict, config_flags

import adafactor_jax
from adafactor_jax.training.configs import default as default_config

# optimizer.name -> the function whose keyword arguments the rest of the section is.
OPTIMIZERS = {
  "adafactor": adafactor_jax.adafactor,
  "big_vision": adafactor_jax.presets.big_vision,
  "t5x": adafactor_jax.presets.t5x,
  "adamw": optax.adamw,
  "optax_adafactor": optax.adafactor,
  "stable_adamw": adafactor_jax.presets.stable_adamw,
}
# The optimizers whose state is Adam's (optax.ScaleByAdamState): a switch warm-starts from
# them, with their own b1 and b2, but not into them (warm_start_state makes an Adafactor).
ADAM_OPTIMIZERS = ("adamw", "stable_adamw")
# Arguments the trainer passes from its own keys (optimizers.create_optimizer): the learning
# rate schedule, factored axes by the params' logical names, telemetry, rounding, and
# 'optimizer.weight_decay' as the weight decay each optimizer takes.
SUPPLIED = frozenset(
  {
    "learning_rate",
    "factor_dims",
    "telemetry",
    "stochastic_rounding",
    "rounding_seed",
    "weight_decay",
    "weight_decay_rate",
  }
)
# Keys that may be None although their default is not (those whose default is None may too).
NULLABLE_KEYS = frozenset({"optimizer.learning_rate"})
MESH_AXES = ("data", "model")
CONFIGS_DIR = os.path.dirname(os.path.abspath(default_config.__file__))
# The optimizer section's keys that the trainer reads itself; the others are arguments.
TRAINER_KEYS = tuple(default_config.get_config().optimizer.keys())


class ConfigError(ValueError):
  """A config or workdir that the job refuses before it touches anything."""


def optimizer_arguments(name: str, typed: bool = False) -> dict[str, Any]:
  """The keyword arguments a config may give optimizer ``name``, with their defaults (a dtype
  by its name, as a config writes it; ``typed``, a None as a placeholder of its annotation's
  type, which the flags parse values by)."""
  if name not in OPTIMIZERS:
    raise ConfigError(
      f"config key 'optimizer.name' must be one of {tuple(OPTIMIZERS)}, got {name!r}."
    )
  arguments = {}
  for arg in inspect.signature(OPTIMIZERS[name]).parameters.values():
    if arg.name not in SUPPLIED and arg.kind in (arg.KEYWORD_ONLY, arg.POSITIONAL_OR_KEYWORD):
      value = arg.default
      if isinstance(value, type | np.dtype) and "dtype" in arg.name:
        value = jnp.dtype(value).name
      elif value is None and typed:
        kind = str(arg.annotation).removeprefix("typing.")
        value = config_dict.placeholder(
          next((t for t in (float, int, bool, str) if kind.startswith(t.__name__)), object)
        )
      arguments[arg.name] = value
  return arguments


def not_an_argument(key: str, name: str, flag: str | None = None) -> ConfigError:
  """The error for an optimizer key that ``name``'s function does not take."""
  function = OPTIMIZERS[name]
  module = {"adafactor_jax.alias": "adafactor_jax", "optax._src.alias": "optax"}
  others = [other for other in OPTIMIZERS if key in optimizer_arguments(other)]
  known = [f"optimizer.{k}" for k in (*TRAINER_KEYS, *optimizer_arguments(name))]
  close = difflib.get_close_matches(f"optimizer.{key}", known, n=1)
  hint = ""
  if others:
    hint = f" It is an argument of {', '.join(map(repr, others))}."
  elif close:
    hint = f" Did you mean --config.{close[0]}?" if flag else f" Did you mean {close[0]!r}?"
  return ConfigError(
    f"unknown config key 'optimizer.{key}'{f' in {flag!r}' if flag else ''}: optimizer "
    f"{name!r} ({module.get(function.__module__, function.__module__)}.{function.__name__}) "
    f"takes no argument {key!r}.{hint}"
  )


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
  """The declared type of every field of a config (None where any type goes)."""
  types = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      types.update(field_types(value, f"{prefix}{key}."))
    else:
      try:
        types[f"{prefix}{key}"] = config.get_ref(key).get_type()
      except ValueError:  # set to None after its first value: any type
        types[f"{prefix}{key}"] = None
  return types


def nullable_keys(default: ml_collections.ConfigDict) -> frozenset[str]:
  """Keys that may be None: those above, those whose default is None, and the optimizer's
  arguments (the library refuses a None it does not take)."""
  arguments = {f"optimizer.{key}" for key in default.optimizer if key not in TRAINER_KEYS}
  return (
    NULLABLE_KEYS | arguments | {key for key, value in flatten(default).items() if value is None}
  )


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


def complete(config: ml_collections.ConfigDict, name: str | None = None) -> None:
  """Adds to ``config.optimizer`` each argument of optimizer ``name`` (by default the
  config's) that it does not set, at the function's default."""
  for key, value in optimizer_arguments(name or config.optimizer.name, typed=True).items():
    if key not in config.optimizer:
      config.optimizer[key] = value


def resolve_config(config: Any) -> ml_collections.ConfigDict:
  """Checks a user config against the default's keys and types and the optimizer's
  arguments, and returns a full copy.

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
  name = config.optimizer.get("name", resolved.optimizer.name) if "optimizer" in config else None
  complete(resolved, name)
  types = field_types(resolved)
  nullable = nullable_keys(resolved)
  misplaced = []  # refused after the trainer's keys, whose refusal says more (fused_backward's)
  for key, value in flatten(config).items():
    if key not in types:
      section, _, leaf = key.partition(".")
      if section == "optimizer" and "." not in leaf and name in OPTIMIZERS:
        misplaced.append(leaf)
        continue
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
  if misplaced:
    raise not_an_argument(misplaced[0], str(name))
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


def _check_switch(opt: ml_collections.ConfigDict) -> None:
  if opt.switch_from is None:
    return
  if opt.switch_from not in OPTIMIZERS or opt.switch_from == opt.name:
    raise ConfigError(
      f"config key 'optimizer.switch_from' must name the optimizer the workdir's run used, "
      f"one of {tuple(OPTIMIZERS)} other than 'optimizer.name' ({opt.name!r}), got "
      f"{opt.switch_from!r}."
    )
  if opt.warm_start and opt.name in ADAM_OPTIMIZERS:
    raise ConfigError(
      "config key 'optimizer.warm_start' converts the state into an Adafactor of this library; "
      f"'optimizer.name' is {opt.name!r}: pass --config.optimizer.warm_start=False for a cold "
      "start."
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
  elif opt.clip_global_norm is not None:
    cannot = (
      "cannot clip by the global norm ('optimizer.clip_global_norm'): each layer is updated "
      "from its own gradient before the next layer's exists, so the whole gradient's norm is "
      "never known"
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


# --------------------------------------------------------------------------- the command line


def packaged_configs() -> list[str]:
  """The names of the configs installed with the package (``configs/`` of the repository)."""
  return sorted(
    name.removesuffix(".py")
    for name in os.listdir(CONFIGS_DIR)
    if name.endswith(".py") and not name.startswith("_")
  )


def config_names() -> str:
  """The packaged configs as ``--config`` takes them, the paper's rows spelt out."""
  from adafactor_jax.training.configs import paper

  names = [name for name in packaged_configs() if name != "paper"]
  return ", ".join(names) + ", paper:<row> with <row> one of " + ", ".join(paper.ROWS)


def load_config(spec: str) -> tuple[ml_collections.ConfigDict, str]:
  """The config of ``--config NAME[:ARG]`` or ``PATH.py[:ARG]``, and a name for its workdir.

  A path that is not a file but names a packaged config (``configs/big_vision.py``
  outside the checkout) is that config.

  Raises:
    ConfigError: for a config that is neither a file nor a packaged name, that
      fails to load, or whose ``get_config`` does not return a ConfigDict.
  """
  path, colon, arg = spec.partition(":")
  name = os.path.basename(path).removesuffix(".py")
  if not os.path.isfile(path):
    if name not in packaged_configs():
      raise ConfigError(
        f"--config {spec!r}: no such file, nor a packaged config {name!r}. "
        f"The packaged configs: {config_names()}."
      )
    path = os.path.join(CONFIGS_DIR, f"{name}.py")
  module_spec = importlib.util.spec_from_file_location(f"adafactor_train_config_{name}", path)
  if module_spec is None or module_spec.loader is None:
    raise ConfigError(f"--config {spec!r}: {path!r} is not a Python file.")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(*([arg] if colon else []))
  except Exception as e:  # noqa: BLE001 (anything a config file raises is reported, no traceback)
    raise ConfigError(f"--config {spec!r}: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"--config {spec!r}: the config must be an ml_collections.ConfigDict "
      f"(get_config() returned a {type(config).__name__})."
    )
  return config, name + (f"-{arg}" if arg else "")


def config_spec(argv: list[str]) -> str:
  """The value of ``--config`` among the arguments ('default' when there is none)."""
  spec = "default"
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg[len("--config=") :]
    elif arg == "--config":
      spec = argv[i + 1] if i + 1 < len(argv) else ""
  return spec


def split_overrides(
  argv: list[str], config: ml_collections.ConfigDict
) -> tuple[list[str], list[str]]:
  """Takes ``--config NAME|PATH`` out of the arguments, and checks the ``--config.<key>`` flags.

  absl reports an unknown key as a bare AttributeError, and cannot parse
  ``None`` for a float field; this names the key and its nearest match (an
  optimizer's key among the arguments of the optimizer the flags name), and
  takes out the ``=None`` flags to apply after parsing. The arguments of the
  optimizer that ``config`` leaves out are added to it at their defaults, so
  that absl parses them by their type. Returns the remaining arguments and the
  keys to set to None.
  """
  overrides, kept = [], []
  args = iter(argv)
  for arg in args:
    if arg == "--config":
      next(args, "")
    elif arg.startswith("--config."):
      key, equals, value = arg[len("--config.") :].partition("=")
      overrides.append((arg, key, value if equals else next(args, "")))
    elif not arg.startswith("--config="):
      kept.append(arg)
  names = [value for _, key, value in overrides if key == "optimizer.name"]
  name = names[-1] if names else config.optimizer.get("name")
  if name in OPTIMIZERS:
    complete(config, name)
  types, nullable, unset = field_types(config), nullable_keys(config), []
  for arg, key, value in overrides:
    section, _, leaf = key.partition(".")
    others = [other for other in OPTIMIZERS if section == "optimizer" and other != name]
    other = next((o for o in others if leaf in optimizer_arguments(o)), None)
    if key not in types and other is not None:  # refused by resolve_config, after the
      config.optimizer[leaf] = optimizer_arguments(other, typed=True)[leaf]  # trainer's keys
      types[key] = None
    if key not in types:
      if section == "optimizer" and "." not in leaf and name in OPTIMIZERS:
        raise not_an_argument(leaf, name, flag=arg)
      raise unknown_key(key, types, flag=arg)
    if value == "None":
      if key not in nullable:
        raise ConfigError(f"config key {key!r} cannot be None.")
      unset.append(key)
    else:
      kept.append(f"--config.{key}={value}")
  return kept, unset


def override_values(argv: list[str], prog: str) -> tuple[list[str], dict[str, Any]]:
  """Takes the ``--config.<key>=<value>`` flags out of ``argv``, as {key: typed value}.

  For commands that run configs of their own (``adafactor-compare``): a value is
  parsed as ``adafactor-train`` parses it, by the default config's type, or for an
  optimizer's argument by its default's (any optimizer's arguments are taken).
  Returns the other arguments and the overrides.
  """
  if config_spec(argv) != "default":
    raise ConfigError(f"{prog} takes no --config: override keys with --config.<key>=<value>.")
  config = default_config.get_config()
  for name in OPTIMIZERS:  # the suites' runs of each optimizer take its own arguments
    complete(config, name)
  kept, unset = split_overrides(argv, config)
  flags_given = [arg for arg in kept[1:] if arg.startswith("--config.")]
  rest = [arg for arg in kept if not arg.startswith("--config.")]
  flag_values = flags.FlagValues()
  parse = [argv[0], *flags_given]
  config_flags.DEFINE_config_dict("config", config, flag_values=flag_values, sys_argv=parse)
  flag_values(parse)
  values: dict[str, Any] = {key: None for key in unset}
  for arg in flags_given:
    key = arg[len("--config.") :].partition("=")[0]
    values[key] = functools.reduce(getattr, key.split("."), flag_values.config)
  return rest, values
