"""Telemetry: the figures a step already computes, kept in the state, and their reader."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax import _checks
from adafactor_jax.fused import FusedState
from adafactor_jax.nonfinite import SkipNonfiniteState

RMS_UPDATE = "rms_update_before_clipping"
CLIPPING_DENOMINATOR = "clipping_denominator"
PARAMETER_SCALE = "parameter_scale"
BETA2 = "beta2"
STEP_SIZE = "step_size"
RMS_STEP = "rms_step"
SKIPPED_STEPS = "skipped_steps"


Layout = tuple[tuple[str, tuple[int, ...]], ...]
"""Per parameter, in leaf order: its '/'-joined path and the shape of its batch axes."""


@jax.tree_util.register_pytree_with_keys_class
class PackedFigures:
  """One figure of every slice of every parameter, in one float32 vector.

  ``values`` holds them in the parameters' leaf order, each parameter's slices
  in C order; ``layout`` (static: part of the tree structure, not a leaf) says
  whose they are. One array rather than one per parameter, because a jitted
  step pays for each buffer it takes and returns (about 1 µs each on CPU: a
  millisecond per step for the T5-small tree's 400 figures).
  """

  def __init__(self, values: Any, layout: Layout) -> None:
    self.values = values
    self.layout = layout

  def tree_flatten_with_keys(self) -> tuple[tuple[tuple[Any, Any]], Layout]:
    return ((jax.tree_util.GetAttrKey("values"), self.values),), self.layout

  @classmethod
  def tree_unflatten(cls, layout: Layout, children: Sequence[Any]) -> PackedFigures:
    return cls(children[0], layout)

  def __repr__(self) -> str:
    return f"PackedFigures({self.values!r}, {len(self.layout)} parameters)"

  def __eq__(self, other: object) -> bool:  # as a NamedTuple state compares
    if not isinstance(other, PackedFigures):
      return NotImplemented
    return self.layout == other.layout and bool(np.all(self.values == other.values))

  __hash__ = None  # type: ignore[assignment]  # mutable, like the arrays it holds


class TelemetryState(NamedTuple):
  """The state of a transformation built with ``telemetry=True``.

  ``inner_state`` is the state the transformation has without telemetry;
  ``per_step`` maps a figure's name to a float32 scalar, and ``per_parameter``
  a figure's name to its value for every parameter, per slice along the batch
  axes that ``factor_dims`` declares (a stack of 12 scanned layers has 12),
  packed in one float32 vector: ``.values``, with ``.layout`` (static) naming
  the parameters and their slice shapes. Each holds the figures of the
  last update (before the first: zeros, and clipping denominators of 1). Read
  them with :func:`adafactor_jax.telemetry`.
  """

  inner_state: optax.OptState
  per_step: dict[str, jax.Array]
  per_parameter: dict[str, PackedFigures]


def initial_figures(
  name: str,
  params: optax.Params,
  slice_axes: Callable[[str, tuple[int, ...]], tuple[int, ...]],
) -> PackedFigures:
  """A figure before the first step: 1 for the clipping denominator (nothing
  clipped), else 0, for each slice of each parameter (all axes but
  ``slice_axes(path, shape)`` are batch axes)."""
  layout = []
  for path, param in jax.tree_util.tree_leaves_with_path(params):
    shape = tuple(np.shape(param))
    axes = slice_axes(_checks.path_name(path), shape)
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):  # an nnx.Variable's array
      path = path[:-1]
    layout.append((_checks.path_name(path), tuple(n for i, n in enumerate(shape) if i not in axes)))
  size = sum(math.prod(shape) for _, shape in layout)
  value = 1.0 if name == CLIPPING_DENOMINATOR else 0.0
  return PackedFigures(jnp.full([size], value, jnp.float32), tuple(layout))


def packed(per_slice: Sequence[jax.Array], like: PackedFigures) -> PackedFigures:
  """Each parameter's figure (one value per slice, any size-1 axes kept), packed as ``like``."""
  values = [jnp.ravel(x).astype(jnp.float32) for x in per_slice]
  return PackedFigures(jnp.concatenate(values) if values else like.values, like.layout)


def scalar_zeros(*names: str) -> dict[str, jax.Array]:
  return {name: jnp.zeros([], jnp.float32) for name in names}


def with_per_parameter_figures(
  step: Callable[[optax.Updates, optax.Params | None], tuple[optax.Updates, dict[str, Any]]],
  names: Sequence[str],
  slice_axes: Callable[[str, tuple[int, ...]], tuple[int, ...]],
  *,
  telemetry: bool,
) -> optax.GradientTransformation:
  """A stateless transformation whose ``step(updates, params)`` returns the updates and,
  per figure name, a tree of each parameter's values per slice; with ``telemetry``,
  its state is a :class:`TelemetryState` that keeps the figures ``names`` name (an
  ``optax.EmptyState`` without). ``slice_axes`` is as for :func:`initial_figures`."""

  def init_fn(params: optax.Params) -> optax.EmptyState | TelemetryState:
    if not telemetry:
      return optax.EmptyState()
    figures = {name: initial_figures(name, params, slice_axes) for name in names}
    return TelemetryState(optax.EmptyState(), {}, figures)

  def update_fn(
    updates: optax.Updates,
    state: optax.EmptyState | TelemetryState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, optax.EmptyState | TelemetryState]:
    new_updates, figures = step(updates, params)
    if not telemetry:
      return new_updates, state
    assert isinstance(state, TelemetryState)
    per_parameter = {
      name: packed(jax.tree.leaves(figures[name]), like)
      for name, like in state.per_parameter.items()
    }
    return new_updates, TelemetryState(optax.EmptyState(), {}, per_parameter)

  return optax.GradientTransformation(init_fn, update_fn)


_NODES = (TelemetryState, SkipNonfiniteState, optax.MultiTransformState, FusedState)


def _is_nnx_variable(x: Any) -> bool:  # duck-typed, so that flax stays optional
  return hasattr(x, "get_metadata")


def _value(x: Any) -> Any:
  """The array (also inside the nnx.Variable that flax.nnx.Optimizer's state holds):
  traced as it is, else fetched to the host in one transfer, so that slicing it
  into hundreds of scalars costs no device dispatch each."""
  x = x.get_value() if _is_nnx_variable(x) else x
  return x if isinstance(x, jax.core.Tracer) else np.asarray(x)


def _collect(
  tree: Any,
  scope: str,
  steps: dict[str, dict[str, jax.Array]],
  parameters: dict[str, dict[str, dict[str, jax.Array]]],
  stacked: bool = False,
) -> bool:
  """Gathers the figures of ``tree``'s telemetry nodes by scope (a multi_transform
  label path) and parameter path; True when it found a TelemetryState. ``stacked``: the
  states of a stack of layers (``jax.vmap`` of ``init``, as ``FusedState.layers``), whose
  figures gain the layer as their leading batch axis."""
  found = False
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, _NODES)):
    if isinstance(node, FusedState):
      found |= _collect_fused(node, scope, steps, parameters)
    elif isinstance(node, optax.MultiTransformState):
      for label, inner in node.inner_states.items():
        found |= _collect(inner, f"{scope}{label}/", steps, parameters, stacked)
    elif isinstance(node, SkipNonfiniteState):
      steps.setdefault(scope, {})[SKIPPED_STEPS] = _per_step(node.skipped_steps, stacked)
      found |= _collect(node.inner_state, scope, steps, parameters, stacked)
    elif isinstance(node, TelemetryState):
      found = True
      steps.setdefault(scope, {}).update(
        {k: _per_step(v, stacked) for k, v in node.per_step.items()}
      )
      by_parameter = parameters.setdefault(scope, {})
      for name, figures in node.per_parameter.items():
        values, offset = _value(figures.values), 0
        if np.ndim(values) != (2 if stacked else 1):
          raise ValueError(
            "opt_state holds optimizer states stacked by jax.vmap (as FusedState.layers): "
            "pass fused_train_step's FusedState whole, or one layer's state, "
            "jax.tree.map(lambda x: x[i], state.layers)."
          )
        layer_axis = np.shape(values)[:1] if stacked else ()
        for path, shape in figures.layout:
          size = math.prod(shape)
          by_parameter.setdefault(path, {})[name] = values[..., offset : offset + size].reshape(
            layer_axis + shape
          )
          offset += size
      found |= _collect(node.inner_state, scope, steps, parameters, stacked)
  return found


def _collect_fused(
  state: FusedState,
  scope: str,
  steps: dict[str, dict[str, jax.Array]],
  parameters: dict[str, dict[str, dict[str, jax.Array]]],
) -> bool:
  """``_collect`` of fused_train_step's state: rest's figures, and each layer's, indexed by
  the layer, beside them."""
  found = _collect(state.rest, scope, steps, parameters)
  layers: dict[str, dict[str, dict[str, jax.Array]]] = {}
  found |= _collect(state.layers, scope, steps, layers, stacked=True)
  for layer_scope, by_parameter in layers.items():
    into = parameters.setdefault(layer_scope, {})
    if clash := sorted(into.keys() & by_parameter.keys()):
      raise ValueError(
        f"opt_state is a FusedState whose layers and rest both have parameters {clash}: "
        "telemetry() names each layer's figures by its path, so give the two trees paths of "
        "their own."
      )
    into.update(by_parameter)
  return found


def _per_step(value: Any, stacked: bool) -> Any:
  """A per-step figure; of a stack of layers, its first layer's: every layer takes every step
  (fused_train_step updates them all), so their counts, and the figures, are the same."""
  value = _value(value)
  return value[0] if stacked else value


def _rms_step(figures: dict[str, jax.Array], step_size: jax.Array) -> jax.Array:
  """RMS(U) after clipping, times the step size and the parameter scale."""
  rms = figures[RMS_UPDATE]
  if CLIPPING_DENOMINATOR in figures:
    rms = rms / figures[CLIPPING_DENOMINATOR]
  rms = rms * step_size
  if PARAMETER_SCALE in figures:
    rms = rms * figures[PARAMETER_SCALE]
  return rms


def telemetry(opt_state: optax.OptState) -> dict[str, jax.Array]:
  r"""The figures of the last step, from the state of an optimizer built with telemetry.

  Works on the state of :func:`adafactor_jax.adafactor` (or a preset) with
  ``telemetry=True``, and of any chain of :func:`scale_by_factored_rms`,
  :func:`clip_by_update_rms`, :func:`scale_by_learning_rate` and
  :func:`scale_by_parameter_scale` built with ``telemetry=True``, found by
  type anywhere in the state: inside
  ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``,
  ``optax.masked``, ``optax.multi_transform`` and :func:`skip_nonfinite`, also
  as ``flax.nnx.Optimizer`` holds it (``adafactor_jax.telemetry(optimizer.opt_state)``).
  Nothing is computed from the parameters: each figure was stored by the step
  that computed it anyway.

  Per parameter (per slice where ``factor_dims`` declares batch axes), named
  ``'<parameter path>/<figure>'``, e.g. ``'decoder/mlp/wi/kernel/parameter_scale'``:

  - ``rms_update_before_clipping``: :math:`\mathrm{RMS}(U_t)`,
    :math:`U_t = G_t/\sqrt{\hat V_t}` (by :func:`scale_by_factored_rms`,
    with or without clipping; by :func:`clip_by_update_rms`, of the update it
    is given, which is reported when both record it);
  - ``clipping_denominator``: :math:`\max(1, \mathrm{RMS}(U_t)/d)`, above 1
    when the update was clipped (only where clipping is on);
  - ``parameter_scale``: :math:`\max(\epsilon_2, \mathrm{RMS}(X_{t-1}))`
    (by :func:`scale_by_parameter_scale`);
  - ``rms_step``: :math:`\mathrm{RMS}(\hat U_t)\,\eta_t\,\max(\epsilon_2,
    \mathrm{RMS}(X_{t-1}))`, the RMS of the step after clipping, step size and
    parameter scale, where the state records the step size (``adafactor``, the
    presets, and :func:`scale_by_learning_rate` with ``telemetry=True``).
    Without momentum and weight decay this is the RMS of the step the
    parameter takes. With momentum it is that of the newest term of the
    average (the step, an average of such terms, has an RMS at most their
    largest); weight decay is not in it.

  Per step: ``beta2`` (:math:`\hat\beta_{2t}`), ``step_size`` (:math:`\rho_t`,
  or the learning rate, a schedule's value at that step) and, with
  :func:`skip_nonfinite`, ``skipped_steps`` (a skipped step leaves every other
  figure as the last step taken left it). Inside ``optax.multi_transform`` the
  per-step names start with the group's label (``'embeddings/beta2'``).

  A stack of scanned layers (batch axis of size 12) gives one entry per layer,
  the index in brackets after the path:
  ``'h/mlp/c_fc/kernel[3]/rms_update_before_clipping'`` (``[i,j]`` for two
  batch axes). So does the :class:`FusedState` of :func:`fused_train_step`,
  whose ``layers`` hold one state per layer: each layer's figures under the
  path within a layer with the layer's index first (``'mlp/kernel[3]/...'``),
  beside those of ``rest``; the per-step figures are every layer's (each layer
  takes every step).

  Args:
    opt_state: the optimizer's state.

  Returns:
    A dict from name to a float32 scalar (``skipped_steps``: int32): NumPy
    scalars for a state of arrays (fetched with one transfer per figure, which
    waits for the step that wrote them), traced arrays of shape () inside
    ``jax.jit``.

  Raises:
    ValueError: when ``opt_state`` records no telemetry; is the stacked
      ``FusedState.layers`` alone; or is a ``FusedState`` whose ``layers`` and
      ``rest`` have parameters of the same path.
  """
  steps: dict[str, dict[str, jax.Array]] = {}
  parameters: dict[str, dict[str, dict[str, jax.Array]]] = {}
  if not _collect(opt_state, "", steps, parameters):
    raise ValueError(
      "opt_state records no telemetry: build the optimizer with telemetry=True "
      "(adafactor_jax.adafactor(..., telemetry=True), or on its transformations)."
    )
  out: dict[str, jax.Array] = {}
  for scope, figures in steps.items():
    out.update({f"{scope}{name}": value for name, value in figures.items()})
  for scope, by_parameter in parameters.items():
    step_size = steps.get(scope, {}).get(STEP_SIZE)
    for path, figures in by_parameter.items():
      if step_size is not None and RMS_UPDATE in figures:
        figures = {**figures, RMS_STEP: _rms_step(figures, step_size)}
      names = sorted(figures, key=lambda name: (_ORDER.get(name, len(_ORDER)), name))
      for index in np.ndindex(*np.shape(figures[names[0]])):
        where = f"[{','.join(map(str, index))}]" if index else ""
        out.update({f"{path}{where}/{name}": figures[name][index] for name in names})
  return out


_ORDER = {
  name: i for i, name in enumerate((RMS_UPDATE, CLIPPING_DENOMINATOR, PARAMETER_SCALE, RMS_STEP))
}
