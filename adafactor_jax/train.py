"""Train a small Transformer language model with Adafactor (or AdamW, to compare).

Usage::

  adafactor-train [--config configs/<name>.py[:<arg>]] [--workdir DIR] [--config.<key>=<value>]
  python -m adafactor_jax.train ...        # the same

With no arguments it runs ``configs/default.py`` in ``./runs/default``. The
workdir receives ``config.json``, ``metrics.jsonl`` (train and eval records),
``loss.png``, ``summary.json`` and Orbax checkpoints under ``checkpoints/``.
Rerunning with the same workdir resumes from the last complete checkpoint; the
data of step ``t`` depends only on ``(seed, t)``, so the resumed run ends
exactly where an uninterrupted one would. SIGTERM or Ctrl-C (SIGINT) stops the
job after the step in flight, with a checkpoint of it, and exits with 128 plus
the signal's number (143, 130); a second signal kills at once. A job killed
outright (SIGKILL, a lost machine) resumes from the last checkpoint whose write
completed: Orbax writes each into a temporary directory and renames it only
once complete, and temporary directories are never restored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import adafactor_jax
from adafactor_jax import input_pipeline
from adafactor_jax.configs import default as default_config
from adafactor_jax.model import TransformerLM

# Keys whose change makes an existing workdir's checkpoints a different run.
RUN_DEFINING_KEYS = ("seed", "data", "model", "optimizer")
# Keys that may be None although their default is not (those whose default is None may too).
NULLABLE_KEYS = frozenset({"optimizer.clipping_threshold"})


class ConfigError(ValueError):
  """A config or workdir that the job refuses before it touches anything."""


class Stopped(Exception):
  """The job stopped early on a signal, after saving a checkpoint of the last step."""

  def __init__(self, signum: int, step: int):
    self.signum, self.step = signum, step
    super().__init__(
      f"stopped by {signal.Signals(signum).name} after step {step}; a checkpoint of that step "
      "is saved: rerun the same command to resume."
    )


class _StopOnSignal:
  """Turns the first SIGTERM or SIGINT into a request to stop after the current step.

  A second signal gets the previous handler (SIGINT raises KeyboardInterrupt,
  SIGTERM kills the process). Outside the main thread, where Python cannot
  take signals, nothing is installed.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame):
    self.signum = signum
    self._restore()

  def _restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    self._restore()


# --------------------------------------------------------------------------- config


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _field_types(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type | None]:
  """The declared type of every field of the default config (None where any type goes)."""
  types = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      types.update(_field_types(value, f"{prefix}{key}."))
    else:
      reference = config.get_ref(key)
      types[f"{prefix}{key}"] = reference.get_type()
  return types


def resolve_config(config: Any) -> ml_collections.ConfigDict:
  """Checks a user config against the default's keys and types, and returns a full copy.

  Raises:
    ConfigError: for a config that is not a ConfigDict, an unknown key (with
      the nearest known one), or a value of the wrong type.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(
      f"the config must be an ml_collections.ConfigDict (get_config() returned a "
      f"{type(config).__name__})."
    )
  resolved = default_config.get_config()
  types = _field_types(resolved)
  nullable = _nullable_keys(resolved)
  for key, value in _flatten(config).items():
    if key not in types:
      raise _unknown_key(key, types)
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


def _unknown_key(key: str, types: dict[str, Any], flag: str | None = None) -> ConfigError:
  """The error for a key the default config lacks, naming its nearest known key."""
  close = difflib.get_close_matches(key, list(types), n=1)
  if flag is None:
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint}")
  hint = f" Did you mean --config.{close[0]}?" if close else ""
  return ConfigError(f"unknown config key {key!r} in {flag!r}.{hint}")


def _nullable_keys(default: ml_collections.ConfigDict) -> frozenset[str]:
  return NULLABLE_KEYS | {key for key, value in _flatten(default).items() if value is None}


def set_config_value(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key, None included (ml_collections types a field by its first value)."""
  *parents, leaf = key.split(".")
  for part in parents:
    config = config[part]
  with config.ignore_type():
    config[leaf] = value


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
  _dtype("model.param_dtype", config.model.param_dtype)
  if config.checkpoint_every % config.log_every:
    raise ConfigError(
      f"config key 'checkpoint_every' ({config.checkpoint_every}) must be a multiple of "
      f"'log_every' ({config.log_every}), so a resumed run logs the same windows."
    )


def _dtype(key: str, name: str) -> np.dtype:
  try:
    return jnp.dtype(name)
  except TypeError:
    raise ConfigError(f"config key {key!r}: {name!r} is not a dtype name.") from None


# --------------------------------------------------------------------------- optimizer


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule | None:
  """The configured schedule: linear warmup, then constant, cosine or rsqrt decay."""
  if opt.learning_rate is None:
    if opt.schedule != "constant" or opt.warmup_steps:
      raise ConfigError(
        "config keys 'optimizer.schedule' and 'optimizer.warmup_steps' need "
        "'optimizer.learning_rate'; without one Adafactor uses its relative step size."
      )
    return None
  peak, warmup = opt.learning_rate, opt.warmup_steps
  if peak <= 0:
    raise ConfigError(f"config key 'optimizer.learning_rate' must be > 0, got {peak!r}.")
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
  opt: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
  """Builds the configured optimizer; invalid settings raise ConfigError naming the key."""
  lr = learning_rate_schedule(opt, num_steps)
  try:
    tx = _create_optimizer(opt, lr)
    if opt.stochastic_rounding and opt.name != "adafactor":
      tx = optax.chain(tx, adafactor_jax.stochastic_rounding(opt.rounding_seed))
    return tx
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer {opt.name!r}: {e}") from e


def _create_optimizer(
  opt: ml_collections.ConfigDict, lr: optax.ScalarOrSchedule | None
) -> optax.GradientTransformation:
  if opt.name == "adafactor":
    return adafactor_jax.adafactor(
      learning_rate=lr,
      decay_rate=opt.decay_rate,
      decay_offset=opt.decay_offset,
      beta2_cap=opt.beta2_cap,
      clipping_threshold=opt.clipping_threshold,
      multiply_by_parameter_scale=opt.multiply_by_parameter_scale,
      epsilon1=opt.epsilon1,
      epsilon2=opt.epsilon2,
      warmup_init=opt.warmup_init,
      momentum=opt.momentum,
      momentum_dtype=_dtype("optimizer.momentum_dtype", opt.momentum_dtype),
      weight_decay=opt.weight_decay,
      factored=opt.factored,
      min_dim_size_to_factor=opt.min_dim_size_to_factor,
      skip_nonfinite=opt.skip_nonfinite,
      stochastic_rounding=opt.stochastic_rounding,
      rounding_seed=opt.rounding_seed,
    )
  if opt.name == "big_vision":
    return adafactor_jax.presets.big_vision(
      learning_rate=lr,
      weight_decay=opt.weight_decay,
      momentum=opt.momentum,
      momentum_dtype=_dtype("optimizer.momentum_dtype", opt.momentum_dtype),
      beta2_cap=opt.beta2_cap,
      min_dim_size_to_factor=opt.min_dim_size_to_factor,
    )
  if opt.name == "t5x":
    return adafactor_jax.presets.t5x(
      learning_rate=lr, weight_decay=opt.weight_decay, momentum=opt.momentum
    )
  if opt.name == "adamw":
    if lr is None:
      raise ConfigError("config key 'optimizer.learning_rate' is required for adamw.")
    return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay or 0.0)
  raise ConfigError(
    f"config key 'optimizer.name' must be 'adafactor', 'big_vision', 't5x' or 'adamw', got "
    f"{opt.name!r}."
  )


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or abstract arrays) in a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- model and steps


def create_model(config: ml_collections.ConfigDict) -> TransformerLM:
  m = config.model
  return TransformerLM(
    vocab_size=input_pipeline.VOCAB_SIZE,
    seq_len=config.data.seq_len,
    d_model=m.d_model,
    num_layers=m.num_layers,
    num_heads=m.num_heads,
    mlp_dim=m.mlp_dim,
    embed_init_scale=m.embed_init_scale,
    dtype=_dtype("model.param_dtype", m.param_dtype),
    rngs=nnx.Rngs(config.seed),
  )


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
  logits = nnx.merge(graphdef, params)(batch[:, :-1]).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config):
  """The jitted train step (params and state donated) and evaluation."""
  batch_size, seq_len = config.data.batch_size, config.data.seq_len
  loss_fn = functools.partial(next_token_loss, graphdef)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, step, text, key):
    batch = input_pipeline.batch_at(text, key, step, batch_size, seq_len)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def evaluate(params, text, key):
    def one(i):
      return loss_fn(params, input_pipeline.batch_at(text, key, i, batch_size, seq_len))

    return jnp.mean(jax.lax.map(one, jnp.arange(config.eval_batches)))

  return train_step, evaluate


# --------------------------------------------------------------------------- workdir


@dataclasses.dataclass
class Workdir:
  path: str

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  def prepare(self, config: ml_collections.ConfigDict) -> None:
    """Creates the workdir, or checks that the run in it is this config's run."""
    try:
      os.makedirs(self.path, exist_ok=True)
      probe = self.file(".write-test")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise ConfigError(f"--workdir {self.path!r} is not writable: {e.strerror}.") from e
    saved = self.file("config.json")
    # A cosine schedule's length is num_steps: extending such a run would change its past.
    extra = ("num_steps",) if config.optimizer.schedule == "cosine" else ()
    run_defining = RUN_DEFINING_KEYS + extra
    current = _flatten(ml_collections.ConfigDict(json.loads(config.to_json())))
    if os.path.exists(saved):
      with open(saved) as f:
        previous = _flatten(ml_collections.ConfigDict(json.load(f)))
      changed = sorted(
        key
        for key in current.keys() | previous.keys()
        if key.split(".")[0] in run_defining and current.get(key) != previous.get(key)
      )
      if changed:
        raise ConfigError(
          f"--workdir {self.path!r} holds a run with a different config "
          f"({', '.join(changed)}); its checkpoints are left untouched. "
          "Use a new --workdir, or the same settings to resume."
        )
    with open(saved, "w") as f:
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


def plot_losses(records: list[dict], path: str, title: str) -> None:
  from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is

  fig = Figure(figsize=(7, 4))
  ax = fig.subplots()
  for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
    points = [(r["step"], r[key]) for r in records if key in r]
    if points:
      ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "), markersize=3)
  ax.set(xlabel="step", ylabel="loss (nats/byte)", title=title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)


# --------------------------------------------------------------------------- the job


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, Any]:
  """Runs (or resumes) the job and returns the summary it also writes to summary.json.

  Everything that can be refused (config, optimizer, corpus, workdir) is
  checked before the workdir is written to.
  """
  import orbax.checkpoint as ocp
  from tqdm import tqdm

  config = resolve_config(config)
  tx = create_optimizer(config.optimizer, config.num_steps)
  corpus = input_pipeline.load_corpus(
    config.data.corpus,
    tuple(config.data.suffixes),
    config.data.max_bytes,
    config.data.eval_fraction,
    min_bytes=config.data.seq_len + 2,
  )
  work = Workdir(os.path.abspath(workdir))
  work.prepare(config)

  model = create_model(config)
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)
  train_step, evaluate = make_steps(graphdef, tx, config)
  train_text, eval_text = jnp.asarray(corpus.train), jnp.asarray(corpus.eval)
  data_key, eval_key = jax.random.split(jax.random.key(config.seed))

  manager = ocp.CheckpointManager(
    work.file("checkpoints"),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_checkpoints, enable_async_checkpointing=False, create=True
    ),
  )
  # The losses of the steps since the last log record: a checkpoint taken
  # between records (on a signal) keeps them, so the resumed run logs the
  # same window means as an uninterrupted one.
  pending_losses = jnp.full((config.log_every,), jnp.nan, jnp.float32)
  start, window = 0, []
  if manager.latest_step() is not None:
    start = manager.latest_step()
    target = {"params": params, "opt_state": opt_state, "pending_losses": pending_losses}
    restored = manager.restore(start, args=ocp.args.StandardRestore(target))
    params, opt_state = restored["params"], restored["opt_state"]
    window = list(restored["pending_losses"][: start % config.log_every])
  records = work.read_metrics(start)

  def save(step: int) -> None:
    work.write_metrics(records)
    pending = pending_losses.at[: len(window)].set(jnp.asarray(window, jnp.float32))
    tree = {"params": params, "opt_state": opt_state, "pending_losses": pending}
    manager.save(step, args=ocp.args.StandardSave(tree))

  title = f"{config.optimizer.name} on {corpus.num_files} files"
  num_params = sum(x.size for x in jax.tree.leaves(params))
  if progress:
    print(
      f"{num_params:,} params; {len(corpus.train):,} train / {len(corpus.eval):,} eval bytes; "
      + (f"resuming at step {start}" if start else "starting")
      + f"; workdir {work.path}",
      flush=True,
    )
  began = time.perf_counter()
  bar = tqdm(
    total=config.num_steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True
  )
  log = bar.write if progress else lambda _: None
  window_start = time.perf_counter()
  stop, queued = _StopOnSignal(), None
  with stop:
    for step in range(start, config.num_steps):
      params, opt_state, loss = train_step(params, opt_state, step, train_text, data_key)
      if queued is not None:  # wait for the previous step only: the bar's rate is real
        queued.block_until_ready()
        bar.update(1)
      queued = loss
      window.append(loss)
      done = step + 1
      if done % config.log_every == 0 or done == config.num_steps:
        train_loss = float(jnp.mean(jnp.stack(window)))
        bar.update(1)
        rate = len(window) / (time.perf_counter() - window_start)
        records.append({"step": done, "train_loss": train_loss, "steps_per_sec": rate})
        bar.set_postfix(loss=f"{train_loss:.3f}")
        window, window_start, queued = [], time.perf_counter(), None
        if not math.isfinite(train_loss) and not config.optimizer.skip_nonfinite:
          log(f"step {done}: train loss is {train_loss}; the run has diverged.")
      if done % config.eval_every == 0 or done == config.num_steps:
        eval_loss = float(evaluate(params, eval_text, eval_key))
        records.append({"step": done, "eval_loss": eval_loss})
        log(f"step {done}: eval loss {eval_loss:.4f}")
        plot_losses(records, work.file("loss.png"), title)
      if done % config.checkpoint_every == 0 or done == config.num_steps or stop.signum:
        save(done)
        window_start = time.perf_counter()
      if stop.signum:
        break
  bar.close()
  manager.wait_until_finished()
  manager.close()
  if stop.signum:
    raise Stopped(stop.signum, done)
  work.write_metrics(records)
  plot_losses(records, work.file("loss.png"), title)

  adamw_bytes = tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
  train_losses = [r["train_loss"] for r in records if "train_loss" in r]
  eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
  summary = {
    "optimizer": config.optimizer.name,
    "steps": config.num_steps,
    "resumed_from": start,
    "final_train_loss": train_losses[-1] if train_losses else None,
    "final_eval_loss": eval_losses[-1] if eval_losses else None,
    "wall_time_sec": time.perf_counter() - began,
    "num_params": int(num_params),
    "param_bytes": tree_bytes(params),
    "optimizer_state_bytes": tree_bytes(opt_state),
    "adamw_state_bytes": adamw_bytes,
  }
  with open(work.file("summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  if progress:
    print(format_summary(summary), flush=True)
  return summary


def format_summary(s: dict[str, Any]) -> str:
  share = s["optimizer_state_bytes"] / s["adamw_state_bytes"]
  return "\n".join(
    [
      f"final train loss   {s['final_train_loss']:.4f}",
      f"final eval loss    {s['final_eval_loss']:.4f}",
      f"wall time          {s['wall_time_sec']:.1f} s"
      + (f" (resumed at step {s['resumed_from']})" if s["resumed_from"] else ""),
      f"optimizer state    {s['optimizer_state_bytes']:,} bytes "
      f"= {100 * share:.2f}% of AdamW's {s['adamw_state_bytes']:,}",
    ]
  )


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
  """``adafactor-train``: parses flags with absl and ml_collections, runs the job."""
  from absl import flags
  from ml_collections import config_flags

  argv = list(sys.argv if argv is None else argv)
  try:
    argv, unset, config_path = _config_overrides(argv)
  except ConfigError as e:
    return _fail(str(e))
  flag_values = flags.FlagValues()
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
  try:
    train_and_evaluate(flag_values.config, flag_values.workdir, flag_values.progress)
  except (ConfigError, input_pipeline.CorpusError) as e:
    return _fail(str(e))
  except Stopped as e:
    print(f"adafactor-train: {e}", file=sys.stderr, flush=True)
    return 128 + e.signum  # the shell's code for death by that signal: the run is not done
  return 0


def _fail(message: str) -> int:
  print(f"adafactor-train: error: {message}", file=sys.stderr)
  return 2


def _config_overrides(argv: list[str]) -> tuple[list[str], list[str], str]:
  """Checks ``--config.<key>`` flags against the default config's keys.

  absl reports an unknown key as a bare AttributeError, and cannot parse
  ``None`` for a float field; this names the key and its nearest match, and
  takes out the ``=None`` flags to apply after parsing. Returns the remaining
  arguments, the keys to set to None, and the config file's path.
  """
  default = default_config.get_config()
  types, nullable = _field_types(default), _nullable_keys(default)
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
        raise _unknown_key(key, types, flag=arg)
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
