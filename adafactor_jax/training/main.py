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

Whether a run fits a TPU pod, on a machine without one (``pip install -e '.[tpu]'``)::

  adafactor-train --config decoder_8b --topology v5e:16x16 --compile_only [--num_slices N]

compiles the run's train step for the topology, prints its memory per chip and writes
``compile.json`` to the workdir (and nothing else); it exits 2, with one line saying what
would help, when the step does not fit.
"""

from __future__ import annotations

import os
import sys
import traceback

import jax
from absl import flags
from ml_collections import config_flags

from adafactor_jax.training import compile_only, input_pipeline, partitioning, train
from adafactor_jax.training import config as config_lib

PROG = "adafactor-train"
HELP = {"-h", "--help", "--helpshort", "--helpfull"}


def _flags(argv: list[str], config: object, workdir: str) -> flags.FlagValues:
  """The job's flags; ``--config`` a ConfigDict that ``--config.<key>`` flags override."""
  fv = flags.FlagValues()
  help_ = "A packaged config's name or a config file, with optional ':<arg>'; then any key as "
  help_ += "--config.<key>=<value>."
  if isinstance(config, str):  # for --help: the name it is given as
    flags.DEFINE_string("config", config, help_, flag_values=fv)
  else:
    config_flags.DEFINE_config_dict("config", config, help_, fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", workdir, "Where metrics and checkpoints go.", flag_values=fv)
  flags.DEFINE_bool("progress", True, "Show the progress bar and summary.", flag_values=fv)
  flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0, for several processes (with --num_processes, --process_id).",
    flag_values=fv,
  )
  flags.DEFINE_integer("num_processes", None, "How many processes take part.", flag_values=fv)
  flags.DEFINE_integer("process_id", None, "This process's index, from 0.", flag_values=fv)
  flags.DEFINE_bool(
    "distributed",
    False,
    "Several processes that JAX discovers itself (TPU pod, SLURM, Open MPI, ...).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "compile_only",
    False,
    "Compile the train step (for --topology, else for the devices here), print its memory per "
    "chip, write compile.json to the workdir, and stop: exit 0 when it fits, 2 when it does not.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "topology",
    None,
    "With --compile_only: a TPU topology to compile for, e.g. v5e:16x16 (needs libtpu).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_slices", 1, "With --topology: how many slices of it (multislice).", flag_values=fv
  )
  flags.DEFINE_integer(
    "initialization_timeout",
    300,
    "Seconds to wait for the coordinator and the other processes.",
    flag_values=fv,
  )
  return fv


def main(argv: list[str] | None = None) -> int:
  """``adafactor-train``: loads the config, parses flags with absl and ml_collections, runs."""
  argv = list(sys.argv if argv is None else argv)
  if HELP & set(argv[1:]):
    fv = _flags(argv[:1], "default", "runs/<config name>")
    names = config_lib.config_names()
    print(f"{__doc__}\nPackaged configs: {names}.\n\nFlags:\n{fv.get_help()}")
    return 0
  try:
    spec = config_lib.config_spec(argv)
    config, name = config_lib.load_config(spec)
    argv, unset = config_lib.split_overrides(argv, config)  # adds the optimizer's arguments
  except config_lib.ConfigError as e:
    return _fail(str(e))
  fv = _flags(argv, config, os.path.join("runs", name))
  try:
    rest = fv(argv)
  except flags.Error as e:
    return _fail(str(e))
  except (KeyError, AttributeError, TypeError) as e:  # raised by config_flags
    return _fail(f"cannot apply the flags to --config {spec!r}: {e!r}")
  if len(rest) > 1:
    return _fail(f"unexpected argument {rest[1]!r} (a config is passed as --config NAME or PATH).")
  for key in unset:
    config_lib.set_config_value(fv.config, key, None)
  distributed = (fv.coordinator_address, fv.num_processes, fv.process_id)
  if not fv.compile_only and (fv.topology is not None or fv["num_slices"].present):
    return _fail(
      "--topology and --num_slices name devices to compile for, not to train on: add "
      "--compile_only."
    )
  if fv.compile_only and (fv.distributed or any(x is not None for x in distributed)):
    return _fail("--compile_only runs in one process: drop the multi-process flags.")
  if fv.compile_only:
    try:
      compile_only.main(fv.config, fv.workdir, fv.topology, fv.num_slices)
    except (config_lib.ConfigError, compile_only.TopologyError, compile_only.DoesNotFit) as e:
      return _fail(str(e))
    return 0
  try:
    if fv.distributed or any(x is not None for x in distributed):
      if fv.distributed and any(x is not None for x in distributed):
        raise partitioning.DistributedError(
          "--distributed lets JAX discover the processes: drop --coordinator_address, "
          "--num_processes and --process_id, or drop --distributed."
        )
      partitioning.initialize_distributed(*distributed, timeout_sec=fv.initialization_timeout)
    train.train_and_evaluate(fv.config, fv.workdir, fv.progress)
  except (config_lib.ConfigError, input_pipeline.CorpusError, partitioning.DistributedError) as e:
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


if __name__ == "__main__":
  sys.exit(main())
