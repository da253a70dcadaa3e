"""Momentum: an exponential moving average of the updates, stored compactly."""

from __future__ import annotations

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

TILE = (8, 128)
"""int8 blocks over the last two axes: one float32 TPU tile, 1024 elements.

A block matches the TPU's (8, 128) layout of the last two axes, so that the
block maxima are reductions inside tiles rather than a relayout (blocks of 32
along the last axis compiled for v5p to ~116 bytes accessed per parameter,
these to ~31), and stays inside its shard whenever the shards along those
axes hold multiples of 8 rows and 128 columns; its float32 scale adds 1/256
byte per element (:func:`block_shape` for other shapes)."""

_INT8_MAX = 127.0  # Symmetric: -128 is never used, so that negation is exact.


class EmaMomentumState(NamedTuple):
  """State of :func:`ema_momentum`: one buffer per parameter."""

  momentum: optax.Updates


class Int8MomentumState(NamedTuple):
  """State of :func:`ema_momentum` with ``momentum_dtype=int8``.

  ``momentum`` holds each parameter's int8 values, ``scale`` the float32 step of each
  block's grid (:func:`block_shape`), shaped as the parameter with its last two axes
  counting blocks (:func:`scale_shape`). A separate type, so that
  :class:`EmaMomentumState`, and checkpoints of it, keep their structure.
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


def _matrix(shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, int]:
  """(leading axes, rows, columns) that int8 momentum cuts into blocks: the
  last two axes; a vector of a multiple of 128 elements as rows of 128 (as a
  TPU lays it out), any other as one row; a scalar as one element."""
  if len(shape) >= 2:
    return shape[:-2], shape[-2], shape[-1]
  n = shape[0] if shape else 1
  return ((), n // TILE[1], TILE[1]) if n % TILE[1] == 0 else ((), 1, n)


def block_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """(rows, columns) of each int8 block of a parameter of ``shape``: a TILE
  when its rows and columns are multiples of it, else one row: 128 columns
  of it, or the whole row when the columns are not a multiple of 128 (as for
  a head axis next to it, which may be sharded a head or two per device)."""
  _, m, n = _matrix(tuple(shape))
  if n % TILE[1]:
    return 1, n
  return (TILE[0] if m % TILE[0] == 0 else 1), TILE[1]


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The shape of the float32 block scales of a parameter of ``shape``: its
  own with the last two axes counting blocks (one axis for a vector, none for
  a scalar), so that they are sharded like it."""
  shape = tuple(shape)
  lead, m, n = _matrix(shape)
  rows, cols = block_shape(shape)
  if len(shape) >= 2:
    return (*lead, m // rows, n // cols)
  return ((m // rows) * (n // cols),) if shape else ()


def _blocks(x: jax.Array) -> jax.Array:
  """x as (..., row blocks, rows, column blocks, columns) (:func:`block_shape`)."""
  lead, m, n = _matrix(jnp.shape(x))
  rows, cols = block_shape(jnp.shape(x))
  return jnp.reshape(x, (*lead, m // rows, rows, n // cols, cols))


def _per_element(per_block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A value per block (shaped as the scales) repeated over its block, in x's
  ``shape``: so that elementwise work stays in that shape, which lets XLA
  write the int8 buffer in place."""
  lead, m, n = _matrix(tuple(shape))
  rows, cols = block_shape(tuple(shape))
  per_block = jnp.reshape(per_block, (*lead, m // rows, 1, n // cols, 1))
  return jnp.broadcast_to(per_block, (*lead, m // rows, rows, n // cols, cols)).reshape(shape)


def _absmax(x: jax.Array) -> jax.Array:
  """max |x| over each block of float32 ``x``, shaped as the scales (NaN if
  any is NaN).

  Taken on the bits as int32 (non-negative floats order as their bits): a
  float max-reduction goes to XLA:CPU's YNNPACK fusion, which does not fuse
  the elementwise work that produces ``x`` and so stores it, a
  parameter-sized float32 temporary; an integer one is an ordinary loop.
  """
  blocks = _blocks(x)
  bits = jax.lax.bitcast_convert_type(blocks, jnp.int32) & 0x7FFFFFFF
  absmax = jax.lax.platform_dependent(bits, cpu=_cpu_max, default=lambda b: jnp.max(b, (-3, -1)))
  return jnp.reshape(jax.lax.bitcast_convert_type(absmax, jnp.float32), scale_shape(jnp.shape(x)))


def _cpu_max(bits: jax.Array) -> jax.Array:
  """``jnp.max(bits, (-3, -1))`` for XLA:CPU, which rewrites a reduction over
  an axis longer than 32 (as the 8 x 128 of a tile, merged) into a tree of
  reduce-windows that does not fuse the elementwise work producing ``bits``,
  and so stores it: 4 bytes per element. Instead, the maxima over the rows and
  each 32 columns (two axes apart, so not merged), then over the 4 of them: a
  temporary of 1/64 byte per element."""
  *lead, row_blocks, rows, col_blocks, cols = bits.shape
  if cols % 32 or cols <= 32:
    return jnp.max(bits, (-3, -1))
  bits = jnp.reshape(bits, (*lead, row_blocks, rows, col_blocks, cols // 32, 32))
  partial = jax.lax.optimization_barrier(jnp.max(bits, (-4, -1)))
  return jnp.max(partial, -1)


def _first_of_block(x: jax.Array) -> jax.Array:
  """Each block's first element, shaped as the scales."""
  return jnp.reshape(_blocks(x)[..., 0, :, 0], scale_shape(jnp.shape(x)))


def _old_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The scales' shape before the (8, 128) blocks: blocks of 32 along the last axis."""
  n = shape[-1] if shape else 1
  return (*shape[:-1], n // 32 if n % 32 == 0 else 1)


def check_scales(momentum: Any, scale: Any) -> None:
  """Raises ValueError, naming the parameter, for scales not shaped as
  :func:`scale_shape` of their int8 values: a state or checkpoint of another
  block layout, which would otherwise be misread (at trace time, so free)."""
  for (path, q), s in zip(
    jax.tree_util.tree_flatten_with_path(momentum)[0], jax.tree.leaves(scale), strict=True
  ):
    got, expected = tuple(jnp.shape(s)), scale_shape(tuple(jnp.shape(q)))
    if got != expected:
      layout = (
        "blocks of 32 along the last axis, the layout before (8, 128) tiles"
        if got == _old_scale_shape(tuple(jnp.shape(q)))
        else "another block layout"
      )
      raise ValueError(
        f"The int8 momentum's scales for parameter '{_checks.path_name(path)}' have shape "
        f"{got} ({layout}), but int8 momentum now stores one per block of "
        f"{block_shape(tuple(jnp.shape(q)))} elements, shape {expected}: this state "
        "cannot be read; start the momentum anew with tx.init."
      )


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 values :math:`q \\cdot s` of int8 values and block scales."""
  return q.astype(jnp.float32) * _per_element(scale, jnp.shape(q))


def _quantized_update(new: jax.Array, old_q: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""(int8 values, block scales) of float32 ``new``, to replace ``old_q``.

  Per block (:func:`block_shape`): :math:`s = \max|x| / 127` and
  :math:`q = \mathrm{round}(127\,x / \max|x|)` (to nearest even), so that the
  block's largest magnitude is exact and every element is within :math:`s/2`.
  An all-zero block has :math:`s = 0` and :math:`q = 0`; a block holding a NaN
  or an Inf gets a NaN or Inf scale, which :func:`dequantize` carries on.
  XLA:CPU gets :func:`_quantized_for_cpu`, the same values shaped for its
  compiler; the TPU compiler fuses the plain computation better (the CPU's
  form compiled for v5p to 47 bytes accessed per parameter of a 4096 x 4096
  matrix, with temporaries of 13% of it; this to 39 and 1%).
  """
  return jax.lax.platform_dependent(new, old_q, cpu=_quantized_for_cpu, default=_quantized_plain)


def _quantized_plain(new: jax.Array, old_q: jax.Array) -> tuple[jax.Array, jax.Array]:
  del old_q
  shape = jnp.shape(new)
  absmax = _absmax(new)
  ratio = new * _INT8_MAX / _per_element(jnp.where(absmax > 0, absmax, jnp.inf), shape)
  q = jnp.clip(jnp.round(ratio), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  return q, absmax * (1 / _INT8_MAX)


def _quantized_for_cpu(new: jax.Array, old_q: jax.Array) -> tuple[jax.Array, jax.Array]:
  """:func:`_quantized_update` for XLA:CPU.

  The two ``where`` change no value; they shape how XLA compiles the step,
  which computes ``new`` (from the old state) twice, for the maximum and for
  the values, and must store nothing parameter-sized. The values depend on
  ``old_q`` too, so XLA stores them once, in place of ``old_q``, instead of
  recomputing them from the overwritten ``old_q`` inside the parameter update
  (which would need a copy of it); the scales depend on the values, so they
  are written after the values' last read of the old scales, in their place
  instead of a copy.
  """
  shape = jnp.shape(new)
  absmax = _absmax(new)
  # Divided per element: a per-block reciprocal would be one more temporary.
  ratio = new * _INT8_MAX / _per_element(jnp.where(absmax > 0, absmax, jnp.inf), shape)
  q = jnp.clip(jnp.round(ratio), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  q = jnp.where(_per_element(absmax >= 0, shape), q, old_q)  # absmax >= 0 unless NaN
  scale = absmax * (1 / _INT8_MAX)
  # q > -128 unless the block held a NaN or an Inf, whose scale is NaN either way.
  scale = jnp.where(_first_of_block(q) > -128, scale, jnp.nan)
  return q, scale


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
  return _quantized_update(x, jnp.zeros(jnp.shape(x), jnp.int8))


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
  AlgoPerf Adafactor baseline), :math:`Q` quantizes block-wise: the last two
  axes are cut into blocks of 8 rows and 128 columns, one float32 TPU tile
  (1 row of 128 when the rows are not a multiple of 8; one whole row when the
  columns are not a multiple of 128; a vector of a multiple of 128 elements
  counts as rows of 128), each stored as int8 values :math:`q` and a float32
  scale :math:`s = \max_\text{block}|M| / 127` in ``state.scale``, and
  :math:`M = q\,s` (round to nearest, so within :math:`s/2`); the state is then an
  :class:`Int8MomentumState`. A block lies inside one shard whenever the shards
  along the last two axes hold multiples of its rows and columns; the scales,
  shaped as the parameter with its last two axes counting blocks, are sharded
  like it. The buffer costs 1 byte per element and the scales 1/256 byte
  (4 bytes a tile; 1/32 byte in blocks of one row of 128; 4 bytes a row in
  whole rows). A
  state whose scales have another shape (blocks of 32 along the last axis, as
  before these tiles) is refused with a ValueError naming the parameter.

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
    # Made from the parameter, like every buffer, so that the scales follow its sharding.
    scales = jax.tree.map(lambda param: _absmax(_checks.zeros_like_param(param)), params)
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
      old = jax.tree.map(dequantize, state.momentum, state.scale)
    else:
      old = jax.tree.map(widen, state.momentum)
    new = jax.tree.map(lambda u, m: decay * m + (1.0 - decay) * widen(u), updates, old)
    if quantized:
      treedef: Any = jax.tree.structure(updates)  # jaxlib has no type stub for PyTreeDef
      pairs = [
        _quantized_update(m, q)
        for m, q in zip(
          treedef.flatten_up_to(new), treedef.flatten_up_to(state.momentum), strict=True
        )
      ]
      stored = treedef.unflatten([q for q, _ in pairs])
      scale = treedef.unflatten([s for _, s in pairs])
      values = jax.tree.map(dequantize, stored, scale)
    else:
      stored = _stored_once(jax.tree.map(lambda n, m: n.astype(m.dtype), new, state.momentum))
      values = stored
    updates = jax.tree.map(lambda m, u: m.astype(u.dtype), values, updates)
    if quantized:
      return updates, Int8MomentumState(stored, scale)
    return updates, EmaMomentumState(stored)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
