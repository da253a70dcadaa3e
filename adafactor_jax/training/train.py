"""Trains a small Transformer language model with Adafactor (or AdamW, to compare), on any mesh.

``train_and_evaluate`` runs (or resumes) the job in a workdir, on a
('data', 'model') mesh over every device of every process (``config.mesh``);
one device is a mesh of one. The workdir receives ``config.json``,
``metrics.jsonl`` (train and eval records; the train records hold the global
gradient norm before any clipping, and with ``optimizer.telemetry`` summarize the
optimizer's telemetry), ``loss.png``,
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

import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

import adafactor_jax
from adafactor_jax.training import input_pipeline, metrics, optimizers, partitioning
from adafactor_jax.training.config import ConfigError, dtype, resolve_config
from adafactor_jax.training.model import TransformerLM, run_block
from adafactor_jax.training.workdir import Workdir


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


# --------------------------------------------------------------------------- model and steps


def create_model(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> TransformerLM:
  """The model of ``config``; on ``mesh``, with its activations' rows kept on the devices that
  hold those rows of the batch, so that the compiler gathers weights, not activations."""
  m = config.model
  rows = None
  if mesh is not None:
    spec = partitioning.mesh_spec(
      PartitionSpec("batch", None, None), config.mesh.logical_axis_rules
    )
    rows = NamedSharding(mesh, spec)
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
    activation_dtype=None
    if m.activation_dtype is None
    else dtype("model.activation_dtype", m.activation_dtype),
    remat=m.remat,
    activation_sharding=rows,
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


class Setup(NamedTuple):
  """What the job is made of before it touches a device: all from shapes."""

  config: ml_collections.ConfigDict  # resolved
  mesh: Mesh
  graphdef: nnx.GraphDef
  abstract_params: Any
  param_axes: Any  # the params' logical axis names
  tx: optax.GradientTransformation
  shardings: Shardings


def setup(config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Setup:
  """The resolved config, the mesh over ``devices`` (by default every device of every
  process), the model's shapes, the optimizer and the shardings; ConfigError for any that
  cannot be."""
  config = resolve_config(config)
  mesh = partitioning.create_mesh(config.mesh, devices)
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: create_model(config, mesh)))
  param_axes = nnx.get_partition_spec(abstract_params)
  tx = optimizers.create_optimizer(config.optimizer, config.num_steps, param_axes)
  shardings = create_shardings(config, mesh, tx, abstract_params, param_axes)
  return Setup(config, mesh, graphdef, abstract_params, param_axes, tx, shardings)


def make_steps(
  graphdef: nnx.GraphDef, tx: optax.GradientTransformation, shardings: Shardings
) -> tuple[Callable[..., Any], Callable[..., Any]]:
  """The train step (params and state donated, updated in place) and evaluation, compiled for
  the shardings.

  The step returns ``(params, opt_state, (loss, grad_norm))``: ``grad_norm`` is the global
  norm of the gradient before any clipping, the one ``optax.clip_by_global_norm`` compares
  ('optimizer.clip_global_norm'); NaN for the fused step, which never holds the whole
  gradient.
  """
  loss_fn = functools.partial(next_token_loss, graphdef)

  @functools.partial(
    jax.jit,
    in_shardings=(shardings.params, shardings.opt_state, shardings.batch),
    out_shardings=(shardings.params, shardings.opt_state, shardings.replicated),
    donate_argnums=(0, 1),
  )
  def train_step(params: Any, opt_state: Any, batch: jax.Array) -> tuple[Any, Any, Any]:
    if isinstance(tx, optimizers.Layerwise):
      params, opt_state, loss = fused_step(graphdef, tx.layer_tx, params, opt_state, batch)
      return params, opt_state, (loss, jnp.full((), jnp.nan, jnp.float32))
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    # One reduction, which XLA shares with clip_by_global_norm's where the optimizer clips.
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, (loss, grad_norm)

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
  layers, rest = optimizers.split_layers(params)
  # embed and head merge the whole model for its own methods; they read no block.
  fused = adafactor_jax.fused_train_step(
    layer_tx,
    embed=functools.partial(_fused_embed, graphdef, layers),
    layer=functools.partial(run_block, nnx.graphdef(nnx.merge(graphdef, params).blocks)),
    head=functools.partial(_fused_head, graphdef, layers),
  )
  layers, rest, opt_state, loss = fused.step(layers, rest, opt_state, batch)
  return optimizers.join_layers(layers, rest), opt_state, loss


def _fused_embed(
  graphdef: nnx.GraphDef, layers: nnx.State, rest: nnx.State, batch: jax.Array
) -> jax.Array:
  return nnx.merge(graphdef, optimizers.join_layers(layers, rest)).embed_tokens(batch[:, :-1])


def _fused_head(
  graphdef: nnx.GraphDef, layers: nnx.State, rest: nnx.State, x: jax.Array, batch: jax.Array
) -> jax.Array:
  return _cross_entropy(nnx.merge(graphdef, optimizers.join_layers(layers, rest)).logits(x), batch)


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of a tree's arrays (or shapes) with those shardings."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


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
  is checked before the workdir is written to (but for its lock file). A
  finished run's workdir is left as it is: its recorded summary is returned.
  """
  config, mesh, graphdef, abstract_params, param_axes, tx, shardings = setup(config)
  data = config.data
  corpus = input_pipeline.load_corpus(
    data.corpus, tuple(data.suffixes), data.max_bytes, data.eval_fraction, data.seq_len + 2
  )
  work = Workdir(os.path.abspath(workdir))
  main_process = jax.process_index() == 0
  show = progress and main_process
  with work.claimed():  # by this process alone until it returns
    source_config = work.check(config, abstract_params)  # the run switched from, if any
    summary = work.finished_summary(config.num_steps)
    if summary is not None:  # a rerun of a finished run changes nothing
      if show:
        print(f"{work.path} holds this run, finished:\n{metrics.format_summary(summary)}")
      return summary
    _sync("adafactor-train: workdir checked")  # before process 0 writes into it

    # Made on the mesh, each device computing its own shards: no host copy of the model.
    params = jax.jit(lambda: nnx.state(create_model(config)), out_shardings=shardings.params)()
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    manager = work.checkpoint_manager(config.keep_checkpoints)
    start, params, opt_state, (window, grad_norms), switch = _resume(
      manager, work, config, source_config, tx, shardings, params, opt_state, param_axes
    )
    records = work.read_metrics(start) if main_process else []
    records += [switch] if switch else []
    if main_process:  # once the checkpoint it describes has been restored (or there is none)
      work.write_config(config)

    train_step, evaluate = make_steps(graphdef, tx, shardings)
    data_key, eval_key = jax.random.split(jax.random.key(config.seed))
    eval_data = input_pipeline.eval_batches(
      corpus.eval, eval_key, config.eval_batches, data.batch_size, data.seq_len,
      shardings.eval_batches,
    )  # fmt: skip
    telemetry = metrics.Telemetry(config.optimizer, abstract_params, enabled=main_process)
    title = f"{config.optimizer.name} on {corpus.num_files} files, mesh {dict(mesh.shape)}"
    if show:
      print(metrics.start_line(params, corpus, mesh, start, work.path), flush=True)
    began = window_start = time.perf_counter()
    bar = _progress_bar(config.num_steps, start, show)
    log = bar.write if show else lambda _: None
    events = metrics.EventWriter(work.file("tensorboard"), start=start, enabled=main_process)
    stop, queued, signum = _StopOnSignal(), None, None
    with stop, events:
      for step in range(start, config.num_steps):
        batch = input_pipeline.batch_at(
          corpus.train, data_key, step, data.batch_size, data.seq_len, shardings.batch
        )
        params, opt_state, (loss, grad_norm) = train_step(params, opt_state, batch)
        if queued is not None:  # wait for the previous step only: the bar's rate is real
          queued.block_until_ready()
          bar.update(1)
        queued = loss
        window.append(loss)
        grad_norms.append(grad_norm)
        done = step + 1
        last = done == config.num_steps
        if done % config.log_every == 0 or last:
          train_loss = float(jnp.mean(jnp.stack(window)))
          bar.update(1)
          rate = len(window) / (time.perf_counter() - window_start)
          figures, aggregates = telemetry.read(opt_state)
          gradient = {}
          if not config.optimizer.fused_backward:
            norms = np.asarray(jnp.stack(grad_norms), np.float32)
            gradient = metrics.gradient_aggregates(norms, config.optimizer.clip_global_norm)
          record = {"step": done, "train_loss": train_loss, "steps_per_sec": rate}
          records.append({**record, **gradient, **aggregates})
          scalars = metrics.tensorboard_scalars(train_loss, aggregates, figures, gradient)
          events.scalars(done, scalars)
          bar.set_postfix(loss=f"{train_loss:.3f}")
          window, grad_norms, window_start, queued = [], [], time.perf_counter(), None
          if not math.isfinite(train_loss) and not config.optimizer.get("skip_nonfinite"):
            log(f"step {done}: train loss is {train_loss}; the run has diverged.")
        if done % config.eval_every == 0 or last:
          eval_loss = float(evaluate(params, eval_data))
          records.append({"step": done, "eval_loss": eval_loss})
          events.scalars(done, {"loss/eval": eval_loss})
          log(f"step {done}: eval loss {eval_loss:.4f}")
          if main_process:
            metrics.plot(records, work, title, telemetry.enabled)
        signum = stop.requested()
        if done % config.checkpoint_every == 0 or last or signum:
          if main_process:
            work.write_metrics(records)
          events.flush()
          work.save(manager, done, params, opt_state, window, grad_norms, config.log_every)
          window_start = time.perf_counter()
          signum = signum or stop.requested()  # a signal during the write: this step is saved
        if signum:
          break
    bar.close()
    manager.wait_until_finished()
    manager.close()
    if signum:
      raise Stopped(signum, done)

    wall_time = time.perf_counter() - began
    summary = metrics.summary(config, mesh, start, records, params, opt_state, wall_time)
    if main_process:
      work.write_metrics(records)
      metrics.plot(records, work, title, telemetry.enabled)
      work.write_summary(summary)
    if show:
      print(metrics.format_summary(summary), flush=True)
    return summary


def _resume(
  manager: ocp.CheckpointManager,
  work: Workdir,
  config: ml_collections.ConfigDict,
  source_config: ml_collections.ConfigDict | None,
  tx: optax.GradientTransformation,
  shardings: Shardings,
  params: Any,
  opt_state: Any,
  param_axes: Any,
) -> tuple[int, Any, Any, tuple[list, list], dict | None]:
  """(the step, params, state, and unlogged losses and gradient norms to go on from; the
  switch's record or None).

  From the latest checkpoint, if any. It holds the state of the optimizer of
  ``source_config`` when this run switches from it, converted here.
  """
  step = manager.latest_step()
  if step is None:
    return 0, params, opt_state, ([], []), None
  source_tx, source_shardings = tx, shardings.opt_state
  if source_config is not None:
    source_opt = source_config.optimizer
    source_tx = optimizers.create_optimizer(source_opt, source_config.num_steps, param_axes)
    source_shardings = adafactor_jax.state_shardings(
      source_tx, params=abstract(params, shardings.params), param_shardings=shardings.params
    )
  target = {
    "params": abstract(params, shardings.params),
    "opt_state": abstract(jax.eval_shape(source_tx.init, params), source_shardings),
    "pending_losses": np.full((config.log_every,), np.nan, np.float32),
  }
  # A checkpoint from before the job recorded gradient norms has none: the window's record
  # then summarizes the norms of the steps after the resume alone.
  if "pending_grad_norms" in work.checkpoint_items:
    target["pending_grad_norms"] = np.full((config.log_every,), np.nan, np.float32)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except ValueError as e:  # the parameters' shapes were checked: the state's differ
    if "stored shape" not in str(e):
      raise
    raise ConfigError(
      f"--workdir {work.path!r}: its checkpoint of step {step} holds optimizer state of "
      "shapes this version's optimizer does not make, so it cannot be read (int8 momentum's "
      "scales changed layout in 2026-12: one per line along the parameter's longest axis, "
      f"not per 32 elements). Orbax: {str(e).splitlines()[0]} Its checkpoints are left "
      "untouched: use a new --workdir."
    ) from e
  params, opt_state = restored["params"], restored["opt_state"]
  pending = step % config.log_every
  window = list(np.asarray(restored["pending_losses"])[:pending])
  grad_norms = list(np.asarray(restored.get("pending_grad_norms", []))[:pending])
  if source_config is None:
    return step, params, opt_state, (window, grad_norms), None
  opt_state = optimizers.switched_state(config.optimizer, source_opt, tx, params, opt_state)
  opt_state = jax.device_put(opt_state, shardings.opt_state)
  warm = config.optimizer.warm_start
  return (
    step,
    params,
    opt_state,
    (window, grad_norms),
    {"step": step, "switched_from": source_opt.name, "warm_start": warm},
  )


def _progress_bar(num_steps: int, start: int, show: bool) -> tqdm:
  return tqdm(
    total=num_steps,
    initial=start,
    disable=not show,
    unit="step",
    dynamic_ncols=True,
    # Not a terminal (a notebook, a log file): a line every 10 s, not every redraw.
    mininterval=0.1 if sys.stderr.isatty() else 10.0,
  )
