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

BLOCK_SIZE = 32
"""Elements per int8 block along the last axis (when it is a multiple of this).

Small enough that a block stays inside its shard whenever the last axis is
split into shards of a multiple of 32 elements (768 over 8 devices gives 96),
large enough that the float32 scales add 1/8 byte per element."""

_INT8_MAX = 127.0  # Symmetric: -128 is never used, so that negation is exact.


class EmaMomentumState(NamedTuple):
  """State of :func:`ema_momentum`: one buffer per parameter."""

  momentum: optax.Updates


class Int8MomentumState(NamedTuple):
  """State of :func:`ema_momentum` with ``momentum_dtype=int8``.

  ``momentum`` holds each parameter's int8 values, ``scale`` the float32 step of each
  block's grid, shaped as the parameter with its last axis counting blocks of 32 (or
  size 1, one block per row, when the last axis is not a multiple of 32). A separate
  type, so that :class:`EmaMomentumState`, and checkpoints of it, keep their structure.
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


def _blocks(x: jax.Array) -> jax.Array:
  """x as (..., blocks, block size): the last axis cut into blocks of
  BLOCK_SIZE when it is a multiple of it, else into one block (a rank-0 x is
  one block of one)."""
  shape = jnp.shape(x)
  n = shape[-1] if shape else 1
  size = BLOCK_SIZE if n % BLOCK_SIZE == 0 else n
  return jnp.reshape(x, (*shape[:-1], n // size, size))


def _per_element(per_block: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A value per block (``_blocks(x)`` less its last axis) repeated over its
  block, in x's ``shape``: so that elementwise work stays in that shape, which
  lets XLA write the int8 buffer in place."""
  n = shape[-1] if shape else 1
  repeated = jnp.broadcast_to(per_block[..., None], (*per_block.shape, n // per_block.shape[-1]))
  return repeated.reshape(shape)


def _absmax(blocks: jax.Array) -> jax.Array:
  """max |x| over the last axis of float32 ``blocks`` (NaN if any is NaN).

  Taken on the bits as int32 (non-negative floats order as their bits): a
  float max-reduction goes to XLA:CPU's YNNPACK fusion, which does not fuse
  the elementwise work that produces ``blocks`` and so stores it, a
  parameter-sized float32 temporary; an integer one is an ordinary loop.
  """
  bits = jax.lax.bitcast_convert_type(blocks, jnp.int32) & 0x7FFFFFFF
  return jax.lax.bitcast_convert_type(jnp.max(bits, -1), jnp.float32)


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 values :math:`q \\cdot s` of int8 values and block scales."""
  return q.astype(jnp.float32) * _per_element(scale, jnp.shape(q))


def _quantized_update(new: jax.Array, old_q: jax.Array) -> tuple[jax.Array, jax.Array]:
  r"""(int8 values, block scales) of float32 ``new``, to replace ``old_q``.

  Per block (:func:`_blocks`): :math:`s = \max|x| / 127` and
  :math:`q = \mathrm{round}(127\,x / \max|x|)` (to nearest even), so that the
  block's largest magnitude is exact and every element is within :math:`s/2`.
  An all-zero block has :math:`s = 0` and :math:`q = 0`; a block holding a NaN
  or an Inf gets a NaN or Inf scale, which :func:`dequantize` carries on.

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
  absmax = _absmax(_blocks(new))
  # Divided per element: a per-block reciprocal would be one more temporary.
  ratio = new * _INT8_MAX / _per_element(jnp.where(absmax > 0, absmax, jnp.inf), shape)
  q = jnp.clip(jnp.round(ratio), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
  q = jnp.where(_per_element(absmax >= 0, shape), q, old_q)  # absmax >= 0 unless NaN
  scale = absmax * (1 / _INT8_MAX)
  # q > -128 unless the block held a NaN or an Inf, whose scale is NaN either way.
  scale = jnp.where(_blocks(q)[..., 0] > -128, scale, jnp.nan)
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
  AlgoPerf Adafactor baseline), :math:`Q` quantizes block-wise: the last axis
  is cut into blocks of 32 elements (one block when its size is not a multiple
  of 32), each stored as int8 values :math:`q` and a float32 scale
  :math:`s = \max_\text{block}|M| / 127` in ``state.scale``, and
  :math:`M = q\,s` (round to nearest, so within :math:`s/2`); the state is then an
  :class:`Int8MomentumState`. The blocks lie
  along the last axis only, and so inside one shard whenever the shards along
  it hold a multiple of 32 elements; the scales, shaped as the parameter with
  its last axis counting blocks, are sharded like it. The buffer costs 1 byte
  per element and the scales 1/8 byte (1/8 + 1/64 of AdamW's 8 bytes).

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
    scales = jax.tree.map(
      lambda param: jnp.max(_blocks(_checks.zeros_like_param(param)), -1), params
    )
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
