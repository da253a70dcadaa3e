"""Momentum: an exponential moving average of the updates, stored compactly."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax import _checks, _probe
from adafactor_jax.factored import widen

# A dtype instance, not the jnp.float32 class: optax.inject_hyperparams takes
# every callable argument for a schedule, and the class is callable.
FLOAT32 = np.dtype("float32")
INT8 = np.dtype("int8")

_INT8_MAX = 127.0  # Symmetric: -128 is never used, so that negation is exact.


class EmaMomentumState(NamedTuple):
  """State of :func:`ema_momentum`: one buffer per parameter."""

  momentum: optax.Updates


class Int8MomentumState(NamedTuple):
  """State of :func:`ema_momentum` with ``momentum_dtype=int8``.

  ``momentum`` holds each parameter's int8 values, ``scale`` the float32 step of each
  block's grid, shaped as the parameter with its block axis (:func:`block_axis`) of size
  1. A separate type, so that :class:`EmaMomentumState`, and checkpoints of it, keep
  their structure.
  """

  momentum: optax.Updates
  scale: optax.Updates


def momentum_dtype_or_error(momentum_dtype: Any) -> jnp.dtype:
  """`momentum_dtype` as a floating dtype or int8, or a ValueError naming it."""
  try:
    dtype = jnp.dtype(momentum_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not (jnp.issubdtype(dtype, jnp.floating) or dtype == INT8):
    raise ValueError(
      f"momentum_dtype must be a floating dtype (float32, bfloat16, ...) or int8, got "
      f"{momentum_dtype!r}. Under optax.inject_hyperparams, a dtype passed "
      "explicitly is taken for a schedule: add static_args=('momentum_dtype',)."
    )
  return dtype


def _buffer_dtype(path: jax.tree_util.KeyPath, param: Any, momentum_dtype: jnp.dtype) -> jnp.dtype:
  """``momentum_dtype``, or its complex counterpart for a complex parameter."""
  if not jnp.iscomplexobj(param):
    return momentum_dtype
  if momentum_dtype == INT8 or jnp.finfo(momentum_dtype).bits < 32:
    raise ValueError(
      f"momentum_dtype {momentum_dtype.name} has no complex counterpart, for the complex "
      f"parameter '{_checks.path_name(path)}': pass momentum_dtype=float32 (a complex64 "
      "buffer)."
    )
  return jnp.promote_types(momentum_dtype, jnp.complex64)


def block_axis(shape: tuple[int, ...]) -> int | None:
  """The axis along which int8 momentum's blocks run: the parameter's longest (the
  later one on a tie, as for factoring), so that the float32 scales add at most
  4 / 128 bytes per element wherever an axis has 128 elements or more. ``None``
  for a scalar, its own block."""
  if not shape:
    return None
  return max(range(len(shape)), key=lambda axis: (shape[axis], axis))


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of a parameter's int8 block scales: its own with the block axis
  of size 1, so that they broadcast against it and are sharded like it."""
  axis = block_axis(shape)
  return tuple(1 if i == axis else n for i, n in enumerate(shape))


def _zero_scales(param: Any) -> jax.Array:
  """Zero scales for ``param``, made from it so that they follow its sharding."""
  axis = block_axis(jnp.shape(param))
  return _checks.zeros_like_param(param, reduced_axes=() if axis is None else (axis,))


def _absmax(x: jax.Array) -> jax.Array:
  """max |x| over each block of float32 ``x``, shaped as the scales (NaN if
  any is NaN).

  On XLA:CPU taken on the bits as int32 (non-negative floats order as their
  bits): a float max-reduction goes to XLA:CPU's YNNPACK fusion, which does not
  fuse the elementwise work that produces ``x`` and so stores it, a
  parameter-sized float32 temporary; an integer one is an ordinary loop. The
  TPU compiler fuses a float maximum into the pass beside the clipping's sum of
  squares (:func:`chord_bound`), which it does not for the integer one.
  """
  axis = block_axis(jnp.shape(x))
  if axis is None:
    return jnp.abs(x)
  return jax.lax.platform_dependent(
    x,
    cpu=functools.partial(_max_of_bits, axis=axis),
    default=lambda x: jnp.max(jnp.abs(x), axis, keepdims=True),
  )


def _max_of_bits(x: jax.Array, *, axis: int) -> jax.Array:
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & 0x7FFFFFFF
  return jax.lax.bitcast_convert_type(_max_in_chunks(bits, axis=axis), jnp.float32)


def _max_in_chunks(bits: jax.Array, *, axis: int) -> jax.Array:
  """``jnp.max(bits, axis, keepdims=True)`` for XLA:CPU, which turns a reduction
  over a long axis into a tree of reductions that does not fuse the elementwise
  work producing ``bits`` and so stores it (4 bytes per element, on top of M_t):
  the maxima over chunks of at most 32 along the axis first, behind a barrier,
  then over the chunks (a temporary of at most 2 bytes per element, 1/8 of a
  byte for an axis of a multiple of 32)."""
  n = bits.shape[axis]
  chunk = next((size for size in range(32, 1, -1) if n % size == 0), n)
  if chunk in (1, n):
    return jnp.max(bits, axis, keepdims=True)
  chunked = jnp.reshape(bits, (*bits.shape[:axis], n // chunk, chunk, *bits.shape[axis + 1 :]))
  partial = jax.lax.optimization_barrier(jnp.max(chunked, axis + 1))
  return jnp.max(partial, axis, keepdims=True)


def check_scales(momentum: Any, scale: Any) -> None:
  """Raises ValueError, naming the parameter, for scales not shaped as
  :func:`scale_shape` of their int8 values: a state or checkpoint of another
  block layout (before 2026-12, blocks of 32 along the last axis), which would
  otherwise be misread. At trace time, so free."""
  for (path, q), s in zip(
    jax.tree_util.tree_flatten_with_path(momentum)[0], jax.tree.leaves(scale), strict=True
  ):
    got, expected = tuple(jnp.shape(s)), scale_shape(tuple(jnp.shape(q)))
    if got != expected:
      raise ValueError(
        f"The int8 momentum's scales for parameter '{_checks.path_name(path)}' have shape "
        f"{got}, but int8 momentum stores one per block along the parameter's longest axis, "
        f"shape {expected}: this state was written with another block layout (blocks of 32 "
        "along the last axis, before) and cannot be read; start the momentum anew with "
        "tx.init."
      )


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 values :math:`q \\cdot s` of int8 values and block scales."""
  return q.astype(jnp.float32) * scale


def _quantized_update(
  new: jax.Array, old_q: jax.Array, absmax: jax.Array
) -> tuple[jax.Array, jax.Array]:
  r"""(int8 values, block scales) of float32 ``new``, to replace ``old_q``, on the grid of
  ``absmax``: each block's :math:`\max|x|` (:func:`_absmax`), or an upper bound of it
  (:func:`chord_bound`).

  Per block (along :func:`block_axis`): :math:`s = a / 127` and
  :math:`q = \mathrm{round}(127\,x / a)` (to nearest even), with :math:`a` the block's
  ``absmax``, so that every element is within :math:`s/2` (and with :math:`a = \max|x|`
  the block's largest magnitude is exact).
  An all-zero block has :math:`s = 0` and :math:`q = 0`; a block holding a NaN
  or an Inf gets a NaN or Inf scale, which :func:`dequantize` carries on.

  Plain arithmetic, which the TPU compiler fuses best: with :func:`chord_bound`, the values,
  their scales and the parameter update are one pass.
  """
  # Divided per element: a per-block reciprocal would be one more temporary.
  ratio = new * _INT8_MAX / jnp.where(absmax > 0, absmax, jnp.inf)
  q = jnp.clip(jnp.round(ratio), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  q = jax.lax.platform_dependent(q, old_q, absmax, cpu=_after_old_values, default=lambda q, *_: q)
  return q, absmax * (1 / _INT8_MAX)


def _after_old_values(q: jax.Array, old_q: jax.Array, absmax: jax.Array) -> jax.Array:
  """``q`` made to depend on ``old_q`` (it changes no value: ``absmax >= 0`` unless NaN), so
  that XLA:CPU stores the new values once, in place of the old, instead of recomputing them
  from the overwritten old values inside the parameter update, which needs a copy of them.
  The TPU compiler writes the values and the parameters in one pass without it."""
  return jnp.where(absmax >= 0, q, old_q)


def chord_bound(
  old: jax.Array, unclipped: jax.Array, denominator: jax.Array, decay: float
) -> jax.Array:
  r"""An upper bound of each line's :math:`\max|M_t|` that needs no pass after the
  clipping denominator: the grid of int8 momentum in :func:`adafactor_jax.adafactor`.

  With update clipping, :math:`M_t = \beta_1 M_{t-1} + (1-\beta_1) W_t/\delta` for the
  unclipped update :math:`W_t` and the clipping denominator :math:`\delta \ge 1` (one per
  parameter, or per slice along batch axes). :math:`f(c) = \max_\text{line}|\beta_1
  M_{t-1} + (1-\beta_1)\,c\,W_t|` is convex in :math:`c` (a maximum of absolute values of
  affine functions), so at :math:`c = 1/\delta \in (0, 1]`

  .. math::
    \max_\text{line}|M_t| = f(1/\delta) \le (1 - 1/\delta)\,f(0) + f(1)/\delta,

  and neither :math:`f(0) = \beta_1 \max|M_{t-1}|` nor :math:`f(1)` depends on
  :math:`\delta`: XLA computes them in the pass over :math:`G_t` that computes
  :math:`\delta`, and the step reads :math:`G_t` and the int8 values once less than with
  the exact maximum (on v5p 27 bytes per float32 parameter instead of 33). Exact when
  nothing is clipped (:math:`\delta = 1`); a NumPy simulation (noise-like updates,
  :math:`\beta_1 = 0.9`, lines of 4096) puts it 1%, 8% and 20% above the line's maximum on
  average at :math:`\delta` = 1.1, 2 and 5 (at most 6%, 32%, 56%), a grid that much coarser.
  ``old`` is :math:`M_{t-1}` dequantized, ``decay`` is :math:`\beta_1`.
  """
  inverse = 1.0 / denominator
  decayed = decay * old
  return (1.0 - inverse) * _absmax(decayed) + inverse * _absmax(decayed + (1.0 - decay) * unclipped)


def _int8_step(
  update: jax.Array,
  old_q: jax.Array,
  old_scale: jax.Array,
  denominator: jax.Array | None,
  decay: float,
) -> tuple[jax.Array, jax.Array]:
  r"""(int8 values, scales) of :math:`M_t = \beta_1 M_{t-1} + (1 - \beta_1) U_t`, with
  :math:`U_t` the update divided by ``denominator`` when clipping was deferred to here
  (:class:`adafactor_jax._probe.DeferredClipping`): then on the grid of :func:`chord_bound`
  where the denominator is one per line, else of each line's maximum."""
  old = dequantize(old_q, old_scale)
  unclipped = widen(update)
  if denominator is None:
    new = decay * old + (1.0 - decay) * unclipped
    return _quantized_update(new, old_q, _absmax(new))
  new = decay * old + (1.0 - decay) * (unclipped / denominator)
  axis = block_axis(jnp.shape(new))
  if axis is not None and np.ndim(denominator) and np.shape(denominator)[axis] != 1:
    return _quantized_update(new, old_q, _absmax(new))  # a batch axis is the block axis
  return _quantized_update(new, old_q, chord_bound(old, unclipped, denominator, decay))


def _stored_once(stored: Any) -> Any:
  """The new momentum buffers, computed once.

  XLA:CPU would otherwise compute M_t again inside the parameter update, which
  reads the old buffer after it is overwritten and so needs a copy of it: an
  optimization barrier stops that there. The TPU compiler fuses the buffer's
  write and the parameter update into one pass, which the barrier would split
  (8 more bytes per parameter on v5p), so it is kept on the CPU only.
  """
  # One choice per buffer, so that no buffer's update reads another's (fused_train_step checks).
  return jax.tree.map(
    lambda buffer: jax.lax.platform_dependent(
      buffer, cpu=jax.lax.optimization_barrier, default=lambda x: x
    ),
    stored,
  )


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(int8 values, float32 block scales) of ``x``, as int8 momentum stores it."""
  x = x.astype(jnp.float32)
  return _quantized_update(x, jnp.zeros(jnp.shape(x), jnp.int8), _absmax(x))


def ema_momentum(
  momentum: float = 0.9, *, momentum_dtype: Any = FLOAT32
) -> optax.GradientTransformationExtraArgs:
  r"""An exponential moving average of the updates, without bias correction.

  .. math::
    M_t = Q\big(\beta_1 M_{t-1} + (1 - \beta_1) U_t\big), \qquad U_t \leftarrow M_t,

  with :math:`Q` the rounding to the stored ``momentum_dtype``. The arithmetic
  is float32 and only the stored buffer has ``momentum_dtype``, so a bfloat16
  or int8 buffer costs one rounding per step. (``optax.ema`` with a bfloat16
  accumulator also rounds :math:`\beta_1 M_{t-1}` to bfloat16.) The returned
  update is :math:`M_t` as stored, so the parameters move by exactly the
  momentum the state holds; unlike an update from the unrounded :math:`M_t`,
  this lets XLA write the buffer in place and read it once more, instead of
  copying the old buffer and computing :math:`M_t` twice.

  **int8.** With ``momentum_dtype=int8`` (as Praxis's ShardedAdafactor and the
  AlgoPerf Adafactor baseline), :math:`Q` quantizes block-wise: a block is a
  whole line of the parameter along its longest axis (:func:`block_axis`; as
  Praxis, which takes the first axis), stored as int8 values :math:`q` and a
  float32 scale :math:`s = \max_\text{block}|M| / 127` in ``state.scale``, and
  :math:`M = q\,s` (round to nearest, so within :math:`s/2`; :func:`adafactor_jax.adafactor`
  with update clipping takes an upper bound of the maximum instead, :func:`chord_bound`,
  which spares the step a read of the gradient); the state is then an
  :class:`Int8MomentumState`. The scales are shaped as the parameter with that
  axis of size 1 and sharded like it. A block needs no reshape, so any sharding
  holds it: where the axis is sharded, each block's maximum is all-reduced, a
  vector the size of a factored statistic. The buffer costs 1 byte per element and
  the scales 4 / (the longest axis) bytes: 0.4% of the buffer for a 1024 x 1024
  matrix, at most 3.1% for any parameter with an axis of 128 or more (blocks of
  32 along the last axis, before, cost 12.5%).

  Args:
    momentum: :math:`\beta_1 \in [0, 1)`.
    momentum_dtype: dtype of the stored buffer: float32, bfloat16 (half the
      memory), or int8 (an eighth, plus the scales). A complex parameter gets
      the complex counterpart (float32: complex64, with complex64
      arithmetic); bfloat16, float16 and int8 have none and raise ValueError
      naming it.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is
    :class:`EmaMomentumState` (:class:`Int8MomentumState` for int8). (Its only extra
    argument is the private probe of :func:`adafactor_jax.warm_start_state`.)
  """
  _checks.check_scalar("momentum", momentum, low=0.0, high=1.0, high_open=True)
  momentum_dtype = momentum_dtype_or_error(momentum_dtype)
  quantized = momentum_dtype == INT8

  def init_fn(params: optax.Params) -> EmaMomentumState | Int8MomentumState:
    def buffer(path: jax.tree_util.KeyPath, param: Any) -> jax.Array:
      return _checks.zeros_like_param(param, _buffer_dtype(path, param, momentum_dtype))

    buffers = jax.tree_util.tree_map_with_path(buffer, params)
    if not quantized:
      return EmaMomentumState(buffers)
    scales = jax.tree.map(_zero_scales, params)
    return Int8MomentumState(buffers, scales)

  def update_fn(
    updates: optax.Updates,
    state: Any,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, EmaMomentumState | Int8MomentumState]:
    del params
    probe = _probe.find(extra_args)
    decay = momentum
    if probe is not None:  # warm_start_state asks for M = U.
      probe.momentum += 1
      decay = 0.0
    if quantized:
      check_scales(state.momentum, state.scale)
      treedef: Any = jax.tree.structure(updates)  # jaxlib has no type stub for PyTreeDef
      leaves = treedef.flatten_up_to(updates)
      denominators: list[Any] = [None] * len(leaves)
      deferral = _probe.find_deferred_clipping(extra_args)
      if deferral is not None and deferral.denominators is not None:
        denominators, deferral.taken = deferral.denominators, True
      pairs = [
        _int8_step(u, q, s, d, decay)
        for u, q, s, d in zip(
          leaves,
          treedef.flatten_up_to(state.momentum),
          treedef.flatten_up_to(state.scale),
          denominators,
          strict=True,
        )
      ]
      stored = treedef.unflatten([q for q, _ in pairs])
      scale = treedef.unflatten([s for _, s in pairs])
      values = jax.tree.map(dequantize, stored, scale)
    else:
      old = jax.tree.map(widen, state.momentum)
      new = jax.tree.map(lambda u, m: decay * m + (1.0 - decay) * widen(u), updates, old)
      stored = _stored_once(jax.tree.map(lambda n, m: n.astype(m.dtype), new, state.momentum))
      values = stored
    updates = jax.tree.map(lambda m, u: m.astype(u.dtype), values, updates)
    if quantized:
      return updates, Int8MomentumState(stored, scale)
    return updates, EmaMomentumState(stored)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
