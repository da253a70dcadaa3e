"""Update clipping by the RMS of each parameter's update (Adafactor Section 6)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks


def rms(x: jax.Array) -> jax.Array:
  """sqrt(mean(x²)) in float32, whatever the dtype of x."""
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


def clip_by_update_rms(clipping_threshold: float = 1.0) -> optax.GradientTransformation:
  r"""Clips each parameter's update to an RMS of at most ``clipping_threshold``.

  .. math::
    \hat U_t = U_t / \max\big(1, \mathrm{RMS}(U_t) / d\big),

  the RMS taken over the whole parameter, in float32. With :math:`d = 1` and
  the factored second moment, this keeps updates bounded when the second-moment
  estimate is stale (slow decay without warmup). The same math as
  ``optax.clip_by_block_rms``, plus validation and float32 arithmetic for
  low-precision updates.

  Args:
    clipping_threshold: the threshold :math:`d > 0` (paper: 1.0).

  Returns:
    An `optax.GradientTransformation` with no state.

  References:
    Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost <https://arxiv.org/abs/1804.04235>`_, 2018, Section 6.
  """
  _checks.check_scalar("clipping_threshold", clipping_threshold, low=0.0, low_open=True)

  def update_fn(updates, state, params=None):
    del params

    def clip(update):
      denominator = jnp.maximum(1.0, rms(update) / clipping_threshold)
      return (update.astype(jnp.float32) / denominator).astype(update.dtype)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
