"""A train step whose optimizer update runs inside the backward pass of a stack of layers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from adafactor_jax import _checks
from adafactor_jax.nonfinite import SkipNonfiniteState

Batch = Any


class FusedState(NamedTuple):
  """State of :func:`fused_train_step`.

  ``layers`` is ``tx``'s state of one layer, stacked along a leading axis (``jax.vmap`` of
  ``tx.init``): every layer has statistics, a step count and momentum of its own. ``rest``
  is ``tx``'s state of the other parameters.
  """

  layers: optax.OptState
  rest: optax.OptState


class FusedTrainStep(NamedTuple):
  """What :func:`fused_train_step` returns: ``init`` and ``step``, both pure and jittable.

  ``init(layers, rest) -> FusedState``; ``step(layers, rest, state, batch) ->
  (layers, rest, state, loss)``, with ``loss`` the loss before the step.
  """

  init: Callable[[Any, Any], FusedState]
  step: Callable[[Any, Any, FusedState, Batch], tuple[Any, Any, FusedState, jax.Array]]


def _check_per_parameter(tx: optax.GradientTransformation, layer_params: Any, state: Any) -> None:
  """Raises ValueError unless each parameter's update reads its own gradient and value only
  (checked on the traced update of one layer)."""
  for node in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SkipNonfiniteState)):
    if isinstance(node, SkipNonfiniteState):
      raise ValueError(
        "fused_train_step cannot skip a whole step on a non-finite gradient "
        "(skip_nonfinite=True): it has updated the last layers before the first layers' "
        "gradients exist. Build tx without skip_nonfinite."
      )
  _checks.check_per_parameter(
    tx,
    layer_params,
    state,
    "fused_train_step",
    "which the fused step never holds). Use such a transformation with an unfused step.",
  )


def _layer(tree: Any, i: jax.Array | int) -> Any:
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _set_layer(tree: Any, values: Any, i: jax.Array) -> Any:
  return jax.tree.map(lambda x, v: jax.lax.dynamic_update_index_in_dim(x, v, i, 0), tree, values)


def fused_train_step(
  tx: optax.GradientTransformation,
  *,
  embed: Callable[[Any, Batch], Any],
  layer: Callable[[Any, Any], Any],
  head: Callable[[Any, Any, Batch], jax.Array],
) -> FusedTrainStep:
  r"""A train step that applies ``tx`` to each layer of a stack inside the backward pass.

  The model is ``loss = head(rest, h_L, batch)`` with ``h_0 = embed(rest, batch)`` and
  ``h_{l+1} = layer(layers[l], h_l)``: ``layers`` holds the parameters of L identical
  layers stacked along a leading axis (a scanned block: ``nn.scan``, ``nnx.scan``, or
  ``jax.lax.scan`` over a stacked tree), ``rest`` every other parameter (embeddings, final
  norm, head); ``h`` may be any pytree (e.g. activations and a mask).

  The forward pass scans the layers and keeps only each layer's input (as
  ``jax.checkpoint`` per layer would). The backward pass scans them in reverse: for layer
  l it recomputes the layer, takes its parameters' gradient, and at once applies ``tx`` to
  them, writing the new parameters and state over the old ones in place. So at most one
  layer's gradient exists at a time, where an unfused step holds the gradient of every
  parameter before its update (LOMO / AdaLomo, Lv et al. 2023, for Adafactor's per-layer
  statistics). Last, ``rest`` gets its gradient (from ``head`` and ``embed``) and its
  update.

  Each layer is a separate parameter tree to ``tx``: its statistics, update clipping,
  parameter scale and momentum are per layer, as an unfused :func:`adafactor_jax.adafactor`
  whose ``factor_dims`` makes the stacked axis a batch axis
  (:class:`adafactor_jax.FactorAxes`, or the logical name 'layers'); the numerics are
  those of that unfused step. ``tx``'s ``factor_dims``, if any, sees one layer's
  parameters (no stacked axis).

  What it cannot do: a transformation whose update of one parameter reads another's
  gradient: a global-norm clip (``optax.clip_by_global_norm``), ``skip_nonfinite`` (which
  skips a step when any gradient is non-finite), gradient accumulation over the whole
  tree. The fused step never holds every gradient at once; ``init`` refuses such a ``tx``
  with a ValueError (it traces one layer's update and follows what each update reads).

  Args:
    tx: the optimizer, e.g. :func:`adafactor_jax.adafactor`, applied per layer and to
      ``rest``.
    embed: ``(rest, batch) -> h_0``.
    layer: ``(layer_params, h) -> h``, for one layer's parameters (``layers`` without its
      leading axis).
    head: ``(rest, h_L, batch) -> loss``, a scalar.

  Returns:
    A :class:`FusedTrainStep` ``(init, step)``. Jit ``step`` with ``donate_argnums=(0, 1,
    2)`` so that parameters and state are updated in place.

  References:
    Lv et al., `AdaLomo: Low-memory Optimization with Adaptive Learning Rate
    <https://arxiv.org/abs/2310.10195>`_, 2023.
  """

  def init(layers: Any, rest: Any) -> FusedState:
    layers_state = jax.vmap(tx.init)(layers)
    first = _layer(layers, jnp.asarray(0))
    _check_per_parameter(tx, jax.eval_shape(lambda: first), _layer(layers_state, 0))
    return FusedState(layers_state, tx.init(rest))

  def step(
    layers: Any, rest: Any, state: FusedState, batch: Batch
  ) -> tuple[Any, Any, FusedState, jax.Array]:
    h, embed_vjp = jax.vjp(lambda r: embed(r, batch), rest)

    def forward(h: Any, layer_params: Any) -> tuple[Any, Any]:
      return layer(layer_params, h), h

    h, inputs = jax.lax.scan(forward, h, layers)
    loss, head_vjp = jax.vjp(lambda r, h: head(r, h, batch), rest, h)
    rest_grads, dh = head_vjp(jnp.ones_like(loss))

    def backward(carry: tuple[Any, Any, Any], i: jax.Array) -> tuple[Any, None]:
      dh, layers, layers_state = carry
      params = _layer(layers, i)
      _, layer_vjp = jax.vjp(layer, params, _layer(inputs, i))
      grads, dh = layer_vjp(dh)
      updates, new_state = tx.update(grads, _layer(layers_state, i), params)
      params = optax.apply_updates(params, updates)
      return (dh, _set_layer(layers, params, i), _set_layer(layers_state, new_state, i)), None

    n_layers = jax.tree.leaves(layers)[0].shape[0]
    order = jnp.arange(n_layers - 1, -1, -1)
    (dh, layers, layers_state), _ = jax.lax.scan(backward, (dh, layers, state.layers), order)
    (embed_grads,) = embed_vjp(dh)
    rest_grads = jax.tree.map(jnp.add, rest_grads, embed_grads)
    updates, rest_state = tx.update(rest_grads, state.rest, rest)
    rest = optax.apply_updates(rest, updates)
    return layers, rest, FusedState(layers_state, rest_state), loss

  return FusedTrainStep(init, step)
