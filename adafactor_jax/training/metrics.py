"""What a run records as it goes: metrics.jsonl's gradient and optimizer figures, plots,
TensorBoard.

``gradient_aggregates`` summarizes the global gradient norms of a log window;
``optimizer_aggregates`` summarizes ``adafactor_jax.telemetry(opt_state)`` at log
steps; ``plot_losses`` and ``plot_optimizer`` draw ``loss.png`` and
``optimizer.png``; :class:`EventWriter` writes TensorBoard's event files.
"""

from __future__ import annotations

import collections
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from matplotlib.figure import Figure  # not pyplot: a notebook's backend stays as it is
from tensorboardX import SummaryWriter

import adafactor_jax
from adafactor_jax.training import partitioning
from adafactor_jax.training.optimizers import split_layers
from adafactor_jax.training.workdir import Workdir, param_path


class Telemetry:
  """The optimizer's telemetry at log steps: ``adafactor_jax.telemetry(opt_state)``, a few hundred
  replicated scalars of the last step read on the host, and their aggregates for metrics.jsonl.

  Read by process 0 alone (``enabled``), with ``optimizer.telemetry``.
  """

  def __init__(self, opt: ml_collections.ConfigDict, abstract_params: Any, enabled: bool) -> None:
    self.enabled = bool(opt.telemetry)
    self._read = self.enabled and enabled
    leaves = jax.tree_util.tree_leaves_with_path
    self._sizes = {param_path(p): x.size for p, x in leaves(abstract_params)}
    self._block_paths: set[str] = set()
    if opt.fused_backward:
      layers, _ = split_layers(abstract_params)
      self._block_paths = {param_path(p) for p, _ in leaves(layers)}

  def read(self, opt_state: Any) -> tuple[dict[str, Any], dict[str, float]]:
    """(the figures by name, their aggregates)."""
    figures = adafactor_jax.telemetry(opt_state) if self._read else {}
    if self._block_paths:  # the fused step's
      figures = under_blocks(figures, self._block_paths)
    return figures, optimizer_aggregates(figures, self._sizes)


def plot(records: list[dict], work: Workdir, title: str, telemetry: bool) -> None:
  """loss.png, and with telemetry optimizer.png, in the workdir."""
  plot_losses(records, work.file("loss.png"), title)
  if telemetry:
    plot_optimizer(records, work.file("optimizer.png"), title)


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


RMS_UPDATE = "rms_update_before_clipping"
CLIPPING_DENOMINATOR = "clipping_denominator"
PER_STEP_FIGURES = ("step_size", "beta2", "skipped_steps")


def gradient_aggregates(norms: np.ndarray, clip_global_norm: float | None) -> dict[str, float]:
  """A log window's summary of the global gradient norm before clipping, for metrics.jsonl.

  ``grad_norm`` is the norm's mean over the window's steps (as ``train_loss`` is
  the loss's), ``grad_norm_max`` its largest; with ``optimizer.clip_global_norm``
  = c, ``grad_clipped_fraction`` is the share of the window's steps that
  ``optax.clip_by_global_norm`` scaled down: those whose norm (float32) was not
  below c.
  """
  norms = np.asarray(norms, np.float32)
  if not norms.size:
    return {}
  aggregates = {
    "grad_norm": float(np.mean(norms, dtype=np.float64)),
    "grad_norm_max": float(np.max(norms)),
  }
  if clip_global_norm is not None:
    aggregates["grad_clipped_fraction"] = float(np.mean(~(norms < np.float32(clip_global_norm))))
  return aggregates


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


def under_blocks(figures: dict[str, Any], block_paths: set[str]) -> dict[str, Any]:
  """Telemetry of the fused step's state names a block's parameters as one block's
  (``'mlp_in/kernel[3]/...'``, of ``block_paths``): here under ``'blocks/'``, as the
  unfused job names the scanned stack's, so that the two runs' figures compare."""
  return {
    f"blocks/{name}" if name.partition("[")[0] in block_paths else name: value
    for name, value in figures.items()
  }


def tensorboard_scalars(
  train_loss: float,
  aggregates: dict[str, float],
  figures: dict[str, Any],
  gradient: dict[str, float] | None = None,
) -> dict[str, float]:
  """A log step's scalars by TensorBoard tag: the loss, the gradient's figures under
  ``gradient/`` (``grad_norm`` as ``gradient/norm``), the aggregates under ``optimizer/``,
  and each parameter's figures grouped by figure (``rms_update_before_clipping/<path>``)."""
  scalars = {"loss/train": train_loss}
  scalars.update(
    {f"gradient/{key.removeprefix('grad_')}": value for key, value in (gradient or {}).items()}
  )
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


def start_line(params: Any, corpus: Any, mesh: Mesh, start: int, path: str) -> str:
  num_params = sum(x.size for x in jax.tree.leaves(params))
  return (
    f"{num_params:,} params; {len(corpus.train):,} train / {len(corpus.eval):,} eval bytes; "
    f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
    f"device(s), {jax.process_count()} process(es); "
    + (f"resuming at step {start}" if start else "starting")
    + f"; workdir {path}"
  )


def summary(
  config: ml_collections.ConfigDict,
  mesh: Mesh,
  start: int,
  records: list[dict],
  params: Any,
  opt_state: Any,
  wall_time: float,
) -> dict[str, Any]:
  """summary.json: the run's final losses, time, and the bytes of its params and state."""
  train_losses = [r["train_loss"] for r in records if "train_loss" in r]
  eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
  switches = [r for r in records if "switched_from" in r]
  return {
    "optimizer": config.optimizer.name,
    "steps": config.num_steps,
    "resumed_from": start,
    "final_train_loss": train_losses[-1] if train_losses else None,
    "final_eval_loss": eval_losses[-1] if eval_losses else None,
    "wall_time_sec": wall_time,
    "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
    "param_bytes": tree_bytes(params),
    "optimizer_state_bytes": tree_bytes(opt_state),
    "adamw_state_bytes": tree_bytes(jax.eval_shape(optax.adamw(1e-3).init, params)),
    "mesh": dict(mesh.shape),
    "num_devices": jax.device_count(),
    "num_processes": jax.process_count(),
    "param_bytes_per_device": partitioning.per_device_bytes(params),
    "optimizer_state_bytes_per_device": partitioning.per_device_bytes(opt_state),
    "switched_from": (
      {k: switches[0][k] for k in ("step", "switched_from", "warm_start")} if switches else None
    ),
  }


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or abstract arrays) in a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
