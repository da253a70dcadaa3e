"""Train a small Transformer language model with Adafactor (or AdamW, to compare).

Usage::

  adafactor-train [--config configs/<name>.py[:<arg>]] [--workdir DIR] [--config.<key>=<value>]
  python -m adafactor_jax.training ...     # the same

With no arguments it runs ``configs/default.py`` in ``./runs/default`` on a
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

import os
import sys
import traceback

import jax
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


def _define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config",
    default_config.__file__,
    "Path to a config file, with optional ':<arg>'.",
    flag_values=flag_values,
    lock_config=True,
    sys_argv=argv,
  )
  flags.DEFINE_string(
    "workdir", "runs/default", "Where metrics and checkpoints go.", flag_values=flag_values
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
  """``adafactor-train``: parses flags with absl and ml_collections, runs the job."""
  argv = list(sys.argv if argv is None else argv)
  try:
    argv, unset, config_path = _config_overrides(argv)
  except ConfigError as e:
    return _fail(str(e))
  flag_values = flags.FlagValues()
  _define_flags(flag_values, argv)
  if {"-h", "--help", "--helpshort", "--helpfull"} & set(argv[1:]):
    print(__doc__ + "\nFlags:\n" + flag_values.get_help())
    return 0
  try:
    rest = flag_values(argv)
  except flags.Error as e:
    return _fail(str(e))
  except (OSError, KeyError, AttributeError, TypeError) as e:  # raised by config_flags
    return _fail(f"cannot apply the flags to --config {config_path!r}: {e!r}")
  if len(rest) > 1:
    return _fail(f"unexpected argument {rest[1]!r} (a config file is passed as --config PATH).")
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
  """Checks ``--config.<key>`` flags against the default config's keys.

  absl reports an unknown key as a bare AttributeError, and cannot parse
  ``None`` for a float field; this names the key and its nearest match, and
  takes out the ``=None`` flags to apply after parsing. Returns the remaining
  arguments, the keys to set to None, and the config file's path.
  """
  default = default_config.get_config()
  types, nullable = field_types(default), nullable_keys(default)
  kept, unset, config_path = [], [], default_config.__file__
  args = iter(argv)
  for arg in args:
    if arg.startswith("--config="):
      path = arg[len("--config=") :].split(":")[0]
    elif arg == "--config":
      kept.append(arg)
      arg = next(args, "")
      path = arg.split(":")[0]
    elif arg.startswith("--config."):
      key, equals, value = arg[len("--config.") :].partition("=")
      if key not in types:
        raise unknown_key(key, types, flag=arg)
      if not equals:  # the space-separated form, --config.key value
        value = next(args, "")
        kept.append(arg)
        arg = value
      if value == "None":
        if key not in nullable:
          raise ConfigError(f"config key {key!r} cannot be None.")
        unset.append(key)
        if not equals:
          kept.pop()
        continue
      path = None
    else:
      path = None
    if path is not None:
      if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: no such file.")
      config_path = path
    kept.append(arg)
  return kept, unset, config_path


def cli() -> None:
  sys.exit(main())


if __name__ == "__main__":
  cli()
