"""A small decoder-only Transformer language model in Flax NNX.

Every parameter carries T5X-style logical axis names ('vocab', 'embed', 'mlp',
'joined_kv') as nnx sharding metadata, read by ``nnx.get_partition_spec``: a
mesh maps them to device axes (``config.mesh.logical_axis_rules``) and
``adafactor_jax.logical_factor_dims`` to factored axes. The metadata does not
shard anything by itself (``eager_sharding=False``), so the model builds
without a mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def _named(init: Any, *names: str) -> Any:
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(
  d_in: int, d_out: int, names: tuple[str, str], dtype: Any, rngs: nnx.Rngs
) -> nnx.Linear:
  init = _named(nnx.initializers.lecun_normal(), *names)
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, param_dtype=dtype, rngs=rngs)


def _norm(d_model: int, dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  init = _named(nnx.initializers.ones, "embed")
  return nnx.LayerNorm(d_model, use_bias=False, scale_init=init, param_dtype=dtype, rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with 2-D (fused-head) kernels.

  The kernels are (d_model, 3 * d_model) and (d_model, d_model), as in GPT-2,
  rather than nnx.MultiHeadAttention's 3-D (d_model, heads, head_dim): a
  matrix's second moment factors by default into rows and columns.
  """

  def __init__(self, d_model: int, num_heads: int, dtype: Any, *, rngs: nnx.Rngs) -> None:
    self.num_heads = num_heads
    self.qkv = _linear(d_model, 3 * d_model, ("embed", "joined_kv"), dtype, rngs)
    self.out = _linear(d_model, d_model, ("joined_kv", "embed"), dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    *batch, length, d_model = x.shape
    heads = self.qkv(x).reshape(*batch, length, 3, self.num_heads, d_model // self.num_heads)
    q, k, v = (heads[..., i, :, :] for i in range(3))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(*batch, length, d_model))


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention and MLP, without biases."""

  def __init__(
    self, d_model: int, num_heads: int, mlp_dim: int, dtype: Any, *, rngs: nnx.Rngs
  ) -> None:
    self.attention_norm = _norm(d_model, dtype, rngs)
    self.attention = CausalSelfAttention(d_model, num_heads, dtype, rngs=rngs)
    self.mlp_norm = _norm(d_model, dtype, rngs)
    self.mlp_in = _linear(d_model, mlp_dim, ("embed", "mlp"), dtype, rngs)
    self.mlp_out = _linear(mlp_dim, d_model, ("mlp", "embed"), dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class TransformerLM(nnx.Module):
  """Token and learned position embeddings, ``num_layers`` blocks, tied output.

  ``embed_init_scale`` multiplies the embedding's initial standard deviation
  (1.0 gives N(0, 1)): the paper's finding that relative step sizes are robust
  to the embedding's scale is tested by varying it.
  """

  def __init__(
    self,
    vocab_size: int,
    seq_len: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    mlp_dim: int,
    embed_init_scale: float = 1.0,
    dtype: Any = jnp.float32,
    *,
    rngs: nnx.Rngs,
  ) -> None:
    init = nnx.initializers.normal(stddev=embed_init_scale)
    self.embed = nnx.Embed(
      vocab_size,
      d_model,
      embedding_init=_named(init, "vocab", "embed"),
      param_dtype=dtype,
      rngs=rngs,
    )
    self.position = nnx.Param(
      init(rngs.params(), (seq_len, d_model), dtype),
      out_sharding=(None, "embed"),
      eager_sharding=False,
    )
    self.blocks = nnx.List(
      [Block(d_model, num_heads, mlp_dim, dtype, rngs=rngs) for _ in range(num_layers)]
    )
    self.final_norm = _norm(d_model, dtype, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.position[: tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    # Tied output embedding, with T5's 1/sqrt(d_model) so that N(0, 1) embeddings
    # give unit-scale logits at initialisation.
    return self.embed.attend(self.final_norm(x)) * x.shape[-1] ** -0.5
