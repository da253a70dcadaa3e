"""The workdir of a run: its lock, its recorded config and metrics, its checkpoints.

A workdir holds one run. :class:`Workdir` refuses a second process training in it
(:meth:`Workdir.claimed`), and a config or model that is not the run it holds
(:meth:`Workdir.check`), before anything in it is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from adafactor_jax._checks import path_name
from adafactor_jax.training.config import (
  OPTIMIZERS,
  TRAINER_KEYS,
  ConfigError,
  flatten,
  optimizer_arguments,
)
from adafactor_jax.training.optimizers import warmup_steps

# Keys whose change makes an existing workdir's checkpoints a different run.
RUN_DEFINING_KEYS = ("seed", "data", "model", "optimizer")

WARMUP_KEY = "optimizer.warmup_steps/warmup_fraction"


def _warmup_in_steps(flat_config: dict[str, Any]) -> dict[str, Any]:
  """A flat config whose warmup keys are replaced by the steps they make (WARMUP_KEY), so
  that a warmup written as steps or as a fraction of the run (or from before the fraction
  existed) is the same run, and one that a longer run's fraction lengthens is not."""
  flat = dict(flat_config)
  steps = flat.pop("optimizer.warmup_steps", 0)
  fraction = flat.pop("optimizer.warmup_fraction", 0.0)
  flat[WARMUP_KEY] = warmup_steps(steps, fraction, flat.get("num_steps", 0))
  return flat


@dataclasses.dataclass
class Workdir:
  path: str
  checkpointed: int | None = None  # the latest checkpoint's step, once check() has read it
  checkpoint_items: frozenset[str] = frozenset()  # the top-level keys of that checkpoint

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  @contextlib.contextmanager
  def claimed(self) -> Iterator[None]:
    """Holds the workdir for one run; a run that another process holds it for is refused, as
    two runs resuming from one checkpoint interleave their checkpoints and metrics (the
    summary then names an eval loss that neither run ended at).

    An advisory lock (``flock``, emulated by NFS as a lock of the whole file) on
    ``<workdir>/.lock``, kept there; the operating system releases it when the process ends,
    however it ends. Process 0 takes it for a multi-host job, whose processes share the
    workdir, and every process hears its answer. A filesystem that refuses locks (some FUSE
    mounts) leaves the run unguarded, with a warning.
    """
    handle, busy = None, False
    if jax.process_index() == 0:
      try:
        os.makedirs(self.path, exist_ok=True)
        handle = os.open(self.file(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
      except OSError:
        pass  # not writable: Workdir.check says so, on every process
    if handle is not None:
      try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        busy = True
      except OSError as e:
        logging.warning(
          "--workdir %r: its filesystem refuses a lock (%s), so nothing stops a second "
          "process from training in it at the same time.",
          self.path,
          e.strerror,
        )
    if jax.process_count() > 1:  # every process refuses, not process 0 alone
      busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
    try:
      if busy:
        raise ConfigError(
          f"--workdir {self.path!r} is in use: another process is training in it. Its files "
          "are left untouched: wait for that run to end (rerunning then resumes it), or use "
          "another --workdir."
        )
      yield
    finally:
      if handle is not None:
        os.close(handle)

  def check(
    self, config: ml_collections.ConfigDict, abstract_params: Any
  ) -> ml_collections.ConfigDict | None:
    """Refuses a workdir that is not writable or holds another run; writes nothing to keep
    (but the lock file of :meth:`claimed`).

    Returns the config of the run it holds when this one switches from its
    optimizer (``optimizer.switch_from``), else None.
    """
    try:
      os.makedirs(self.path, exist_ok=True)
      probe = self.file(f".write-test-{jax.process_index()}")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise ConfigError(f"--workdir {self.path!r} is not writable: {e.strerror}.") from e
    source = None
    saved = self.file("config.json")
    if os.path.exists(saved):
      # A cosine schedule's length is num_steps, and so is a warmup_fraction's: extending such
      # a run would change its past.
      extra = ("num_steps",) if config.optimizer.schedule == "cosine" else ()
      current = flatten(ml_collections.ConfigDict(json.loads(config.to_json())))
      with open(saved) as f:
        previous_config = upgrade(json.load(f))
      previous = flatten(previous_config)
      current, previous = _warmup_in_steps(current), _warmup_in_steps(previous)
      changed = sorted(
        key
        for key in current.keys() | previous.keys()
        if key.split(".")[0] in RUN_DEFINING_KEYS + extra and current.get(key) != previous.get(key)
      )
      switch_from = config.optimizer.switch_from
      switching = (
        switch_from is not None
        and previous.get("optimizer.name") == switch_from
        and all(key.startswith("optimizer.") or key == "num_steps" for key in changed)
      )
      if changed and not switching:
        if WARMUP_KEY in changed:
          changed[changed.index(WARMUP_KEY)] = (
            f"{WARMUP_KEY}: {previous[WARMUP_KEY]} warmup steps, this config "
            f"{current[WARMUP_KEY]} at num_steps={config.num_steps}"
          )
        hint = ""
        if switch_from is not None:
          hint = (
            f" 'optimizer.switch_from' = {switch_from!r} continues a run of {switch_from!r} "
            "whose other settings are these; this one used "
            f"{previous.get('optimizer.name')!r}."
          )
        raise ConfigError(
          f"--workdir {self.path!r} holds a run with a different config "
          f"({', '.join(changed)}); its checkpoints are left untouched. "
          f"Use a new --workdir, or the same settings to resume.{hint}"
        )
      source = previous_config if switching else None
    elif config.optimizer.switch_from is not None:
      raise ConfigError(
        f"config key 'optimizer.switch_from' = {config.optimizer.switch_from!r} continues a "
        f"run of that optimizer, but --workdir {self.path!r} holds no run."
      )
    self._check_checkpoints(abstract_params, config.num_steps)
    return source

  def _check_checkpoints(self, abstract_params: Any, num_steps: int) -> None:
    """The latest checkpoint must be of this model, and not past ``num_steps``."""
    if not os.path.isdir(self.file("checkpoints")):
      return
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # not the warning that a read-only manager cannot save
    try:
      with ocp.CheckpointManager(
        self.file("checkpoints"), options=options, item_handlers=ocp.StandardCheckpointHandler()
      ) as manager:
        step = self.checkpointed = manager.latest_step()
        if step is None:
          return
        metadata = manager.item_metadata(step)
        self.checkpoint_items = frozenset(metadata.keys())
        saved = metadata["params"]
    finally:
      absl_logger.setLevel(level)
    if step > num_steps:
      raise ConfigError(
        f"--workdir {self.path!r} holds a run checkpointed at step {step}, past "
        f"'num_steps' = {num_steps}: it cannot be resumed to a shorter length. Its "
        f"checkpoints are left untouched: use a new --workdir, or num_steps >= {step}."
      )
    have = {param_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    want = {
      param_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    if have != want:
      diff = sorted(k for k in have.keys() | want.keys() if have.get(k) != want.get(k))
      first = diff[0]
      raise ConfigError(
        f"--workdir {self.path!r}: its checkpoint of step {step} holds a different model "
        f"(parameter '{first}': {have.get(first, 'absent')} in the checkpoint, "
        f"{want.get(first, 'absent')} in this config; {len(diff)} parameter(s) differ). "
        "Its checkpoints are left untouched: use a new --workdir."
      )

  def finished_summary(self, num_steps: int) -> dict[str, Any] | None:
    """summary.json, if the workdir holds this run finished at ``num_steps`` (its summary
    and its checkpoint of that step, as check() found it); else None."""
    if self.checkpointed != num_steps:
      return None
    try:
      with open(self.file("summary.json")) as f:
        summary = json.load(f)
    except FileNotFoundError:
      return None
    return summary if summary.get("steps") == num_steps else None

  def write_summary(self, summary: dict[str, Any]) -> None:
    with open(self.file("summary.json"), "w") as f:
      json.dump(summary, f, indent=2)

  def checkpoint_manager(self, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(self.file("checkpoints"), options=options)

  @staticmethod
  def save(
    manager: ocp.CheckpointManager,
    step: int,
    params: Any,
    opt_state: Any,
    window: list,
    grad_norms: list,
    log_every: int,
  ) -> None:
    """A checkpoint of ``step``, with the losses and gradient norms of the steps since the last
    log record (``window``, ``grad_norms``): a checkpoint taken between records (on a signal)
    keeps them, so the resumed run logs the same window figures as an uninterrupted one."""

    def pending(values: list) -> np.ndarray:
      padded = np.full((log_every,), np.nan, np.float32)
      padded[: len(values)] = np.asarray(values, np.float32)
      return padded

    tree = {
      "params": params,
      "opt_state": opt_state,
      "pending_losses": pending(window),
      "pending_grad_norms": pending(grad_norms),
    }
    manager.save(step, args=ocp.args.StandardSave(tree))

  def write_config(self, config: ml_collections.ConfigDict) -> None:
    with open(self.file("config.json"), "w") as f:
      f.write(config.to_json(indent=2))

  def read_metrics(self, up_to_step: int) -> list[dict]:
    """The metric records up to a step; later ones (from an interrupted run) are dropped."""
    path = self.file("metrics.jsonl")
    if not os.path.exists(path):
      return []
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if r["step"] <= up_to_step]

  def write_metrics(self, records: list[dict]) -> None:
    temporary = self.file("metrics.jsonl.tmp")
    with open(temporary, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(temporary, self.file("metrics.jsonl"))


def param_path(path: jax.tree_util.KeyPath) -> str:
  # nnx.State adds a '/value' key to each parameter that Orbax's metadata tree does not have.
  return path_name(path).removesuffix("/value")


def upgrade(saved: dict[str, Any]) -> ml_collections.ConfigDict:
  """A run's config.json as this version writes it, from whichever version wrote it: the one
  place that knows the older layouts.

  Before 'optimizer.telemetry', 'optimizer.warmup_fraction' and 'optimizer.clip_global_norm'
  existed, runs had none of them (telemetry off, no fraction, no clipping by the global
  norm); before 'model.activation_dtype' and 'model.remat', the layers computed in the
  parameters' dtype, without remat. Before the optimizer section held the arguments of the
  chosen optimizer (by name, config.OPTIMIZERS), it held every optimizer's keys side by side
  (its mark: both 'epsilon2' and 'b1'), of which the trainer passed the chosen one's,
  optax.adafactor's under other names (epsilon1, momentum_dtype) and Adafactor's
  min_dim_size_to_factor as 128, which is the library's None; the others were ignored.
  """
  saved = dict(saved)
  if "model" in saved:
    saved["model"] = {"activation_dtype": None, "remat": False, **saved["model"]}
  opt = dict(saved["optimizer"])
  opt.setdefault("telemetry", False)
  opt.setdefault("warmup_fraction", 0.0)
  opt.setdefault("clip_global_norm", None)
  if "epsilon2" in opt and "b1" in opt and opt["name"] in OPTIMIZERS:
    if opt["name"] == "optax_adafactor":
      opt["eps"], opt["dtype_momentum"] = opt["epsilon1"], opt["momentum_dtype"]
    if opt["name"] == "adafactor" and opt["min_dim_size_to_factor"] == 128:
      opt["min_dim_size_to_factor"] = None
    arguments = optimizer_arguments(opt["name"])
    opt = {k: v for k, v in opt.items() if k in TRAINER_KEYS} | {
      k: opt.get(k, default) for k, default in arguments.items()
    }
  return ml_collections.ConfigDict({**saved, "optimizer": opt})
