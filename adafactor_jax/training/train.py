"""Trains a small Transformer language model with Adafactor (or AdamW, to compare), on any mesh.

``train_and_evaluate`` runs (or resumes) the job in a workdir, on a
('data', 'model') mesh over every device of every process (``config.mesh``);
one device is a mesh of one. The workdir receives ``config.json``,
``metrics.jsonl`` (train and eval records; with ``optimizer.telemetry``, the
train records also summarize the optimizer's telemetry), ``loss.png``,
``optimizer.png``, TensorBoard event files under ``tensorboard/``,
``summary.json`` and sharded Orbax checkpoints under ``checkpoints/``; on several
processes, process 0 alone writes all but the checkpoints, of which each process
writes its own shards.

Rerunning with the same workdir resumes from the last complete checkpoint, on
this mesh or another (the arrays are resharded on restore); the data of step
``t`` depends only on ``(seed, t)``, so a run resumed on the same mesh ends
exactly where an uninterrupted one would. SIGTERM or Ctrl-C (SIGINT) stops the
job after the step in flight, with a checkpoint of it (every process stops
after the same step); a second signal kills at once. A job killed outright
(SIGKILL, a lost machine) resumes from the last checkpoint whose write
completed: Orbax writes each into a temporary directory and renames it only
once complete, and temporary directories are never restored.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is
from tensorboardX import SummaryWriter
from tqdm import tqdm

import adafactor_jax
from adafactor_jax._checks import path_name
from adafactor_jax.training import input_pipeline, partitioning
from adafactor_jax.training.config import OPTIMIZERS, ConfigError, dtype, flatten, resolve_config
from adafactor_jax.training.model import TransformerLM, run_block

# The optimizers of optax, which record no telemetry.
WITHOUT_TELEMETRY = ("adamw", "optax_adafactor")

# Keys whose change makes an existing workdir's checkpoints a different run.
RUN_DEFINING_KEYS = ("seed", "data", "model", "optimizer")


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
  take signals, nothing is installed. On several processes, ``requested()``
  is the same on all of them at each step: the first signal any process got.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self) -> None:
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def _handle(self, signum: int, frame: Any) -> None:
    self.signum = signum
    self._restore()

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def requested(self) -> int | None:
    """The signal to stop on after this step, agreed by every process; None to go on."""
    if jax.process_count() == 1:
      return self.signum
    # A tiny all-gather per step: every process must save the same last step.
    votes = multihost_utils.process_allgather(np.int32(self.signum or 0))
    return int(np.max(votes)) or None

  def __enter__(self) -> _StopOnSignal:
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc: object) -> None:
    self._restore()


# --------------------------------------------------------------------------- optimizer


def warmup_steps(steps: int, fraction: float, num_steps: int) -> int:
  """The steps of warmup that 'optimizer.warmup_steps' or 'optimizer.warmup_fraction' make."""
  return steps or round(fraction * num_steps)


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule | None:
  """The configured schedule: linear warmup, then constant, cosine or rsqrt decay."""
  # A config.json written before the key existed (the run being switched from) had none.
  fraction = opt.get("warmup_fraction", 0.0)
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
  """Builds the configured optimizer; invalid settings raise ConfigError naming the key.

  With ``param_axes`` (the params' logical axis names), Adafactor chooses its
  factored axes by those names (``adafactor_jax.logical_factor_dims``), the
  names that shard the parameters; without, by their shapes. With
  ``optimizer.fused_backward``, a :class:`Layerwise` optimizer: the fused step's.
  """
  lr = learning_rate_schedule(opt, num_steps)
  try:
    factor_dims = None
    if param_axes is not None:
      if opt.fused_backward:  # the optimizer sees one layer at a time
        param_axes = _one_layer_axes(param_axes)
      factor_dims = adafactor_jax.logical_factor_dims(
        param_axes, min_dim_size_to_factor=opt.min_dim_size_to_factor
      )
    tx = _create_optimizer(opt, lr, factor_dims)
    if opt.stochastic_rounding and opt.name != "adafactor":
      tx = optax.chain(tx, adafactor_jax.stochastic_rounding(opt.rounding_seed))
    return layerwise(tx) if opt.fused_backward else tx
  except ConfigError:
    raise
  except (ValueError, TypeError) as e:
    raise ConfigError(f"optimizer {opt.name!r}: {e}") from e


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


def _create_optimizer(
  opt: ml_collections.ConfigDict, lr: optax.ScalarOrSchedule | None, factor_dims: Any
) -> optax.GradientTransformation:
  # A config.json written before the key existed (the run being switched from) had none.
  telemetry = opt.get("telemetry", False)
  if telemetry and opt.name in WITHOUT_TELEMETRY:
    raise ConfigError(
      "config key 'optimizer.telemetry' asks for this library's figures (adafactor_jax.telemetry);"
      f" 'optimizer.name' {opt.name!r} records none: pass --config.optimizer.telemetry=False "
      "(configs/adamw.py does)."
    )
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
      momentum_dtype=dtype("optimizer.momentum_dtype", opt.momentum_dtype),
      weight_decay_rate=_adamw_style_decay(
        opt, lr or adafactor_jax.relative_step_size(opt.warmup_init)
      ),
      factored=opt.factored,
      min_dim_size_to_factor=opt.min_dim_size_to_factor,
      factor_dims=factor_dims if opt.factored else None,
      skip_nonfinite=opt.skip_nonfinite,
      stochastic_rounding=opt.stochastic_rounding,
      rounding_seed=opt.rounding_seed,
      telemetry=telemetry,
    )
  if opt.name == "big_vision":
    return adafactor_jax.presets.big_vision(
      learning_rate=lr,
      weight_decay=opt.weight_decay,
      momentum=opt.momentum,
      momentum_dtype=dtype("optimizer.momentum_dtype", opt.momentum_dtype),
      beta2_cap=opt.beta2_cap,
      min_dim_size_to_factor=opt.min_dim_size_to_factor,
      factor_dims=factor_dims,
      telemetry=telemetry,
    )
  if opt.name == "t5x":
    lr = lr or adafactor_jax.schedules.rsqrt_decay()  # the preset's own default
    return adafactor_jax.presets.t5x(
      learning_rate=lr,
      weight_decay_rate=_adamw_style_decay(opt, lr),
      momentum=opt.momentum,
      factor_dims=factor_dims,
      telemetry=telemetry,
    )
  if opt.name == "optax_adafactor":  # the anchor users have today, for the comparison
    if lr is None:
      raise ConfigError("config key 'optimizer.learning_rate' is required for optax_adafactor.")
    return optax.adafactor(
      learning_rate=lr,
      min_dim_size_to_factor=opt.min_dim_size_to_factor,
      decay_rate=opt.decay_rate,
      decay_offset=opt.decay_offset,
      multiply_by_parameter_scale=opt.multiply_by_parameter_scale,
      clipping_threshold=opt.clipping_threshold,
      momentum=opt.momentum,
      dtype_momentum=dtype("optimizer.momentum_dtype", opt.momentum_dtype),
      weight_decay_rate=_adamw_style_decay(opt, lr),
      eps=opt.epsilon1,
      factored=opt.factored,
    )
  if opt.name == "adamw":
    if lr is None:
      raise ConfigError("config key 'optimizer.learning_rate' is required for adamw.")
    return optax.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay or 0.0)
  raise ConfigError(f"config key 'optimizer.name' must be one of {OPTIMIZERS}, got {opt.name!r}.")


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
  betas = {"b1": source_opt.b1, "b2": source_opt.b2} if source_opt.name == "adamw" else {}
  try:
    return adafactor_jax.warm_start_state(tx, params=params, source_state=source_state, **betas)
  except ValueError as e:
    raise ConfigError(
      f"config key 'optimizer.warm_start': the state of {source_opt.name!r} does not convert "
      f"into {opt.name!r}'s ({e}) Pass --config.optimizer.warm_start=False for a cold start."
    ) from e


def _adamw_style_decay(
  opt: ml_collections.ConfigDict, step_size: optax.Schedule
) -> optax.Schedule | None:
  """``optimizer.weight_decay`` as Adafactor's rate: :math:`\\lambda \\eta_t`.

  The config's weight decay means what ``optax.adamw``'s does for every
  optimizer, :math:`X \\leftarrow X - \\eta_t \\lambda X` with :math:`\\eta_t` the
  learning rate (Adafactor's relative step :math:`\\rho_t` without one), where
  the library's ``weight_decay_rate`` is not multiplied by anything.
  """
  if opt.weight_decay is None:
    return None
  decay = opt.weight_decay
  return lambda count: decay * step_size(count)


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
    dtype=dtype("model.param_dtype", m.param_dtype),
    scan_layers=m.scan_layers,
    rngs=nnx.Rngs(config.seed),
  )


def next_token_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: jax.Array) -> jax.Array:
  return _cross_entropy(nnx.merge(graphdef, params)(batch[:, :-1]), batch)


def _cross_entropy(logits: jax.Array, batch: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@dataclasses.dataclass(frozen=True)
class Shardings:
  """Where everything lives on the mesh."""

  params: Any
  opt_state: Any
  batch: NamedSharding  # rows over 'data'
  eval_batches: NamedSharding  # (batch index, rows over 'data', bytes)
  replicated: NamedSharding


def create_shardings(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  tx: optax.GradientTransformation,
  abstract_params: Any,
  param_axes: Any,
) -> Shardings:
  """The shardings of the params (by their logical names), the state, and the batches.

  Raises:
    ConfigError: when the data axis does not divide the batch, or a mesh axis
      does not divide a parameter dimension that the rules shard over it.
  """
  rules = config.mesh.logical_axis_rules
  batch_spec = partitioning.mesh_spec(PartitionSpec("batch"), rules)
  data_devices = math.prod(mesh.shape[axis] for axis in batch_spec if axis is not None)
  if config.data.batch_size % data_devices:
    raise ConfigError(
      f"config key 'data.batch_size' ({config.data.batch_size}) must be a multiple of the "
      f"{data_devices} devices that its rows are sharded over (mesh {dict(mesh.shape)}, "
      f"'batch' -> {batch_spec[0]!r} in 'mesh.logical_axis_rules')."
    )
  params = partitioning.param_shardings(param_axes, abstract_params, mesh, rules)
  return Shardings(
    params=params,
    opt_state=adafactor_jax.state_shardings(tx, params=abstract_params, param_shardings=params),
    batch=NamedSharding(mesh, batch_spec),
    eval_batches=NamedSharding(mesh, PartitionSpec(None, *batch_spec)),
    replicated=NamedSharding(mesh, PartitionSpec()),
  )


def make_steps(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, shardings: Shardings
) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The train step (params and state donated, updated in place) and evaluation, compiled for
  the shardings."""
  loss_fn = functools.partial(next_token_loss, graphdef)

  @functools.partial(
    jax.jit,
    in_shardings=(shardings.params, shardings.opt_state, shardings.batch),
    out_shardings=(shardings.params, shardings.opt_state, shardings.replicated),
    donate_argnums=(0, 1),
  )
  def train_step(params: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, jax.Array]:
    if isinstance(tx, Layerwise):
      return fused_step(graphdef, tx.layer_tx, params, opt_state, batch)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @functools.partial(
    jax.jit,
    in_shardings=(shardings.params, shardings.eval_batches),
    out_shardings=shardings.replicated,
  )
  def evaluate(params: Any, batches: jax.Array) -> jax.Array:
    return jnp.mean(jax.lax.map(functools.partial(loss_fn, params), batches))

  return train_step, evaluate


def fused_step(
  graphdef: nnx.GraphDef,
  layer_tx: optax.GradientTransformation,
  params: nnx.State,
  opt_state: adafactor_jax.FusedState,
  batch: jax.Array,
) -> tuple[nnx.State, adafactor_jax.FusedState, jax.Array]:
  """One step of ``adafactor_jax.fused_train_step``: each block's update is applied as soon as
  the backward pass has its gradient; the embeddings and final norm are updated last."""
  layers, rest = split_layers(params)
  # embed and head merge the whole model for its own methods; they read no block.
  fused = adafactor_jax.fused_train_step(
    layer_tx,
    embed=functools.partial(_fused_embed, graphdef, layers),
    layer=functools.partial(run_block, nnx.graphdef(nnx.merge(graphdef, params).blocks)),
    head=functools.partial(_fused_head, graphdef, layers),
  )
  layers, rest, opt_state, loss = fused.step(layers, rest, opt_state, batch)
  return join_layers(layers, rest), opt_state, loss


def _fused_embed(
  graphdef: nnx.GraphDef, layers: nnx.State, rest: nnx.State, batch: jax.Array
) -> jax.Array:
  return nnx.merge(graphdef, join_layers(layers, rest)).embed_tokens(batch[:, :-1])


def _fused_head(
  graphdef: nnx.GraphDef, layers: nnx.State, rest: nnx.State, x: jax.Array, batch: jax.Array
) -> jax.Array:
  return _cross_entropy(nnx.merge(graphdef, join_layers(layers, rest)).logits(x), batch)


def _abstract(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


# --------------------------------------------------------------------------- workdir

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
        previous_config = ml_collections.ConfigDict(json.load(f))
      previous = flatten(previous_config)
      # A run from before this key existed recorded none: telemetry off.
      previous.setdefault("optimizer.telemetry", False)
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
        step = manager.latest_step()
        if step is None:
          return
        saved = manager.item_metadata(step)["params"]
    finally:
      absl_logger.setLevel(level)
    if step > num_steps:
      raise ConfigError(
        f"--workdir {self.path!r} holds a run checkpointed at step {step}, past "
        f"'num_steps' = {num_steps}: it cannot be resumed to a shorter length. Its "
        f"checkpoints are left untouched: use a new --workdir, or num_steps >= {step}."
      )
    have = {_param_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(saved)}
    want = {
      _param_path(p): tuple(x.shape)
      for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)
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


def _param_path(path: jax.tree_util.KeyPath) -> str:
  # nnx.State adds a '/value' key to each parameter that Orbax's metadata tree does not have.
  return path_name(path).removesuffix("/value")


def plot_losses(records: list[dict], path: str, title: str) -> None:
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


# --------------------------------------------------------------------------- telemetry


RMS_UPDATE = "rms_update_before_clipping"
CLIPPING_DENOMINATOR = "clipping_denominator"
PER_STEP_FIGURES = ("step_size", "beta2", "skipped_steps")


def optimizer_aggregates(figures: dict[str, Any], param_sizes: dict[str, int]) -> dict[str, float]:
  """The run-level summary of ``adafactor_jax.telemetry(opt_state)``, for metrics.jsonl.

  ``clipped_fraction`` is the share of parameters (slices, where batch axes give
  one figure per layer) whose update was clipped, a clipping denominator
  above 1; ``clipped_fraction_by_size`` the same share weighted by their
  elements (``param_sizes``: elements of each parameter by path); both only
  where clipping is on. ``rms_update_max`` and ``rms_update_median`` are over
  the same slices, of RMS(U) before clipping. ``step_size``, ``beta2`` and, with
  ``optimizer.skip_nonfinite``, ``skipped_steps`` are the step's own. All of the
  last step, not averages over the log window.
  """
  rms, denominators = {}, {}
  for name, value in figures.items():
    path, _, figure = name.rpartition("/")
    if figure == RMS_UPDATE:
      rms[path] = float(value)
    elif figure == CLIPPING_DENOMINATOR:
      denominators[path] = float(value)
  aggregates = {key: float(figures[key]) for key in PER_STEP_FIGURES if key in figures}
  if rms:
    values = np.array(list(rms.values()))
    aggregates["rms_update_max"] = float(np.max(values))
    aggregates["rms_update_median"] = float(np.median(values))
  if denominators:
    # 'blocks/0/mlp_in/kernel[3]' is one of its parameter's slices, of equal sizes.
    parameter = {path: path.split("[")[0] for path in denominators}
    slices = collections.Counter(parameter.values())
    size = {path: param_sizes[p] / slices[p] for path, p in parameter.items()}
    clipped = [path for path, d in denominators.items() if d > 1.0]
    aggregates["clipped_fraction"] = len(clipped) / len(denominators)
    aggregates["clipped_fraction_by_size"] = sum(size[p] for p in clipped) / sum(size.values())
  return aggregates


def plot_optimizer(records: list[dict], path: str, title: str) -> None:
  """The telemetry's aggregates over the run, one panel each: clipping, RMS(U), step size, beta2."""
  panels = [
    ("updates clipped", ["clipped_fraction", "clipped_fraction_by_size"], "linear"),
    ("RMS(U) before clipping", ["rms_update_max", "rms_update_median"], "log"),
    ("step size", ["step_size"], "log"),
    ("beta2", ["beta2"], "linear"),
  ]
  fig = Figure(figsize=(10, 6))
  for ax, (name, keys, scale) in zip(fig.subplots(2, 2).flat, panels, strict=True):
    for key in keys:
      points = [(r["step"], r[key]) for r in records if key in r]
      if points:
        ax.plot(*zip(*points, strict=True), "o-", label=key.replace("_", " "), markersize=3)
    if name.startswith("RMS") and ax.lines:
      ax.axhline(1.0, color="gray", linestyle=":", linewidth=1)  # the paper's threshold d = 1
    ax.set(xlabel="step", title=name, yscale=scale if ax.lines else "linear")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _under_blocks(figures: dict[str, Any], block_paths: set[str]) -> dict[str, Any]:
  """Telemetry of the fused step's state names a block's parameters as one block's
  (``'mlp_in/kernel[3]/...'``, of ``block_paths``): here under ``'blocks/'``, as the
  unfused job names the scanned stack's, so that the two runs' figures compare."""
  return {
    f"blocks/{name}" if name.partition("[")[0] in block_paths else name: value
    for name, value in figures.items()
  }


def tensorboard_scalars(
  train_loss: float, aggregates: dict[str, float], figures: dict[str, Any]
) -> dict[str, float]:
  """A log step's scalars by TensorBoard tag: the loss, the aggregates under ``optimizer/``,
  and each parameter's figures grouped by figure (``rms_update_before_clipping/<path>``)."""
  scalars = {"loss/train": train_loss}
  scalars.update({f"optimizer/{key}": value for key, value in aggregates.items()})
  for name, value in figures.items():
    path, _, figure = name.rpartition("/")
    if path:  # the per-step figures are among the aggregates
      scalars[f"{figure}/{path}"] = float(value)
  return scalars


class EventWriter:
  """TensorBoard event files under ``logdir``, written by process 0 alone (no-ops elsewhere).

  A run resumed at step ``start`` opens a new file that tells TensorBoard to
  hide whatever an earlier file holds after ``start`` (tensorboardX's
  ``purge_step``: steps logged after the checkpoint by the run that stopped),
  so that no step is shown twice.
  """

  def __init__(self, logdir: str, *, start: int, enabled: bool) -> None:
    self._writer = None
    if enabled:
      self._writer = SummaryWriter(
        logdir,
        purge_step=start + 1 if start else None,
        flush_secs=10,
        # The file name holds the time in seconds: a resume within the same second gets its own.
        filename_suffix=f".from-step-{start}",
      )

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if self._writer is not None:
      for tag, value in values.items():
        self._writer.add_scalar(tag, value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    if self._writer is not None:
      self._writer.close()


def _sync(name: str) -> None:
  """All processes reach this point before any goes on (nothing to do on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


# --------------------------------------------------------------------------- the job


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, progress: bool = True
) -> dict[str, Any]:
  """Runs (or resumes) the job on the configured mesh and returns the summary it also writes.

  Everything that can be refused (config, mesh, optimizer, corpus, workdir)
  is checked before the workdir is written to (but for its lock file).
  """
  config = resolve_config(config)
  mesh = partitioning.create_mesh(config.mesh)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: create_model(config)))
  param_axes = nnx.get_partition_spec(abstract_params)
  tx = create_optimizer(config.optimizer, config.num_steps, param_axes)
  shardings = create_shardings(config, mesh, tx, abstract_params, param_axes)
  corpus = input_pipeline.load_corpus(
    config.data.corpus,
    tuple(config.data.suffixes),
    config.data.max_bytes,
    config.data.eval_fraction,
    min_bytes=config.data.seq_len + 2,
  )
  work = Workdir(os.path.abspath(workdir))
  with work.claimed():  # by this process alone until it returns
    source_config = work.check(config, abstract_params)  # the run switched from, if any
    _sync("adafactor-train: workdir checked")  # before process 0 writes into it
    main_process = jax.process_index() == 0

    # Made on the mesh, each device computing its own shards: no host copy of the model.
    params = jax.jit(lambda: nnx.state(create_model(config)), out_shardings=shardings.params)()
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    train_step, evaluate = make_steps(graphdef, tx, shardings)
    telemetry = config.optimizer.telemetry
    param_sizes = {
      _param_path(p): x.size for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)
    }
    block_paths = set()
    if config.optimizer.fused_backward:
      layers, _ = split_layers(abstract_params)
      block_paths = {_param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(layers)}
    data_key, eval_key = jax.random.split(jax.random.key(config.seed))
    batch_size, seq_len = config.data.batch_size, config.data.seq_len
    eval_data = input_pipeline.eval_batches(
      corpus.eval, eval_key, config.eval_batches, batch_size, seq_len, shardings.eval_batches
    )

    manager = ocp.CheckpointManager(
      work.file("checkpoints"),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints, enable_async_checkpointing=False, create=True
      ),
    )
    # The losses of the steps since the last log record: a checkpoint taken
    # between records (on a signal) keeps them, so the resumed run logs the
    # same window means as an uninterrupted one.
    pending_losses = np.full((config.log_every,), np.nan, np.float32)
    start, window, switch = 0, [], None
    if manager.latest_step() is not None:
      start = manager.latest_step()
      source_tx, source_shardings = tx, shardings.opt_state
      if source_config is not None:  # the checkpoint holds the state of the optimizer before
        source_tx = create_optimizer(source_config.optimizer, source_config.num_steps, param_axes)
        source_shardings = adafactor_jax.state_shardings(
          source_tx, params=abstract_params, param_shardings=shardings.params
        )
      target = {
        "params": _abstract(params, shardings.params),
        "opt_state": _abstract(jax.eval_shape(source_tx.init, params), source_shardings),
        "pending_losses": pending_losses,
      }
      restored = manager.restore(start, args=ocp.args.StandardRestore(target))
      params, opt_state = restored["params"], restored["opt_state"]
      window = list(np.asarray(restored["pending_losses"])[: start % config.log_every])
      if source_config is not None:
        opt_state = switched_state(config.optimizer, source_config.optimizer, tx, params, opt_state)
        opt_state = jax.device_put(opt_state, shardings.opt_state)
        switch = {
          "step": start,
          "switched_from": source_config.optimizer.name,
          "warm_start": config.optimizer.warm_start,
        }
    records = work.read_metrics(start) if main_process else []
    if switch is not None:
      records.append(switch)
    if main_process:  # once the checkpoint it describes has been restored (or there is none)
      work.write_config(config)
    events = EventWriter(work.file("tensorboard"), start=start, enabled=main_process)

    def save(step: int) -> None:
      if main_process:
        work.write_metrics(records)
      events.flush()
      pending = pending_losses.copy()
      pending[: len(window)] = np.asarray(window, np.float32)
      tree = {"params": params, "opt_state": opt_state, "pending_losses": pending}
      manager.save(step, args=ocp.args.StandardSave(tree))

    title = f"{config.optimizer.name} on {corpus.num_files} files, mesh {dict(mesh.shape)}"
    num_params = sum(x.size for x in jax.tree.leaves(params))
    show = progress and main_process
    if show:
      print(
        f"{num_params:,} params; {len(corpus.train):,} train / {len(corpus.eval):,} eval bytes; "
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
        f"device(s), {jax.process_count()} process(es); "
        + (f"resuming at step {start}" if start else "starting")
        + f"; workdir {work.path}",
        flush=True,
      )
    began = time.perf_counter()
    bar = tqdm(
      total=config.num_steps,
      initial=start,
      disable=not show,
      unit="step",
      dynamic_ncols=True,
      # Not a terminal (a notebook, a log file): a line every 10 s, not every redraw.
      mininterval=0.1 if sys.stderr.isatty() else 10.0,
    )
    log = bar.write if show else lambda _: None
    window_start = time.perf_counter()
    stop, queued, signum = _StopOnSignal(), None, None
    with stop, events:
      for step in range(start, config.num_steps):
        batch = input_pipeline.batch_at(
          corpus.train, data_key, step, batch_size, seq_len, shardings.batch
        )
        params, opt_state, loss = train_step(params, opt_state, batch)
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
          # A few hundred replicated scalars of the last step, read on the host at log steps only.
          figures = adafactor_jax.telemetry(opt_state) if telemetry and main_process else {}
          if block_paths:  # the fused step's
            figures = _under_blocks(figures, block_paths)
          aggregates = optimizer_aggregates(figures, param_sizes)
          records.append(
            {"step": done, "train_loss": train_loss, "steps_per_sec": rate, **aggregates}
          )
          events.scalars(done, tensorboard_scalars(train_loss, aggregates, figures))
          bar.set_postfix(loss=f"{train_loss:.3f}")
          window, window_start, queued = [], time.perf_counter(), None
          if not math.isfinite(train_loss) and not config.optimizer.skip_nonfinite:
            log(f"step {done}: train loss is {train_loss}; the run has diverged.")
        if done % config.eval_every == 0 or done == config.num_steps:
          eval_loss = float(evaluate(params, eval_data))
          records.append({"step": done, "eval_loss": eval_loss})
          events.scalars(done, {"loss/eval": eval_loss})
          log(f"step {done}: eval loss {eval_loss:.4f}")
          if main_process:
            plot_losses(records, work.file("loss.png"), title)
            if telemetry:
              plot_optimizer(records, work.file("optimizer.png"), title)
        signum = stop.requested()
        if done % config.checkpoint_every == 0 or done == config.num_steps or signum:
          save(done)
          window_start = time.perf_counter()
          signum = signum or stop.requested()  # a signal during the write: this step is saved
        if signum:
          break
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if signum:
      raise Stopped(signum, done)

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
      "mesh": dict(mesh.shape),
      "num_devices": jax.device_count(),
      "num_processes": jax.process_count(),
      "param_bytes_per_device": partitioning.per_device_bytes(params),
      "optimizer_state_bytes_per_device": partitioning.per_device_bytes(opt_state),
      "switched_from": next(
        (
          {k: r[k] for k in ("step", "switched_from", "warm_start")}
          for r in records
          if "switched_from" in r
        ),
        None,
      ),
    }
    if main_process:
      work.write_metrics(records)
      plot_losses(records, work.file("loss.png"), title)
      if telemetry:
        plot_optimizer(records, work.file("optimizer.png"), title)
      with open(work.file("summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if show:
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
      f"per device         {s['param_bytes_per_device']:,} bytes of params, "
      f"{s['optimizer_state_bytes_per_device']:,} of optimizer state "
      f"(mesh {s['mesh']}, {s['num_processes']} process(es))",
    ]
  )
