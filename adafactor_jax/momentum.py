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


class EmaMomentumState(NamedTuple):
  """State of :func:`ema_momentum`: one buffer per parameter."""

  momentum: optax.Updates


def momentum_dtype_or_error(momentum_dtype: Any) -> jnp.dtype:
  """`momentum_dtype` as a floating dtype, or a ValueError naming it."""
  try:
    dtype = jnp.dtype(momentum_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"momentum_dtype must be a floating dtype (float32, bfloat16, ...), got "
      f"{momentum_dtype!r}. Under optax.inject_hyperparams, a dtype passed "
      "explicitly is taken for a schedule: add static_args=('momentum_dtype',)."
    )
  return dtype


def _buffer_dtype(path: jax.tree_util.KeyPath, param: Any, momentum_dtype: jnp.dtype) -> jnp.dtype:
  """``momentum_dtype``, or its complex counterpart for a complex parameter."""
  if not jnp.iscomplexobj(param):
    return momentum_dtype
  if jnp.finfo(momentum_dtype).bits < 32:
    raise ValueError(
      f"momentum_dtype {momentum_dtype.name} has no complex counterpart, for the complex "
      f"parameter '{_checks.path_name(path)}': pass momentum_dtype=float32 (a complex64 "
      "buffer)."
    )
  return jnp.promote_types(momentum_dtype, jnp.complex64)


def ema_momentum(
  momentum: float = 0.9, *, momentum_dtype: Any = FLOAT32
) -> optax.GradientTransformationExtraArgs:
  r"""An exponential moving average of the updates, without bias correction.

  .. math::
    M_t = \beta_1 M_{t-1} + (1 - \beta_1) U_t, \qquad U_t \leftarrow M_t.

  The arithmetic is float32 and only the stored buffer has ``momentum_dtype``,
  so a bfloat16 buffer costs one rounding per step. (``optax.ema`` with a
  bfloat16 accumulator also rounds :math:`\beta_1 M_{t-1}` to bfloat16.) The
  returned update is :math:`M_t` as stored, so the parameters move by exactly
  the momentum the state holds; unlike an update from the unrounded
  :math:`M_t`, this lets XLA write the buffer in place and read it once more,
  instead of copying the old buffer and computing :math:`M_t` twice.

  Args:
    momentum: :math:`\beta_1 \in [0, 1)`.
    momentum_dtype: dtype of the stored buffer; bfloat16 halves its memory.
      A complex parameter gets the complex counterpart (float32: complex64,
      with complex64 arithmetic); bfloat16 and float16 have none and raise
      ValueError naming it.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is
    :class:`EmaMomentumState`. (Its only extra argument is the private probe of
    :func:`adafactor_jax.warm_start_state`.)
  """
  _checks.check_scalar("momentum", momentum, low=0.0, high=1.0, high_open=True)
  momentum_dtype = momentum_dtype_or_error(momentum_dtype)

  def init_fn(params: optax.Params) -> EmaMomentumState:
    def buffer(path: jax.tree_util.KeyPath, param: Any) -> jax.Array:
      return _checks.zeros_like_param(param, _buffer_dtype(path, param, momentum_dtype))

    return EmaMomentumState(jax.tree_util.tree_map_with_path(buffer, params))

  def update_fn(
    updates: optax.Updates,
    state: EmaMomentumState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, EmaMomentumState]:
    del params
    probe = _probe.find(extra_args)
    decay = momentum
    if probe is not None:  # warm_start_state asks for M = U.
      probe.momentum += 1
      decay = 0.0
    new = jax.tree.map(
      lambda u, m: decay * widen(m) + (1.0 - decay) * widen(u), updates, state.momentum
    )
    # Without the barrier XLA recomputes M_t inside the parameter update too,
    # which reads the old buffer again and so needs a copy of it.
    stored = jax.lax.optimization_barrier(
      jax.tree.map(lambda n, m: n.astype(m.dtype), new, state.momentum)
    )
    updates = jax.tree.map(lambda m, u: m.astype(u.dtype), stored, updates)
    return updates, EmaMomentumState(stored)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
