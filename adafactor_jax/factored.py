"""The factored second-moment estimate of Adafactor (Algorithms 4 and 5)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax import _checks, schedules

FactorDims = Optional[tuple[int, int]]  # noqa: UP045 (a runtime alias on 3.10)
"""(row_axis, col_axis) to factor over, or None for a full second moment."""

FactorDimsFn = Callable[[str, tuple[int, ...]], FactorDims]
"""Chooses the factored axes from a parameter's path ('a/b/kernel') and shape."""

FactorRules = Sequence[tuple[str, FactorDims]]
"""(regex, dims) pairs: the first regex found in a parameter's path decides."""

# The smallest normal float32: the row/mean(row) ratio is clamped to it so that
# an all-zero row next to huge ones cannot underflow to 0 and give 0 * inf.
_TINY = float(np.finfo(np.float32).tiny)


class FactoredMoment(NamedTuple):
  """The factored second moment of one parameter.

  Both arrays keep the parameter's rank: ``v_row`` has size 1 on the column
  axis it averages over, ``v_col`` size 1 on the row axis. Broadcasting them
  gives the parameter's shape, and which axes are factored can be read from the
  shapes alone, so an update never needs the hyperparameters that chose them.
  """

  v_row: jax.Array  # R_t: the mean of G² + ε1 over the column axis.
  v_col: jax.Array  # C_t: the mean of G² + ε1 over the row axis.


class ScaleByFactoredRmsState(NamedTuple):
  """State of :func:`scale_by_factored_rms`."""

  count: jax.Array  # int32, the number of updates so far.
  nu: optax.Updates  # Per parameter: a FactoredMoment or a full float32 array.


def default_factor_dims(shape: Sequence[int], min_dim_size_to_factor: int = 128) -> FactorDims:
  """The default choice of factored axes: the two largest dimensions.

  Ties go to the later axis (as optax). Returns (row_axis, col_axis) in
  increasing order, or None when the rank is below 2 or the second largest
  dimension is below ``min_dim_size_to_factor``. Every other axis is a batch
  axis: it gets statistics of its own.
  """
  if len(shape) < 2:
    return None
  order = np.argsort(shape, kind="stable")
  first, second = int(order[-1]), int(order[-2])
  if shape[second] < min_dim_size_to_factor:
    return None
  return min(first, second), max(first, second)


def _normalize_dims(dims, path: str, shape: tuple[int, ...]) -> FactorDims:
  if dims is None:
    return None
  try:
    row, col = (int(axis) for axis in dims)
  except (TypeError, ValueError):
    raise ValueError(
      f"The factored axes for parameter '{path}' must be a pair of ints "
      f"(row_axis, col_axis) or None, got {dims!r}."
    ) from None
  rank = len(shape)
  if not (-rank <= row < rank and -rank <= col < rank) or row % rank == col % rank:
    raise ValueError(
      f"The factored axes {dims!r} for parameter '{path}' of shape {shape} "
      "must be two different axes of it."
    )
  return row % rank, col % rank


def _factor_dims_fn(
  factored: bool,
  min_dim_size_to_factor: int,
  factor_dims: FactorDimsFn | FactorRules | None,
) -> FactorDimsFn:
  """One function (path, shape) -> dims from the user's rules or the default."""
  if not factored:
    return lambda path, shape: None
  if factor_dims is None:
    return lambda path, shape: default_factor_dims(shape, min_dim_size_to_factor)
  if callable(factor_dims):
    return factor_dims
  rules = []
  for rule in factor_dims:
    try:
      pattern, dims = rule
      rules.append((re.compile(pattern), dims))
    except (TypeError, ValueError, re.error) as error:
      raise ValueError(
        "factor_dims rules must be (regex, (row_axis, col_axis) or None) "
        f"pairs; {rule!r} is not: {error}"
      ) from None

  def by_rules(path: str, shape: tuple[int, ...]) -> FactorDims:
    for pattern, dims in rules:
      if pattern.search(path):
        return dims
    return default_factor_dims(shape, min_dim_size_to_factor)

  return by_rules


def _factored_axes(moment: FactoredMoment) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(row axes, column axes) read from the statistics' shapes.

  A factored axis of size 1 reads as neither; that is harmless, since
  averaging over a size-1 axis changes nothing.
  """
  shape = np.broadcast_shapes(moment.v_row.shape, moment.v_col.shape)
  rows = tuple(i for i, n in enumerate(moment.v_col.shape) if n == 1 != shape[i])
  cols = tuple(i for i, n in enumerate(moment.v_row.shape) if n == 1 != shape[i])
  return rows, cols


def _parameter_shape(moment) -> jax.ShapeDtypeStruct:
  if isinstance(moment, FactoredMoment):
    shape = np.broadcast_shapes(moment.v_row.shape, moment.v_col.shape)
  else:
    shape = moment.shape
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _is_moment(x) -> bool:
  return isinstance(x, FactoredMoment)


def factored_update(
  grad: jax.Array,
  moment: FactoredMoment | jax.Array,
  beta2: jax.Array,
  epsilon1: jax.typing.ArrayLike,
) -> tuple[jax.Array, FactoredMoment | jax.Array]:
  """One parameter's step: (G / sqrt(V̂), new statistics), in float32.

  The statistics are updated with :math:`\\hat\\beta_2` = ``beta2``, and the
  update is returned in float32; the caller casts it.
  """
  grad = grad.astype(jnp.float32)
  grad_sq = jnp.square(grad) + epsilon1
  if isinstance(moment, FactoredMoment):
    rows, cols = _factored_axes(moment)
    v_row = beta2 * moment.v_row + (1 - beta2) * jnp.mean(grad_sq, cols, keepdims=True)
    v_col = beta2 * moment.v_col + (1 - beta2) * jnp.mean(grad_sq, rows, keepdims=True)
    # V̂ = R C / mean(R), taken as two rsqrt factors so that R * C cannot underflow.
    row_ratio = v_row / jnp.mean(v_row, rows, keepdims=True)
    row_factor = jax.lax.rsqrt(jnp.maximum(row_ratio, _TINY))
    update = grad * row_factor * jax.lax.rsqrt(v_col)
    return update, FactoredMoment(v_row, v_col)
  v = beta2 * moment + (1 - beta2) * grad_sq
  return grad * jax.lax.rsqrt(v), v


def scale_by_factored_rms(
  decay_rate: float = 0.8,
  decay_offset: int = 0,
  beta2_cap: float | None = None,
  epsilon1: float = 1e-30,
  factored: bool = True,
  min_dim_size_to_factor: int = 128,
  factor_dims: FactorDimsFn | FactorRules | None = None,
) -> optax.GradientTransformation:
  r"""Scales updates by a factored estimate of the gradient's RMS (Adafactor).

  For a parameter factored over a row axis and a column axis (Algorithm 4),
  with the other axes batch axes that keep statistics of their own:

  .. math::
    R_t &= \hat\beta_{2t} R_{t-1} + (1-\hat\beta_{2t})\,
           \mathrm{mean}_{\text{col}}(G_t^2 + \epsilon_1) \\
    C_t &= \hat\beta_{2t} C_{t-1} + (1-\hat\beta_{2t})\,
           \mathrm{mean}_{\text{row}}(G_t^2 + \epsilon_1) \\
    \hat V_t &= R_t C_t / \mathrm{mean}_{\text{row}}(R_t), \qquad
    U_t = G_t / \sqrt{\hat V_t}.

  Otherwise (Algorithm 5) :math:`\hat V_t = \hat\beta_{2t}\hat V_{t-1} +
  (1-\hat\beta_{2t})(G_t^2+\epsilon_1)`. The decay
  :math:`\hat\beta_{2t}` is :func:`adafactor_jax.schedules.decay_rate_pow`.
  Statistics are float32 whatever the parameter dtype; the update has the
  gradient's dtype. The state of an :math:`n\times m` matrix holds
  :math:`n + m` numbers.

  The choice of factored axes is made once, by ``init``, and recorded in the
  state's shapes (see :class:`FactoredMoment`); ``update`` reads it from there.

  Args:
    decay_rate: the exponent :math:`c > 0` of :math:`1 - t^{-c}` (paper: 0.8).
    decay_offset: steps >= 0 after which the decay schedule restarts
      (fine-tuning); before that :math:`\hat\beta_{2t} = 0`.
    beta2_cap: optional upper bound in (0, 1] on :math:`\hat\beta_{2t}` (Big
      Vision: 0.999).
    epsilon1: :math:`\epsilon_1 > 0`, added to :math:`G^2` (paper: 1e-30).
    factored: if False, keep a full second moment for every parameter.
    min_dim_size_to_factor: factor a parameter only when its second largest
      dimension is at least this (>= 1); used by the default choice.
    factor_dims: overrides the choice per parameter: a callable
      ``(path, shape) -> (row_axis, col_axis) | None``, or a sequence of
      ``(regex, (row_axis, col_axis) | None)`` rules matched with ``re.search``
      against the '/'-joined parameter path, the first match deciding and
      unmatched parameters taking the default (:func:`default_factor_dims`).

  Returns:
    An `optax.GradientTransformation`.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  schedules.check_decay_args(decay_rate, decay_offset, beta2_cap)
  _checks.check_scalar("epsilon1", epsilon1, low=0.0, low_open=True)
  _checks.check_bool("factored", factored)
  _checks.check_scalar("min_dim_size_to_factor", min_dim_size_to_factor, low=1, integer=True)
  if factor_dims is not None and not callable(factor_dims):
    if isinstance(factor_dims, (str, bytes)) or not isinstance(factor_dims, Sequence):
      raise ValueError(
        "factor_dims must be a callable (path, shape) -> dims, a sequence of "
        f"(regex, dims) rules, or None; got {factor_dims!r}."
      )
  beta2_schedule = schedules.decay_rate_pow(decay_rate, decay_offset, beta2_cap)

  def init_fn(params):
    min_dim = _checks.concrete_value(min_dim_size_to_factor)
    if min_dim is None:
      raise ValueError(
        "min_dim_size_to_factor is traced, so init cannot choose the factored "
        "axes. Call init outside jax.jit, or with optax.inject_hyperparams "
        "pass static_args=('min_dim_size_to_factor',)."
      )
    choose = _factor_dims_fn(factored, int(min_dim), factor_dims)

    def init_one(path, param):
      shape = tuple(np.shape(param))
      name = _checks.path_name(path)
      dims = _normalize_dims(choose(name, shape), name, shape)
      if dims is None:
        return jnp.zeros(shape, jnp.float32)
      row, col = dims
      row_shape = tuple(1 if i == col else n for i, n in enumerate(shape))
      col_shape = tuple(1 if i == row else n for i, n in enumerate(shape))
      return FactoredMoment(jnp.zeros(row_shape, jnp.float32), jnp.zeros(col_shape, jnp.float32))

    nu = jax.tree_util.tree_map_with_path(init_one, params)
    return ScaleByFactoredRmsState(count=jnp.zeros([], jnp.int32), nu=nu)

  def update_fn(updates, state, params=None):
    del params
    _checks.check_tree_matches(
      updates, jax.tree.map(_parameter_shape, state.nu, is_leaf=_is_moment)
    )
    beta2 = beta2_schedule(state.count)
    treedef = jax.tree.structure(updates)
    new_updates, new_nu = [], []
    for grad, moment in zip(
      treedef.flatten_up_to(updates), treedef.flatten_up_to(state.nu), strict=True
    ):
      update, moment = factored_update(grad, moment, beta2, epsilon1)
      new_updates.append(update.astype(grad.dtype))
      new_nu.append(moment)
    return treedef.unflatten(new_updates), ScaleByFactoredRmsState(
      optax.safe_increment(state.count), treedef.unflatten(new_nu)
    )

  return optax.GradientTransformation(init_fn, update_fn)
