"""A GPT-2-like decoder in plain JAX, its layers stacked and scanned, for memory figures.

GPT-2's block (pre-LayerNorm, causal multi-head attention with a fused QKV kernel, a 4x
MLP with GELU, biases), learned positions and a head tied to the token embedding. The
layers' parameters carry a leading 'layers' axis and run under ``jax.lax.scan``, each
layer rematerialized (``jax.checkpoint``: only its input is kept for the backward pass),
as large models train, so that the compiled program, and its compile time, do not grow
with depth. Written as three functions, ``embed``, ``layer`` and ``head``, which is the
form ``adafactor_jax.fused_train_step`` takes; ``loss`` chains them.

Parameters are ``(layers, rest)``: ``layers`` the stacked block, ``rest`` the embeddings
and the final LayerNorm.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from adafactor_jax import FactorAxes, default_factor_dims

Params = dict[str, Any]

HEAD_DIM = 64
"""Every attention head's width, as GPT-2's: d_model / 64 heads."""


class Config(NamedTuple):
  """A model's shape. ``batch`` sequences of ``seq_len`` tokens per step."""

  d_model: int
  n_layers: int
  vocab: int = 50304  # GPT-2's 50257, padded to a multiple of 128
  seq_len: int = 1024
  batch: int = 8

  @property
  def params(self) -> int:
    """The number of parameters."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(param_shapes(self)))


def _dense(d_in: int, d_out: int, lead: tuple[int, ...], dtype: Any) -> Params:
  return {
    "kernel": jax.ShapeDtypeStruct((*lead, d_in, d_out), dtype),
    "bias": jax.ShapeDtypeStruct((*lead, d_out), dtype),
  }


def _norm(d: int, lead: tuple[int, ...], dtype: Any) -> Params:
  return {
    "scale": jax.ShapeDtypeStruct((*lead, d), dtype),
    "bias": jax.ShapeDtypeStruct((*lead, d), dtype),
  }


def param_shapes(config: Config, dtype: Any = jnp.float32) -> tuple[Params, Params]:
  """``(layers, rest)`` as ``jax.ShapeDtypeStruct``s: nothing allocated."""
  d, lead = config.d_model, (config.n_layers,)
  layers = {
    "ln_1": _norm(d, lead, dtype),
    "attn": {"c_attn": _dense(d, 3 * d, lead, dtype), "c_proj": _dense(d, d, lead, dtype)},
    "ln_2": _norm(d, lead, dtype),
    "mlp": {"c_fc": _dense(d, 4 * d, lead, dtype), "c_proj": _dense(4 * d, d, lead, dtype)},
  }
  rest = {
    "wte": jax.ShapeDtypeStruct((config.vocab, d), dtype),
    "wpe": jax.ShapeDtypeStruct((config.seq_len, d), dtype),
    "ln_f": _norm(d, (), dtype),
  }
  return layers, rest


def batch_shape(config: Config) -> jax.ShapeDtypeStruct:
  """The token batch: ``batch`` rows of ``seq_len + 1`` tokens (inputs and next-token
  targets)."""
  return jax.ShapeDtypeStruct((config.batch, config.seq_len + 1), jnp.int32)


def init_params(config: Config, seed: int = 0, dtype: Any = jnp.float32) -> tuple[Params, Params]:
  """Random parameters as GPT-2 initializes them (normal 0.02, LayerNorm 1 and 0)."""
  rng = np.random.default_rng(seed)

  def one(path: jax.tree_util.KeyPath, x: jax.ShapeDtypeStruct) -> jax.Array:
    name = jax.tree_util.keystr(path[-1:], simple=True)
    if name == "scale":
      value = np.ones(x.shape)
    elif name == "bias":
      value = np.zeros(x.shape)
    else:
      value = 0.02 * rng.standard_normal(x.shape)
    return jnp.asarray(value, x.dtype)

  return jax.tree_util.tree_map_with_path(one, param_shapes(config, dtype))


def random_batch(config: Config, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, config.vocab, batch_shape(config).shape), jnp.int32)


def _layer_norm(p: Params, x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  normed = (x32 - mean) * jax.lax.rsqrt(jnp.var(x32, -1, keepdims=True) + 1e-5)
  return (normed * p["scale"] + p["bias"]).astype(x.dtype)


def _linear(p: Params, x: jax.Array) -> jax.Array:
  return x @ p["kernel"] + p["bias"]


def embed(rest: Params, tokens: jax.Array) -> jax.Array:
  """Token plus position embeddings of the inputs (all tokens but the last of each row)."""
  inputs = tokens[:, :-1]
  return rest["wte"][inputs] + rest["wpe"][: inputs.shape[1]]


def layer(p: Params, x: jax.Array) -> jax.Array:
  """One pre-LayerNorm block; ``p`` holds one layer's parameters (no 'layers' axis)."""
  batch, length, d_model = x.shape
  qkv = _linear(p["attn"]["c_attn"], _layer_norm(p["ln_1"], x))
  q, k, v = jnp.split(qkv.reshape(batch, length, 3, -1, HEAD_DIM), 3, axis=2)
  attended = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=True)
  x = x + _linear(p["attn"]["c_proj"], attended.reshape(batch, length, d_model))
  hidden = jax.nn.gelu(_linear(p["mlp"]["c_fc"], _layer_norm(p["ln_2"], x)))
  return x + _linear(p["mlp"]["c_proj"], hidden)


def head(rest: Params, x: jax.Array, tokens: jax.Array) -> jax.Array:
  """The mean next-token cross-entropy, in float32, with the head tied to ``wte``."""
  logits = (_layer_norm(rest["ln_f"], x) @ rest["wte"].T).astype(jnp.float32)
  targets = tokens[:, 1:]
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, targets[..., None], -1))


def loss(params: tuple[Params, Params], tokens: jax.Array) -> jax.Array:
  """The loss of the whole model: embed, the scanned layers (each rematerialized), head."""
  layers, rest = params

  def step(x: jax.Array, p: Params) -> tuple[jax.Array, None]:
    return jax.checkpoint(layer)(p, x), None

  x, _ = jax.lax.scan(step, embed(rest, tokens), layers)
  return head(rest, x, tokens)


def factor_dims(path: str, shape: tuple[int, ...]) -> FactorAxes | None:
  """Adafactor's axes for ``(layers, rest)``: a stacked leaf's leading axis is a batch axis
  (statistics, clipping and parameter scale per layer, as ``fused_train_step`` has them),
  its other axes take the default rule; the rest takes the default rule."""
  batch = (0,) if path.startswith("0/") else ()
  pair = default_factor_dims(shape[len(batch) :])
  if pair is None:
    return FactorAxes(batch=batch)
  row, col = (axis + len(batch) for axis in pair)
  return FactorAxes((row,), (col,), batch)
