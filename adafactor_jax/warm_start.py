"""Warm start: this library's Adafactor state from another optimizer's state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax import _checks, _probe
from adafactor_jax.factored import TINY, ScaleByFactoredRmsState, factored_axes
from adafactor_jax.momentum import EmaMomentumState, Int8MomentumState, dequantize, quantize


class _Source(NamedTuple):
  """What a source state says about each parameter (flat, in the params' leaf order).

  ``second`` holds per parameter a tuple of float32 statistics in this library's
  layout: ``(v,)`` for a full second moment, ``(v_row, v_col)`` for a factored
  one. ``first`` holds a first moment or None: an average of gradients when
  ``first_is_update`` is False (Adam's bias-corrected mu), of finished updates
  when it is True (an Adafactor momentum).
  """

  steps: jax.Array
  second: list[tuple[jax.Array, ...] | None]
  first: list[jax.Array | None] | None
  first_is_update: bool


_SOURCE_TYPES = (optax.ScaleByAdamState, optax.FactoredState, ScaleByFactoredRmsState)
_MOMENTUM_TYPES = (EmaMomentumState, Int8MomentumState)
_UPDATE_MOMENTUM_TYPES = (optax.EmaState, *_MOMENTUM_TYPES)
_INJECTED_TYPES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _nodes(tree: Any, types: type | tuple[type, ...]) -> list[Any]:
  """The nodes of ``tree`` of the given types, in leaf order."""
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, types))
  return [x for x in leaves if isinstance(x, types)]


def _is_missing(x: Any) -> bool:
  return x is None or isinstance(x, optax.MaskedNode)


def _merged(per_node: list[list[Any]], paths: list[str], what: str) -> list[Any]:
  """One entry per parameter from several nodes' flat lists (multi_transform,
  masked: each node covers some parameters and holds MaskedNode elsewhere)."""
  merged = []
  for i, path in enumerate(paths):
    found = [entries[i] for entries in per_node if not _is_missing(entries[i])]
    if len(found) > 1:
      raise ValueError(f"source_state holds two {what} for parameter '{path}'.")
    merged.append(found[0] if found else None)
  return merged


def _bias_corrected(moment: Any, decay: Any, count: jax.Array) -> jax.Array:
  """moment / (1 - decay^count) in float32; the moment itself (zeros) at count 0.

  The correction is -expm1(count · log1p(-(1 - decay))), with 1 - decay taken
  in float64 for a Python float: in float32, 1 - 0.999^7 loses 2e-5 of itself
  to cancellation (as optax's own bias correction does).
  """
  if isinstance(decay, (int, float, np.floating)):
    complement = jnp.float32(1.0 - float(decay))
  else:  # an injected (traced) hyperparameter: as precise as its own dtype
    complement = 1.0 - jnp.asarray(decay, jnp.float32)
  correction = -jnp.expm1(count.astype(jnp.float32) * jnp.log1p(-complement))
  return jnp.asarray(moment, jnp.float32) / jnp.where(count > 0, correction, 1.0)


def _optax_factored_stats(
  path: str, shape: tuple[int, ...], v_row: Any, v_col: Any
) -> tuple[jax.Array, jax.Array]:
  """optax.adafactor's (v_row, v_col) of one parameter in this library's layout.

  optax factors d1 (the second largest axis) and d0 (the largest; ties to the
  later axis), stores v_row = mean over d0 and v_col = mean over d1, both with
  that axis removed. Here R averages over the later of the two axes and C over
  the earlier one, both keeping the parameter's rank.
  """
  order = np.argsort(shape, kind="stable")
  d1, d0 = int(order[-2]), int(order[-1])
  without = lambda axis: shape[:axis] + shape[axis + 1 :]  # noqa: E731
  if np.shape(v_row) != without(d0) or np.shape(v_col) != without(d1):
    raise ValueError(
      f"source_state's optax.adafactor statistics for parameter '{path}' of shape "
      f"{shape} have shapes {np.shape(v_row)} and {np.shape(v_col)}, not the "
      f"{without(d0)} and {without(d1)} that optax.adafactor gives it."
    )
  by_axis = {d0: v_row, d1: v_col}  # the averaged axis -> the statistic
  row_axis, col_axis = min(d0, d1), max(d0, d1)
  as_f32 = lambda x, axis: jnp.expand_dims(jnp.asarray(x, jnp.float32), axis)  # noqa: E731
  return as_f32(by_axis[col_axis], col_axis), as_f32(by_axis[row_axis], row_axis)


def _check_leaves(what: str, leaves: list[Any], params: list[Any], paths: list[str]) -> None:
  for leaf, param, path in zip(leaves, params, paths, strict=True):
    if not _is_missing(leaf) and np.shape(leaf) != np.shape(param):
      raise ValueError(
        f"source_state's {what} for parameter '{path}' has shape {np.shape(leaf)}, "
        f"but the parameter has shape {np.shape(param)}."
      )


def _read_source(source_state: Any, params: Any, b1: Any, b2: Any) -> _Source:
  """The statistics, first moment and count of an Adam, optax or own Adafactor state."""
  found = {t: _nodes(source_state, t) for t in _SOURCE_TYPES}
  kinds = [t for t, nodes in found.items() if nodes]
  if len(kinds) != 1:
    names = "optax.ScaleByAdamState (adam, adamw), optax's FactoredState (optax.adafactor)"
    names += " or adafactor_jax.ScaleByFactoredRmsState"
    problem = "none" if not kinds else "more than one kind"
    raise ValueError(f"source_state must hold one of {names}; it holds {problem}.")
  kind = kinds[0]
  nodes = found[kind]
  param_leaves = jax.tree.leaves(params)
  treedef: Any = jax.tree.structure(params)  # jaxlib has no type stub for PyTreeDef
  paths = [_checks.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]

  def flat(tree: Any, what: str) -> list[Any]:
    try:
      return treedef.flatten_up_to(tree)
    except (ValueError, TypeError):
      _checks.check_tree_matches(tree, params, what=f"source_state's {what}", shapes=False)
      raise

  count = jnp.asarray(nodes[0].count, jnp.int32)

  if kind is optax.ScaleByAdamState:
    nu = _merged([flat(n.nu, "nu") for n in nodes], paths, "second moments")
    mu = _merged([flat(n.mu, "mu") for n in nodes], paths, "first moments")
    _check_leaves("nu", nu, param_leaves, paths)
    _check_leaves("mu", mu, param_leaves, paths)
    b1 = _injected(source_state, "b1", 0.9) if b1 is None else b1
    b2 = _injected(source_state, "b2", 0.999) if b2 is None else b2
    second: list[tuple[jax.Array, ...] | None] = [
      None if v is None else (_bias_corrected(v, b2, count),) for v in nu
    ]
    first: list[Any] | None = [None if m is None else _bias_corrected(m, b1, count) for m in mu]
    return _Source(count, second, first, first_is_update=False)

  second = []
  trees = [tuple(flat(getattr(n, f), f) for f in ("v_row", "v_col", "v")) for n in nodes]
  for i, (path, param) in enumerate(zip(paths, param_leaves, strict=True)):
    entries = [(r[i], c[i], v[i]) for r, c, v in trees]
    entries = [e for e in entries if not all(_is_missing(x) for x in e)]
    if len(entries) > 1:
      raise ValueError(f"source_state holds two second moments for parameter '{path}'.")
    if not entries:
      second.append(None)
      continue
    v_row, v_col, v = entries[0]
    shape = tuple(np.shape(param))
    if kind is optax.FactoredState and np.shape(v) == shape:
      second.append((jnp.asarray(v, jnp.float32),))
    elif kind is optax.FactoredState:
      second.append(_optax_factored_stats(path, shape, v_row, v_col))
    elif v is not None:
      _check_leaves("v", [v], [param], [path])
      second.append((jnp.asarray(v, jnp.float32),))
    else:
      if np.broadcast_shapes(np.shape(v_row), np.shape(v_col)) != shape:
        raise ValueError(
          f"source_state's statistics for parameter '{path}' have shapes "
          f"{np.shape(v_row)} and {np.shape(v_col)}, which do not make its shape {shape}."
        )
      second.append((v_row, v_col))
  momenta = _nodes(source_state, _UPDATE_MOMENTUM_TYPES)
  first = None
  if momenta:

    def values(node: Any) -> list[Any]:
      if isinstance(node, optax.EmaState):
        return flat(node.ema, "momentum")
      stored = flat(node.momentum, "momentum")
      if not isinstance(node, Int8MomentumState):
        return stored
      return [  # int8, with its block scales
        m if _is_missing(m) else dequantize(m, s)
        for m, s in zip(stored, flat(node.scale, "momentum scales"), strict=True)
      ]

    first = _merged([values(n) for n in momenta], paths, "momenta")
    _check_leaves("momentum", first, param_leaves, paths)
  return _Source(count, second, first, first_is_update=True)


def _injected(source_state: Any, name: str, default: float) -> Any:
  """A hyperparameter of optax.inject_hyperparams in source_state, else the default."""
  values = [
    n.hyperparams[name] for n in _nodes(source_state, _INJECTED_TYPES) if name in n.hyperparams
  ]
  return values[0] if len(values) == 1 else default


def _full(stats: tuple[jax.Array, ...]) -> jax.Array:
  """The full second moment V̂ = R C / mean_rows(R) of one parameter's statistics."""
  if len(stats) == 1:
    return stats[0]
  v_row, v_col = stats
  rows, _ = factored_axes(v_row, v_col)
  return v_row * v_col / jnp.maximum(jnp.mean(v_row, rows, keepdims=True), TINY)


def _statistic(stats: tuple[jax.Array, ...], like: jax.Array) -> jax.Array:
  """The statistic of shape ``like.shape``: the source's own when it has that
  shape, else the mean of the full second moment over the axes it is 1 on."""
  for s in stats:
    if s.shape == like.shape:
      return s.astype(like.dtype)
  full = _full(stats)
  axes = tuple(i for i, n in enumerate(like.shape) if n == 1 != full.shape[i])
  return jnp.mean(full, axes, keepdims=True).astype(like.dtype)


def _warm_statistics(
  node: ScaleByFactoredRmsState, source: _Source, treedef: Any, paths: list[str]
) -> ScaleByFactoredRmsState:
  """``node`` (from tx.init) with every statistic taken from the source."""
  fields = [treedef.flatten_up_to(getattr(node, f)) for f in ("v_row", "v_col", "v")]
  new: list[list[Any]] = [[], [], []]
  for i, path in enumerate(paths):
    targets = [field[i] for field in fields]
    if all(_is_missing(t) for t in targets):  # another group's parameter, or None
      for field, t in zip(new, targets, strict=True):
        field.append(t)
      continue
    stats = source.second[i]
    if stats is None:
      raise ValueError(f"source_state holds no second moment for parameter '{path}'.")
    for field, t in zip(new, targets, strict=True):
      field.append(None if t is None else _statistic(stats, t))
  v_row, v_col, v = (treedef.unflatten(field) for field in new)
  return node._replace(v_row=v_row, v_col=v_col, v=v)


def _replace_nodes(tree: Any, types: type | tuple[type, ...], replace: Any) -> Any:
  return jax.tree.map(
    lambda x: replace(x) if isinstance(x, types) else x,
    tree,
    is_leaf=lambda x: isinstance(x, types),
  )


def _with_count(state: Any, count: jax.Array) -> Any:
  """Every ``count`` field in the state set to ``count`` (in its own dtype)."""

  def set_count(path: jax.tree_util.KeyPath, leaf: Any) -> Any:
    last = path[-1] if path else None
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "count":
      return jnp.asarray(count, jnp.result_type(leaf)).reshape(jnp.shape(leaf))
    return leaf

  return jax.tree_util.tree_map_with_path(set_count, state)


def _convert(
  tx: optax.GradientTransformation,
  params: Any,
  source_state: Any,
  state: Any,
  b1: Any,
  b2: Any,
  count: Any,
) -> Any:
  """``state`` (tx.init's) warm from ``source_state``; see :func:`warm_start_state`."""
  source = _read_source(source_state, params, b1, b2)
  count = source.steps if count is None else jnp.asarray(count, jnp.int32)
  treedef: Any = jax.tree.structure(params)
  paths = [_checks.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  statistics = _nodes(state, ScaleByFactoredRmsState)
  if not statistics:
    raise ValueError(
      "tx must be an adafactor_jax optimizer (its state holds a "
      "ScaleByFactoredRmsState); this one's holds none."
    )
  if _nodes(state, optax.MultiStepsState):
    raise ValueError(
      "tx is an optax.MultiSteps: warm-start the optimizer it wraps, and build "
      "the MultiStepsState around that state."
    )
  state = _with_count(state, count)
  state = _replace_nodes(
    state, ScaleByFactoredRmsState, lambda n: _warm_statistics(n, source, treedef, paths)
  )
  momenta = _nodes(state, _MOMENTUM_TYPES)
  if not momenta or source.first is None:
    return state
  if source.first_is_update:
    source_momenta = source.first

    def copied(node: Any) -> Any:
      targets = treedef.flatten_up_to(node.momentum)
      new = [
        t if _is_missing(t) else _source_momentum(source_momenta[i], paths[i]).astype(t.dtype)
        for i, t in enumerate(targets)
      ]
      if isinstance(node, EmaMomentumState):
        return EmaMomentumState(treedef.unflatten(new))
      # int8: the momentum quantized, with its block scales.
      scales = treedef.flatten_up_to(node.scale)
      for i, t in enumerate(targets):
        if not _is_missing(t):
          new[i], scales[i] = quantize(_source_momentum(source_momenta[i], paths[i]))
      return Int8MomentumState(treedef.unflatten(new), treedef.unflatten(scales))

    return _replace_nodes(state, _MOMENTUM_TYPES, copied)

  # An average of gradients: the momentum is tx's update of it, with the warm
  # statistics held as they are (see the docstring).
  missing = [p for p, m in zip(paths, source.first, strict=True) if m is None]
  if missing:
    raise ValueError(f"source_state holds no first moment for parameter '{missing[0]}'.")
  probe = _probe.Probe()
  update = optax.with_extra_args_support(tx).update
  _, probed = update(treedef.unflatten(source.first), state, params, **{_probe.ARG: probe})
  if probe.statistics < len(statistics) or probe.momentum < len(momenta):
    raise ValueError(
      "tx's update did not pass extra arguments on to its scale_by_factored_rms and "
      "ema_momentum (a wrapper that drops them?), so the momentum cannot be computed "
      "from source_state's first moment."
    )
  new_momenta = iter(_nodes(probed, _MOMENTUM_TYPES))
  return _replace_nodes(state, _MOMENTUM_TYPES, lambda _: next(new_momenta))


def _source_momentum(momentum: Any, path: str) -> jax.Array:
  if momentum is None:
    raise ValueError(f"source_state holds no momentum for parameter '{path}'.")
  return jnp.asarray(momentum, jnp.float32)


def warm_start_state(
  tx: optax.GradientTransformation,
  *,
  params: optax.Params,
  source_state: optax.OptState,
  b1: float | None = None,
  b2: float | None = None,
  count: int | jax.Array | None = None,
) -> optax.OptState:
  r"""The state of ``tx``, an Adafactor of this library, warm from another optimizer's.

  Switching a run from Adam to Adafactor with ``tx.init`` starts Adafactor
  cold: at :math:`t = 1`, :math:`\hat\beta_{2t} = 0` and the statistics are
  one gradient's. But Adam's second moment already estimates
  :math:`E[G^2]` per element, and Adafactor's factored statistics of a matrix
  are its row and column means: this returns the state ``tx`` would have after
  a run that had estimated the same moments. The source is found in
  ``source_state`` by type, inside any chain or wrapper:

  - ``optax.adam``, ``optax.adamw`` (``ScaleByAdamState``): with the bias-corrected
    :math:`\hat\nu = \nu / (1 - b_2^t)`, a factored parameter gets
    :math:`R = \mathrm{mean}_{\text{col}}\,\hat\nu` and
    :math:`C = \mathrm{mean}_{\text{row}}\,\hat\nu` (per slice along batch
    axes, over several row or column axes as ``tx`` factors them), any other
    parameter :math:`\hat\nu` itself.
  - ``optax.adafactor`` (its ``optax.FactoredState``, and ``EmaState`` for momentum):
    the same statistics in this library's layout and float32, the momentum
    copied. Where the two coincide (float32 parameters, a float
    ``learning_rate``; see :func:`adafactor`) the updates that follow are those
    optax would have made, to float32 rounding.
  - this library's own state, e.g. to change ``factor_dims`` or
    ``min_dim_size_to_factor``, or to add momentum, mid-run.

  Statistics that ``tx`` lays out differently from the source (factored
  there, full here, other axes) come from the full :math:`\hat V = R C /
  \mathrm{mean}_{\text{row}}(R)` of the source.

  **Momentum.** This library's momentum averages the *finished* update
  (preconditioned, clipped, times the step size and the parameter scale), not
  the gradient. From an Adafactor source it is copied. From Adam it is
  :math:`M = U_{tx}(\hat\mu)` with :math:`\hat\mu = \mu / (1 - b_1^t)`:
  ``tx``'s own update of the gradient :math:`\hat\mu`, with the warm
  statistics held as they are. While the statistics, step size and parameter
  scale change slowly and clipping is idle, the update is linear in
  :math:`G`, so an average of updates is the update of the averaged gradient,
  :math:`\mathrm{EMA}(U(G_s)) = U(\mathrm{EMA}(G_s))`: the first Adafactor step
  continues in the direction and at the size Adafactor's momentum would have.
  (Adam's :math:`\beta_1` is its horizon; with :math:`\beta_1` of ``tx`` equal,
  that is the same average.) Without momentum in ``tx``, :math:`\mu` is unused;
  without one in the source, the momentum starts at zero.

  **Count.** Every step count in the state (the statistics', the schedules',
  ``inject_hyperparams``') is the source's, so that ``tx`` continues as if it
  had run those steps: :math:`\hat\beta_{2t} = 1 - t^{-c}` stays near 1, which
  is what a statistic averaged over many steps deserves (Adam's
  :math:`b_2 = 0.999` averages over ~1000 steps; :math:`1 - t^{-0.8}` over
  ~:math:`t^{0.8}`, 250 at :math:`t` = 1000), and the relative step size and
  any schedule continue where the run is. A reset (``count=0``) would give
  :math:`\hat\beta_{21} = 0`: the first update would replace the warm
  statistics by one gradient's, a cold start after all (use ``decay_offset``
  for a decay that restarts). Pass ``count`` to choose another.

  Every other part of the state is ``tx.init(params)``'s (``skipped_steps`` 0,
  the stochastic-rounding key, other transformations' states). The result
  follows the params' shardings: called on arrays, the conversion is compiled
  once and each leaf is placed as ``tx.init(params)`` places it (factored
  statistics sharded like their parameter with the averaged axes replicated),
  whatever the source's shardings are. It can also be traced inside your own
  ``jax.jit`` (``tx`` and the keywords closed over); give that jit
  ``out_shardings=adafactor_jax.state_shardings(tx, params=..., param_shardings=...)``.

  Args:
    tx: an optimizer of this library: :func:`adafactor` with any options, an
      ``optax.inject_hyperparams`` of it, or an ``optax.chain`` (also in
      ``masked`` or ``multi_transform``) of its transformations. Not an
      ``optax.MultiSteps`` (warm-start the optimizer inside it).
    params: the parameters the state is for.
    source_state: the other optimizer's state for ``params``.
    b1: Adam's :math:`b_1`, for the bias correction of :math:`\mu`. None: the
      one in an ``optax.inject_hyperparams`` state, else optax's 0.9.
    b2: Adam's :math:`b_2`, for the bias correction of :math:`\nu`. None: the
      one in an ``optax.inject_hyperparams`` state, else optax's 0.999.
    count: the step count to give the state (an int >= 0), or None for the
      source's.

  Returns:
    A state with the structure of ``tx.init(params)``.

  Raises:
    ValueError: when ``source_state`` holds none of the states above or several
      kinds, when its trees or shapes do not match ``params`` (naming the
      parameter), when ``tx`` holds no :func:`scale_by_factored_rms` state, or
      when a wrapper in ``tx`` does not pass on extra arguments and the
      momentum must come from Adam's.
  """
  for name, value in (("b1", b1), ("b2", b2)):
    _checks.check_scalar(name, value, low=0.0, high=1.0, high_open=True, allow_none=True)
  _checks.check_scalar("count", count, low=0, integer=True, allow_none=True)

  # Outside any jit: inject_hyperparams' init needs concrete hyperparameters.
  state = tx.init(params)

  def convert(params: Any, source_state: Any, state: Any) -> Any:
    return _convert(tx, params, source_state, state, b1, b2, count)

  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((params, source_state))):
    return convert(params, source_state, state)
  warm = jax.jit(convert)(params, source_state, state)
  return jax.tree.map(_placed_like, warm, state)


def _placed_like(x: jax.Array, like: Any) -> jax.Array:
  """``x`` with the sharding of ``like``, tx.init's leaf, when both are on the same devices.

  (A leaf tx.init made with jnp.zeros is uncommitted, on one device; its warm
  twin, computed with the sharded params, stays where jit put it.)
  """
  if not isinstance(like, jax.Array) or like.sharding.device_set != x.sharding.device_set:
    return x
  if x.sharding.is_equivalent_to(like.sharding, x.ndim):
    return x
  return jax.device_put(x, like.sharding)
