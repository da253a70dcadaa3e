"""Train a small Transformer language model with Adafactor (or AdamW, to compare).

Usage::

  adafactor-train [--config NAME[:ARG] | PATH.py[:ARG]] [--workdir DIR] [--config.<key>=<value>]
  python -m adafactor_jax.training ...     # the same

``--config`` takes a packaged config by name (``big_vision``, ``paper:no_clipping``;
``--help`` lists them) or a config file of your own. With no arguments it runs
the ``default`` config in ``./runs/default`` (a config's runs go to
``./runs/<name>`` unless ``--workdir`` says otherwise), on a
mesh of every device there is (``--config.mesh.data``, ``--config.mesh.model``;
-1 takes the remaining devices). The workdir receives ``config.json``,
``metrics.jsonl``, ``loss.png``, ``summary.json`` and Orbax checkpoints under
``checkpoints/``; rerunning with the same workdir resumes, on this mesh or
another. SIGTERM or Ctrl-C stops after the step in flight with a checkpoint and
exits with 128 plus the signal's number (143, 130).

Several processes (one per host, or several on one machine), each started
with the same flags but its own ``--process_id``::

  adafactor-train --coordinator_address HOST:PORT --num_processes N --process_id I ...
  adafactor-train --distributed ...        # a TPU pod or a cluster: JAX finds the processes
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import traceback
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from adafactor_jax.training import input_pipeline, partitioning, train
from adafactor_jax.training.config import (
  ConfigError,
  field_types,
  nullable_keys,
  set_config_value,
  unknown_key,
)
from adafactor_jax.training.configs import default as default_config

PROG = "adafactor-train"
CONFIGS_DIR = os.path.dirname(os.path.abspath(default_config.__file__))


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


CONFIG_HELP = (
  "A packaged config's name or a config file, with optional ':<arg>'; then any key as "
  "--config.<key>=<value>."
)


def _define_flags(
  flag_values: flags.FlagValues,
  argv: list[str],
  config: ml_collections.ConfigDict | None,
  workdir: str,
) -> None:
  """The job's flags; with ``config`` None (for --help), --config as the name it is given as."""
  if config is None:
    flags.DEFINE_string("config", "default", CONFIG_HELP, flag_values=flag_values)
  else:
    config_flags.DEFINE_config_dict(
      "config", config, CONFIG_HELP, flag_values=flag_values, lock_config=True, sys_argv=argv
    )
  flags.DEFINE_string(
    "workdir", workdir, "Where metrics and checkpoints go.", flag_values=flag_values
  )
  flags.DEFINE_bool("progress", True, "Show the progress bar and summary.", flag_values=flag_values)
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for several processes (with --num_processes, --process_id).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "num_processes", None, "How many processes take part.", flag_values=flag_values
  )
  flags.DEFINE_integer("process_id", None, "This process's index, from 0.", flag_values=flag_values)
  flags.DEFINE_bool(
    "distributed",
    False,
    "Several processes that JAX discovers itself (TPU pod, SLURM, Open MPI, ...).",
    flag_values=flag_values,
  )
  flags.DEFINE_integer(
    "initialization_timeout",
    300,
    "Seconds to wait for the coordinator and the other processes.",
    flag_values=flag_values,
  )


def main(argv: list[str] | None = None) -> int:
  """``adafactor-train``: loads the config, parses flags with absl and ml_collections, runs."""
  argv = list(sys.argv if argv is None else argv)
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv[1:]):
    flag_values = flags.FlagValues()
    _define_flags(flag_values, argv[:1], None, "runs/<config name>")
    print(f"{__doc__}\nPackaged configs: {config_names()}.\n\nFlags:\n{flag_values.get_help()}")
    return 0
  try:
    argv, unset, spec = _config_overrides(argv)
    config, name = load_config(spec)
  except ConfigError as e:
    return _fail(str(e))
  flag_values = flags.FlagValues()
  _define_flags(flag_values, argv, config, os.path.join("runs", name))
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    return _fail(str(e))
  except (KeyError, AttributeError, TypeError) as e:  # raised by config_flags
    return _fail(f"cannot apply the flags to --config {spec!r}: {e!r}")
  if len(rest) > 1:
    return _fail(f"unexpected argument {rest[1]!r} (a config is passed as --config NAME or PATH).")
  for key in unset:
    set_config_value(flag_values.config, key, None)
  distributed = (
    flag_values.coordinator_address,
    flag_values.num_processes,
    flag_values.process_id,
  )
  try:
    if flag_values.distributed or any(x is not None for x in distributed):
      if flag_values.distributed and any(x is not None for x in distributed):
        raise partitioning.DistributedError(
          "--distributed lets JAX discover the processes: drop --coordinator_address, "
          "--num_processes and --process_id, or drop --distributed."
        )
      partitioning.initialize_distributed(
        *distributed, timeout_sec=flag_values.initialization_timeout
      )
    train.train_and_evaluate(flag_values.config, flag_values.workdir, flag_values.progress)
  except (ConfigError, input_pipeline.CorpusError, partitioning.DistributedError) as e:
    return _exit(_fail(str(e)))
  except train.Stopped as e:
    print(f"{PROG}: {e}", file=sys.stderr, flush=True)
    return _exit(128 + e.signum)  # the shell's code for death by that signal: not done
  except BaseException:
    if jax.process_count() > 1:
      traceback.print_exc()
      _exit(1)
    raise
  return 0


def _exit(code: int) -> int:
  """Ends a process of a multi-process run at once, with ``code``.

  A process that fails alone must not wait in ``jax.distributed``'s shutdown
  barrier for the others, which may be blocked in a collective it will never
  join: it exits, and the coordination service's heartbeat stops the others.
  On one process this returns ``code`` for ``main`` to return.
  """
  if jax.process_count() > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code


def _fail(message: str) -> int:
  print(f"{PROG}: error: {message}", file=sys.stderr)
  return 2


def _config_overrides(argv: list[str]) -> tuple[list[str], list[str], str]:
  """Takes ``--config NAME|PATH`` out of the arguments, and checks the ``--config.<key>`` flags.

  absl reports an unknown key as a bare AttributeError, and cannot parse
  ``None`` for a float field; this names the key and its nearest match, and
  takes out the ``=None`` flags to apply after parsing. Returns the remaining
  arguments, the keys to set to None, and the ``--config`` value ('default'
  when there is none).
  """
  default = default_config.get_config()
  types, nullable = field_types(default), nullable_keys(default)
  kept, unset, spec = [], [], "default"
  args = iter(argv)
  for arg in args:
    if arg.startswith("--config="):
      spec = arg[len("--config=") :]
    elif arg == "--config":
      spec = next(args, "")
    elif arg.startswith("--config."):
      key, equals, value = arg[len("--config.") :].partition("=")
      if key not in types:
        raise unknown_key(key, types, flag=arg)
      if not equals:  # the space-separated form, --config.key value
        value = next(args, "")
      if value == "None":
        if key not in nullable:
          raise ConfigError(f"config key {key!r} cannot be None.")
        unset.append(key)
      else:
        kept.append(f"--config.{key}={value}")
    else:
      kept.append(arg)
  return kept, unset, spec


def override_values(argv: list[str], prog: str) -> tuple[list[str], dict[str, Any]]:
  """Takes the ``--config.<key>=<value>`` flags out of ``argv``, as {key: typed value}.

  For commands that run configs of their own (``adafactor-compare``): a value is
  parsed as ``adafactor-train`` parses it, by the default config's type.
  Returns the other arguments and the overrides.
  """
  kept, unset, spec = _config_overrides(argv)
  if spec != "default":
    raise ConfigError(f"{prog} takes no --config: override keys with --config.<key>=<value>.")
  flags_given = [arg for arg in kept[1:] if arg.startswith("--config.")]
  rest = [arg for arg in kept if not arg.startswith("--config.")]
  flag_values = flags.FlagValues()
  parse = [argv[0], *flags_given]
  config_flags.DEFINE_config_dict(
    "config", default_config.get_config(), flag_values=flag_values, sys_argv=parse
  )
  flag_values(parse)
  values: dict[str, Any] = {key: None for key in unset}
  for arg in flags_given:
    key = arg[len("--config.") :].partition("=")[0]
    values[key] = functools.reduce(getattr, key.split("."), flag_values.config)
  return rest, values


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
