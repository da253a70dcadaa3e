"""The factored second-moment estimate of Adafactor (Algorithms 4 and 5)."""

from __future__ import annotations

import functools
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax import _checks, _probe, _telemetry, schedules


class FactorAxes(NamedTuple):
  """One parameter's axes by their role in the statistics, clipping and scale.

  ``row`` and ``col`` are the axes of the factored second moment: :math:`R`
  keeps the row axes and averages over the column axes, :math:`C` the
  converse (a (d_in, d_out) weight: ``row=(0,), col=(1,)``). Several axes may
  share a role (an attention kernel (embed, heads, head_dim): ``row=(0,),
  col=(1, 2)``). Both empty means a full second moment.

  ``batch`` axes index independent parameters stored in one array (scanned
  layers, experts): each slice gets statistics of its own, its own update
  RMS clipping and its own parameter scale. Any other axis keeps a statistic
  per element and is averaged over by clipping and the parameter scale.
  """

  row: tuple[int, ...] = ()
  col: tuple[int, ...] = ()
  batch: tuple[int, ...] = ()


FactorDims = Optional[Union[tuple[int, int], FactorAxes]]  # noqa: UP007, UP045 (runtime alias)
"""(row_axis, col_axis), a :class:`FactorAxes`, or None for a full second moment."""

FactorDimsFn = Callable[[str, tuple[int, ...]], FactorDims]
"""Chooses the factored axes from a parameter's path ('a/b/kernel') and shape."""

FactorRules = Sequence[tuple[str, FactorDims]]
"""(regex, dims) pairs: the first regex found in a parameter's path decides."""

# The smallest normal float32: the row/mean(row) ratio is clamped to it so that
# an all-zero row next to huge ones cannot underflow to 0 and give 0 * inf.
TINY = float(np.finfo(np.float32).tiny)


# The ceiling of the statistics: 2^126, the largest power of two whose
# reciprocal is a normal float32 (XLA divides as x * (1/y), and flushes
# subnormals to zero on CPU, so x / 2^127 would be 0).
_CEILING = 2.0**126


def saturate(x: jax.Array) -> jax.Array:
  """x, or 2^126 (8.5e37) where x is larger (inf included).

  For statistics of G² reduced in float32: a finite |G| > 1.8e19 squares to
  inf, n squares of |G| > 1.8e19/sqrt(n) sum to inf, and V̂ = inf would give
  inf/inf.
  Saturated, the statistics and the update stay finite (the update of such a
  parameter is then no longer the exact algorithm's). Factored, it is applied
  after the reductions, not to G²: any op between G and its square makes XLA
  store G² in a parameter-sized temporary. Unfactored, G² is reduced nowhere,
  and is saturated itself.
  """
  return jnp.minimum(x, _CEILING)


def widen(x: jax.Array) -> jax.Array:
  """x in float32, or complex64 if it is complex: the precision of every step."""
  return x.astype(jnp.complex64 if jnp.iscomplexobj(x) else jnp.float32)


def abs_square(x: jax.Array) -> jax.Array:
  """|x|² in float32: x² for real x, Re(conj(x) x) for complex x (as optax).

  (For complex x, XLA:CPU's reductions take |x|² as a float32 array; from
  Re(x)² + Im(x)² they would take Re(x) and Im(x), twice the bytes.)
  """
  if jnp.iscomplexobj(x):
    return (x.conj() * x).real.astype(jnp.float32)
  return jnp.square(x.astype(jnp.float32))


def _mean(x: jax.Array, axes: Sequence[int]) -> jax.Array:
  """The mean over ``axes``, kept as size-1 axes, as a sum of x/n, for the
  small reduced statistics: the sum of n of them near the ceiling overflows.
  (Not for parameter-sized reductions: there XLA stores the x/n it sums.)"""
  n = int(np.prod([jnp.shape(x)[a] for a in axes]))
  return jnp.sum(x * (1.0 / max(n, 1)), axes, keepdims=True)


class ScaleByFactoredRmsState(NamedTuple):
  r"""State of :func:`scale_by_factored_rms`.

  ``v_row``, ``v_col`` and ``v`` each have the parameters' tree structure. A
  factored parameter has float32 arrays in ``v_row`` (:math:`R_t`, the mean of
  :math:`G^2 + \epsilon_1` over the column axis) and ``v_col`` (:math:`C_t`, the
  mean over the row axis) and None in ``v``; any other parameter has None in
  both and its full float32 second moment in ``v``. None is no leaf at all: no
  bytes, no placeholder arrays. ``v_row`` and ``v_col`` keep the parameter's
  rank, with size 1 on the axis they average over (an n x m weight: (n, 1) and
  (1, m)), so which axes are factored is read from the state's shapes and an
  update never needs the hyperparameters that chose them.

  Because of those None, ``optax.tree.map_params(tx, f, state, specs, ...)``
  needs ``is_leaf=lambda x: x is None`` (f then sees None where a statistic
  does not apply).
  """

  # int32, the number of updates so far. (The name shadows tuple.count, as in
  # optax's states.)
  count: jax.Array  # type: ignore[assignment]
  v_row: optax.Updates
  v_col: optax.Updates
  v: optax.Updates


DEFAULT_MIN_DIM_SIZE_TO_FACTOR = 128
"""The least second-largest dimension of a factored parameter, by default (as optax)."""


def default_factor_dims(
  shape: Sequence[int], *, min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR
) -> tuple[int, int] | None:
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


def _normalize_dims(dims: Any, path: str, shape: tuple[int, ...]) -> FactorAxes | None:
  """`dims` (what a user's choice returned) as a FactorAxes of non-negative,
  sorted axes; None for no choice."""
  if dims is None:
    return None
  rank = len(shape)
  row: tuple[int, ...]
  col: tuple[int, ...]
  batch: tuple[int, ...] = ()
  try:
    if isinstance(dims, FactorAxes):
      row, col, batch = (tuple(map(operator.index, axes)) for axes in dims)
    else:
      row, col = ((operator.index(axis),) for axis in dims)
  except (TypeError, ValueError):
    raise ValueError(
      f"The factored axes for parameter '{path}' must be a pair of ints "
      f"(row_axis, col_axis), a FactorAxes of int tuples, or None; got {dims!r}."
    ) from None
  axes = row + col + batch
  if any(not -rank <= axis < rank for axis in axes) or len({a % rank for a in axes}) < len(axes):
    raise ValueError(
      f"The factored axes {dims!r} for parameter '{path}' of shape {shape} "
      f"must be {'' if isinstance(dims, FactorAxes) else 'two '}different axes of it."
    )
  if bool(row) != bool(col):
    raise ValueError(
      f"The factored axes {dims!r} for parameter '{path}' need row and column "
      "axes both, or neither for a full second moment."
    )
  return FactorAxes(*(tuple(sorted(a % rank for a in part)) for part in (row, col, batch)))


UserChoice = Callable[[str, tuple[int, ...]], Any]
"""A FactorDimsFn, or rules as one function that answers _DEFAULT where none matches."""


def choice_fn(factor_dims: FactorDimsFn | FactorRules | None) -> UserChoice | None:
  """The user's choice as one function (path, shape) -> dims or _DEFAULT."""
  if factor_dims is None or callable(factor_dims):
    return factor_dims
  if isinstance(factor_dims, (str, bytes)) or not isinstance(factor_dims, Sequence):
    raise ValueError(
      "factor_dims must be a callable (path, shape) -> dims, a sequence of "
      f"(regex, dims) rules, or None; got {factor_dims!r}."
    )
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

  def by_rules(path: str, shape: tuple[int, ...]) -> Any:
    for pattern, dims in rules:
      if pattern.search(path):
        return dims
    return _DEFAULT

  return by_rules


_DEFAULT = object()  # A rule's answer for "no rule matched: use the default".


def slice_axes_of(
  user_choice: UserChoice | None, name: str, shape: Sequence[int]
) -> tuple[int, ...]:
  """The axes that clipping and the parameter scale average over, for a param.

  All axes but the batch axes that the user's choice declares (see
  :class:`FactorAxes`): each slice along those is its own parameter.
  """
  shape = tuple(shape)
  choice = None if user_choice is None else user_choice(name, shape)
  dims = None if choice is _DEFAULT else _normalize_dims(choice, name, shape)
  batch = () if dims is None else dims.batch
  return tuple(axis for axis in range(len(shape)) if axis not in batch)


class _Statistics:
  """One parameter's (v_row, v_col, v), opaque to pytree functions."""

  __slots__ = ("arrays",)

  def __init__(self, *arrays: jax.Array | None) -> None:
    self.arrays = arrays

  def __getitem__(self, i: int) -> jax.Array | None:
    return self.arrays[i]


def factored_axes(v_row: jax.Array, v_col: jax.Array) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(row axes, column axes) read from the statistics' shapes.

  A factored axis of size 1 reads as neither; that is harmless, since
  averaging over a size-1 axis changes nothing.
  """
  shape = np.broadcast_shapes(v_row.shape, v_col.shape)
  rows = tuple(i for i, n in enumerate(v_col.shape) if n == 1 != shape[i])
  cols = tuple(i for i, n in enumerate(v_row.shape) if n == 1 != shape[i])
  return rows, cols


def _saturating_cast(x: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """x in dtype, saturating at its largest finite value rather than overflowing.

  G/sqrt(V̂) can exceed float16's range before clipping brings it back; as inf it
  would make clipping compute inf/inf. (Complex x is complex64, the narrowest
  complex dtype: its cast only widens.)
  """
  if jnp.dtype(dtype) == x.dtype:
    return x
  if jnp.iscomplexobj(x):
    return x.astype(dtype)
  largest = float(jnp.finfo(dtype).max)
  return jnp.clip(x, -largest, largest).astype(dtype)


class _Preconditioned(NamedTuple):
  r"""One parameter's step of :func:`_precondition`.

  :math:`U = G / \sqrt{\hat V}` is ``grad * factors[0] * factors[1]`` in
  float32 (complex64 for a complex G), left unevaluated so that each consumer
  fuses it into its own loop.
  """

  v_row: jax.Array | None
  v_col: jax.Array | None
  v: jax.Array | None
  factors: tuple[jax.Array, jax.Array]
  mean_square: jax.Array | None  # mean(U²) over the asked axes, kept as size 1.


def _precondition(
  grad: jax.Array,
  v_row: jax.Array | None,
  v_col: jax.Array | None,
  v: jax.Array | None,
  beta2: jax.Array,
  epsilon1: float,
  *,
  mean_square_axes: tuple[int, ...] | None,
) -> _Preconditioned:
  """One parameter's new statistics and the factors of G / sqrt(V̂).

  Factored when ``v`` is None, with ``v_row`` and ``v_col`` as in
  :class:`ScaleByFactoredRmsState`; otherwise ``v`` is the full second moment.
  Unless ``mean_square_axes`` is None, also mean(U²) over those axes, for
  update clipping.

  Two formulations of the same arithmetic, chosen by the platform the step is
  compiled for, since each compiler turns the other's into more memory
  traffic: :func:`_precondition_for_cpu` on XLA:CPU, :func:`_precondition_plain`
  elsewhere (the TPU compiler: 24 bytes per float32 parameter for the whole
  Adafactor step on v5p, where the CPU formulation costs 36 and a
  parameter-sized temporary).
  """

  def formulation(precondition: Callable[..., _Preconditioned]) -> Callable[..., _Preconditioned]:
    return functools.partial(precondition, epsilon1=epsilon1, mean_square_axes=mean_square_axes)

  return jax.lax.platform_dependent(
    grad,
    v_row,
    v_col,
    v,
    beta2,
    cpu=formulation(_precondition_for_cpu),
    default=formulation(_precondition_plain),
  )


def _precondition_plain(
  grad: jax.Array,
  v_row: jax.Array | None,
  v_col: jax.Array | None,
  v: jax.Array | None,
  beta2: jax.Array,
  *,
  epsilon1: float,
  mean_square_axes: tuple[int, ...] | None,
) -> _Preconditioned:
  """:func:`_precondition` as the TPU compiler compiles it best: the algorithm
  as written. Its fusions read G once for both factored statistics (a
  multi-output reduction) and once for mean(U²), and store nothing
  parameter-sized; the CPU formulation's barriers and stacked row means would
  make it store G² and read G once more.
  """
  if v is not None:
    v = beta2 * v + (1 - beta2) * (saturate(abs_square(grad)) + epsilon1)
    factor = jax.lax.rsqrt(v)
    msq = None
    if mean_square_axes is not None:
      # (G / sqrt(v))², not G² / v: G² overflows first.
      msq = saturate(jnp.mean(abs_square(widen(grad) * factor), mean_square_axes, keepdims=True))
    return _Preconditioned(None, None, v, (factor, jnp.ones([], jnp.float32)), msq)

  assert v_row is not None and v_col is not None  # factored: both, by construction
  rows, cols = factored_axes(v_row, v_col)
  g_squared = abs_square(grad)
  col_mean = jnp.mean(g_squared, rows, keepdims=True)
  row_mean = jnp.mean(g_squared, cols, keepdims=True)
  v_col = saturate(beta2 * v_col + (1 - beta2) * (col_mean + epsilon1))
  v_row = saturate(beta2 * v_row + (1 - beta2) * (row_mean + epsilon1))
  col_factor = jax.lax.rsqrt(v_col)
  # V̂ = R C / mean(R), taken as two rsqrt factors so that R * C cannot underflow.
  row_factor = jax.lax.rsqrt(jnp.maximum(v_row / _mean(v_row, rows), TINY))
  msq = None
  if mean_square_axes is not None:
    u = widen(grad) * row_factor * col_factor
    msq = saturate(jnp.mean(abs_square(u), mean_square_axes, keepdims=True))
  return _Preconditioned(v_row, v_col, None, (row_factor, col_factor), msq)


def _precondition_for_cpu(
  grad: jax.Array,
  v_row: jax.Array | None,
  v_col: jax.Array | None,
  v: jax.Array | None,
  beta2: jax.Array,
  *,
  epsilon1: float,
  mean_square_axes: tuple[int, ...] | None,
) -> _Preconditioned:
  """:func:`_precondition` as XLA:CPU compiles it best.

  Written for memory traffic, the cost of this step: XLA:CPU fuses a reduction
  with the elementwise work that feeds it, but when two reductions share G² it
  stores G² in a parameter-sized temporary. So each reduction reads its own
  copy of G behind an optimization barrier, and mean(U²) = Σ_i r_i² Σ_j G_ij² c_j²
  shares one pass with the row statistics, computed after the column ones.
  For complex G, G² is |G|² (as optax); the real path is unchanged by that.
  """
  if v is not None:
    v = beta2 * v + (1 - beta2) * (saturate(abs_square(grad)) + epsilon1)
    factor = jax.lax.rsqrt(v)
    msq = None
    if mean_square_axes is not None:
      g_msq, v_msq = jax.lax.optimization_barrier((grad, v))
      # (G / sqrt(v))², not G² / v: G² overflows first.
      u_msq = widen(g_msq) * jax.lax.rsqrt(v_msq)
      msq = saturate(jnp.mean(abs_square(u_msq), mean_square_axes, keepdims=True))
    return _Preconditioned(None, None, v, (factor, jnp.ones([], jnp.float32)), msq)

  assert v_row is not None and v_col is not None  # factored: both, by construction
  rows, cols = factored_axes(v_row, v_col)
  g_rows, g_cols = jax.lax.optimization_barrier((grad, grad))
  col_mean = jnp.mean(abs_square(g_cols), rows, keepdims=True)
  v_col = saturate(beta2 * v_col + (1 - beta2) * (col_mean + epsilon1))
  col_factor = jax.lax.rsqrt(v_col)
  g_rows = abs_square(g_rows)
  if mean_square_axes is not None:
    # Row means of G² and of G² c² in one pass, along a trailing axis of size 2
    # (a leading one measured 3-7% slower on XLA:CPU).
    weights = jnp.stack([jnp.ones_like(v_col), jnp.square(col_factor)], -1)
    row_means = jnp.mean(g_rows[..., None] * weights, cols, keepdims=True)
    row_mean, weighted_row_mean = row_means[..., 0], row_means[..., 1]
  else:
    row_mean = jnp.mean(g_rows, cols, keepdims=True)
  v_row = saturate(beta2 * v_row + (1 - beta2) * (row_mean + epsilon1))
  # V̂ = R C / mean(R), taken as two rsqrt factors so that R * C cannot underflow.
  row_ratio = v_row / _mean(v_row, rows)
  row_factor = jax.lax.rsqrt(jnp.maximum(row_ratio, TINY))
  msq = None
  if mean_square_axes is not None:
    msq = saturate(_mean(jnp.square(row_factor) * weighted_row_mean, mean_square_axes))
  return _Preconditioned(v_row, v_col, None, (row_factor, col_factor), msq)


def scale_by_factored_rms(
  decay_rate: float = 0.8,
  *,
  decay_offset: int = 0,
  beta2_cap: float | None = None,
  epsilon1: float = 1e-30,
  factored: bool = True,
  min_dim_size_to_factor: int | None = None,
  factor_dims: FactorDimsFn | FactorRules | None = None,
  clipping_threshold: float | None = None,
  telemetry: bool = False,
) -> optax.GradientTransformationExtraArgs:
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
  gradient's dtype (saturating at its largest finite value). For complex
  gradients :math:`G^2` is :math:`|G|^2` (as optax), and the update is complex.
  The state of an :math:`n\times m` matrix holds :math:`n + m` numbers.

  The choice of factored axes is made once, by ``init``, and recorded in the
  state (see :class:`ScaleByFactoredRmsState`); ``update`` reads it from there.

  With ``clipping_threshold`` :math:`d`, the update is also clipped,
  :math:`U_t / \max(1, \mathrm{RMS}(U_t)/d)`: the same as chaining
  :func:`adafactor_jax.clip_by_update_rms`, but :math:`\mathrm{RMS}(U_t)` comes
  from the pass over :math:`G_t` that computes :math:`R_t`, so :math:`U_t` is
  never stored. Under ``jax.jit`` the whole step then reads :math:`G_t` three
  times and needs no parameter-sized temporary; chained, XLA stores
  :math:`U_t` because both the RMS and the division read it.

  Args:
    decay_rate: the exponent :math:`c > 0` of :math:`1 - t^{-c}` (paper: 0.8).
    decay_offset: steps >= 0 after which the decay schedule restarts
      (fine-tuning); before that :math:`\hat\beta_{2t} = 0`.
    beta2_cap: optional upper bound in (0, 1] on :math:`\hat\beta_{2t}` (Big
      Vision: 0.999).
    epsilon1: :math:`\epsilon_1 > 0`, added to :math:`G^2` (paper: 1e-30).
    factored: if False, keep a full second moment for every parameter.
    min_dim_size_to_factor: factor a parameter only when its second largest
      dimension is at least this (>= 1); used by the default choice. None
      (the default) means 128, and stays static under
      ``optax.inject_hyperparams``, so that ``jax.jit(tx.init)`` works.
    factor_dims: overrides the choice per parameter: a callable
      ``(path, shape) -> (row_axis, col_axis) | None``, or a sequence of
      ``(regex, (row_axis, col_axis) | None)`` rules matched with ``re.search``
      against the '/'-joined parameter path, the first match deciding and
      unmatched parameters taking the default (:func:`default_factor_dims`).
    clipping_threshold: :math:`d > 0` to clip the update by its RMS (paper:
      1.0, the default of :func:`adafactor_jax.adafactor`), or None not to.
    telemetry: if True, the state also records :math:`\hat\beta_{2t}` and, per
      parameter (per slice along batch axes), :math:`\mathrm{RMS}(U_t)` before
      clipping and, with clipping, :math:`\max(1, \mathrm{RMS}(U_t)/d)`: the
      state is then a :class:`adafactor_jax.TelemetryState` around the
      :class:`ScaleByFactoredRmsState`; read it with
      :func:`adafactor_jax.telemetry`. :math:`\mathrm{RMS}(U_t)` is the one
      clipping uses, from the pass that computes :math:`R_t` (without
      clipping, that pass computes it all the same; a parameter with a full
      second moment is read once more). If False, neither state nor step
      changes.

  Returns:
    An `optax.GradientTransformationExtraArgs`. (Its only extra argument is the
    private probe of :func:`adafactor_jax.warm_start_state`.)

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018.
  """
  schedules.check_decay_args(decay_rate, decay_offset=decay_offset, beta2_cap=beta2_cap)
  _checks.check_scalar("epsilon1", epsilon1, low=0.0, low_open=True)
  _checks.check_bool("factored", factored)
  _checks.check_scalar(
    "min_dim_size_to_factor", min_dim_size_to_factor, low=1, integer=True, allow_none=True
  )
  _checks.check_scalar(
    "clipping_threshold",
    clipping_threshold,
    low=0.0,
    low_open=True,
    allow_none=True,
    hint="Pass None to turn clipping off.",
  )
  _checks.check_bool("telemetry", telemetry)
  user_choice = choice_fn(factor_dims)
  beta2_schedule = schedules.decay_rate_pow(
    decay_rate, decay_offset=decay_offset, beta2_cap=beta2_cap
  )

  def choose(name: str, shape: tuple[int, ...], min_dim: int) -> FactorAxes | None:
    choice = _DEFAULT if user_choice is None else user_choice(name, shape)
    if choice is _DEFAULT:
      choice = default_factor_dims(shape, min_dim_size_to_factor=min_dim)
    dims = _normalize_dims(choice, name, shape)
    if dims is not None and not factored:
      return dims._replace(row=(), col=())
    return dims

  figure_names: tuple[str, ...] = (_telemetry.RMS_UPDATE,)
  if clipping_threshold is not None:
    figure_names += (_telemetry.CLIPPING_DENOMINATOR,)

  def slice_axes(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return slice_axes_of(user_choice, name, shape)

  def init_fn(params: optax.Params) -> ScaleByFactoredRmsState | _telemetry.TelemetryState:
    if min_dim_size_to_factor is None:
      min_dim = DEFAULT_MIN_DIM_SIZE_TO_FACTOR
    else:
      concrete = _checks.concrete_value(min_dim_size_to_factor)
      if concrete is None:
        raise ValueError(
          "min_dim_size_to_factor is traced, so init cannot choose the factored "
          "axes. Leave it out (its default, None for 128, stays static), call "
          "init outside jax.jit, or with optax.inject_hyperparams pass "
          "static_args=('min_dim_size_to_factor',)."
        )
      min_dim = int(concrete)

    def statistics(path: jax.tree_util.KeyPath, param: Any) -> _Statistics:
      dims = choose(_checks.path_name(path), tuple(np.shape(param)), min_dim)
      if dims is None or not dims.row:
        return _Statistics(None, None, _checks.zeros_like_param(param))
      return _Statistics(
        _checks.zeros_like_param(param, reduced_axes=dims.col),
        _checks.zeros_like_param(param, reduced_axes=dims.row),
        None,
      )

    # Each parameter's statistics are wrapped in an object that pytrees treat
    # as a leaf, so that they line up with the params whatever containers
    # (tuples, MaskedNode) the tree holds.
    per_param = jax.tree_util.tree_map_with_path(statistics, params)
    state = ScaleByFactoredRmsState(
      jnp.zeros([], jnp.int32),
      *(jax.tree.map(lambda s, i=i: s[i], per_param) for i in range(3)),
    )
    if not telemetry:
      return state
    per_parameter = {
      name: _telemetry.initial_figures(name, params, slice_axes) for name in figure_names
    }
    return _telemetry.TelemetryState(
      state, _telemetry.scalar_zeros(_telemetry.BETA2), per_parameter
    )

  def update_fn(
    updates: optax.Updates,
    state: ScaleByFactoredRmsState | _telemetry.TelemetryState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, ScaleByFactoredRmsState | _telemetry.TelemetryState]:
    if isinstance(state, ScaleByFactoredRmsState):
      new_updates, new_state, _ = step(updates, state, params, extra_args)
      return new_updates, new_state
    new_updates, new_state, figures = step(updates, state.inner_state, params, extra_args)
    per_step = {_telemetry.BETA2: figures.pop(_telemetry.BETA2)}
    per_parameter = {
      name: _telemetry.packed(figures[name], like) for name, like in state.per_parameter.items()
    }
    return new_updates, _telemetry.TelemetryState(new_state, per_step, per_parameter)

  def step(
    updates: optax.Updates,
    state: ScaleByFactoredRmsState,
    params: optax.Params | None,
    extra_args: dict[str, Any],
  ) -> tuple[optax.Updates, ScaleByFactoredRmsState, dict[str, Any]]:
    """The update, and with telemetry its figures (else an empty dict): beta2, and
    per name a list of each parameter's values per slice."""
    probe = _probe.find(extra_args)

    def parameter_shape(
      v_row: jax.Array | None, v_col: jax.Array | None, v: jax.Array | None
    ) -> jax.ShapeDtypeStruct | None:
      if v is not None:
        return jax.ShapeDtypeStruct(v.shape, v.dtype)
      if v_row is not None and v_col is not None:
        return jax.ShapeDtypeStruct(np.broadcast_shapes(v_row.shape, v_col.shape), v_row.dtype)
      return None  # A None parameter.

    parameter_shapes = jax.tree.map(
      parameter_shape, state.v_row, state.v_col, state.v, is_leaf=lambda x: x is None
    )
    if params is not None:  # the gradient against the parameters first, then the state
      _checks.check_tree_matches(updates, params)
    _checks.check_tree_matches(updates, parameter_shapes, reference_is_state=True)
    treedef: Any = jax.tree.structure(updates)  # jaxlib has no type stub for PyTreeDef
    grads = treedef.flatten_up_to(updates)
    v_rows, v_cols, vs = (
      treedef.flatten_up_to(tree) for tree in (state.v_row, state.v_col, state.v)
    )
    beta2 = beta2_schedule(state.count)
    if probe is not None:
      # warm_start_state: precondition with the statistics as they are, plus
      # the epsilon1 every step adds (so that a zero statistic sends 0 to 0).
      probe.statistics += 1
      beta2 = jnp.ones_like(beta2)
      v_rows, v_cols, vs = (
        [None if x is None else x + epsilon1 for x in xs] for xs in (v_rows, v_cols, vs)
      )
    msq_axes: list[tuple[int, ...] | None] = [None] * len(grads)
    if clipping_threshold is not None or telemetry:
      msq_axes = [
        slice_axes(_checks.path_name(path), jnp.shape(g))
        for path, g in jax.tree_util.tree_leaves_with_path(updates)
      ]
    outputs = [
      _precondition(g, r, c, v, beta2, epsilon1, mean_square_axes=axes)
      for g, r, c, v, axes in zip(grads, v_rows, v_cols, vs, msq_axes, strict=True)
    ]
    rms = [None if out.mean_square is None else jnp.sqrt(out.mean_square) for out in outputs]
    denominators = [
      None if r is None or clipping_threshold is None else jnp.maximum(1.0, r / clipping_threshold)
      for r in rms
    ]

    def scaled(grad: jax.Array, out: _Preconditioned, denominator: jax.Array | None) -> jax.Array:
      row_factor, col_factor = out.factors
      if denominator is not None:
        # Folded into a small factor: no extra multiply per element.
        col_factor = col_factor / denominator
      return _saturating_cast(widen(grad) * row_factor * col_factor, grad.dtype)

    applied = denominators
    deferral = _probe.find_deferred_clipping(extra_args)
    if deferral is not None and clipping_threshold is not None:
      # adafactor's int8 momentum divides by them (_probe.DeferredClipping).
      deferral.denominators, applied = denominators, [None] * len(denominators)
    new_updates = [scaled(g, out, d) for g, out, d in zip(grads, outputs, applied, strict=True)]
    v_row, v_col, v = (
      treedef.unflatten([getattr(out, name) for out in outputs]) for name in ("v_row", "v_col", "v")
    )
    figures: dict[str, Any] = {}
    if telemetry:
      figures[_telemetry.BETA2] = beta2.astype(jnp.float32)
      figures[_telemetry.RMS_UPDATE] = rms
      figures[_telemetry.CLIPPING_DENOMINATOR] = denominators
    new_state = ScaleByFactoredRmsState(optax.safe_increment(state.count), v_row, v_col, v)
    return treedef.unflatten(new_updates), new_state, figures

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
