"""A small decoder-only Transformer language model in Flax NNX.

Every parameter carries T5X-style logical axis names ('vocab', 'embed', 'mlp',
'joined_kv') as nnx sharding metadata, read by ``nnx.get_partition_spec``: a
mesh maps them to device axes (``config.mesh.logical_axis_rules``) and
``adafactor_jax.logical_factor_dims`` to factored axes. The metadata does not
shard anything by itself (``eager_sharding=False``), so the model builds
without a mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtypes = dict[str, Any]
"""``param_dtype`` (the parameters') and ``dtype`` (the activations'; None: the parameters'),
as every layer takes them."""


def _named(init: Any, *names: str) -> Any:
  return nnx.with_partitioning(init, names, eager_sharding=False)


def _linear(
  d_in: int, d_out: int, names: tuple[str, str], dtypes: Dtypes, rngs: nnx.Rngs
) -> nnx.Linear:
  init = _named(nnx.initializers.lecun_normal(), *names)
  return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, **dtypes, rngs=rngs)


def _norm(d_model: int, dtypes: Dtypes, rngs: nnx.Rngs) -> nnx.LayerNorm:
  init = _named(nnx.initializers.ones, "embed")
  return nnx.LayerNorm(d_model, use_bias=False, scale_init=init, **dtypes, rngs=rngs)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with 2-D (fused-head) kernels.

  The kernels are (d_model, 3 * d_model) and (d_model, d_model), as in GPT-2,
  rather than nnx.MultiHeadAttention's 3-D (d_model, heads, head_dim): a
  matrix's second moment factors by default into rows and columns.
  """

  def __init__(self, d_model: int, num_heads: int, dtypes: Dtypes, *, rngs: nnx.Rngs) -> None:
    self.num_heads = num_heads
    self.qkv = _linear(d_model, 3 * d_model, ("embed", "joined_kv"), dtypes, rngs)
    self.out = _linear(d_model, d_model, ("joined_kv", "embed"), dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    *batch, length, d_model = x.shape
    heads = self.qkv(x).reshape(*batch, length, 3, self.num_heads, d_model // self.num_heads)
    q, k, v = (heads[..., i, :, :] for i in range(3))
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.out(y.reshape(*batch, length, d_model))


class Block(nnx.Module):
  """Pre-LayerNorm causal self-attention and MLP, without biases."""

  def __init__(
    self, d_model: int, num_heads: int, mlp_dim: int, dtypes: Dtypes, *, rngs: nnx.Rngs
  ) -> None:
    self.attention_norm = _norm(d_model, dtypes, rngs)
    self.attention = CausalSelfAttention(d_model, num_heads, dtypes, rngs=rngs)
    self.mlp_norm = _norm(d_model, dtypes, rngs)
    self.mlp_in = _linear(d_model, mlp_dim, ("embed", "mlp"), dtypes, rngs)
    self.mlp_out = _linear(mlp_dim, d_model, ("mlp", "embed"), dtypes, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attention(self.attention_norm(x))
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


def _stacked_blocks(
  num_layers: int, d_model: int, num_heads: int, mlp_dim: int, dtypes: Dtypes, rngs: nnx.Rngs
) -> Block:
  """One Block whose parameters are ``num_layers`` blocks' stacked on a leading 'layers' axis."""

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def create(rngs: nnx.Rngs) -> Block:
    return Block(d_model, num_heads, mlp_dim, dtypes, rngs=rngs)

  return create(rngs)


def run_block(block_graphdef: nnx.GraphDef, block_params: nnx.State, x: jax.Array) -> jax.Array:
  """One layer of a stack: its block's graphdef merged with that layer's parameters."""
  return nnx.merge(block_graphdef, block_params)(x)


def _layer(block_graphdef: nnx.GraphDef, remat: bool) -> Any:
  """``run_block`` of that graphdef; with ``remat``, the backward pass keeps each layer's input
  only and recomputes the rest (activation memory of one layer, not of all)."""
  layer = functools.partial(run_block, block_graphdef)
  return jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable) if remat else layer


def _constrain(x: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def _scan_blocks(
  blocks: Block, x: jax.Array, remat: bool, sharding: jax.sharding.Sharding | None
) -> jax.Array:
  # jax.lax.scan of pure functions rather than nnx.scan: it runs under any transform of the
  # caller (evaluation maps the loss over batches of a model merged outside the map).
  graphdef, stacked = nnx.split(blocks)
  layer = _layer(graphdef, remat)

  def step(x: jax.Array, block_params: nnx.State) -> tuple[jax.Array, None]:
    return _constrain(layer(block_params, x), sharding), None

  return jax.lax.scan(step, x, stacked)[0]


class TransformerLM(nnx.Module):
  """Token and learned position embeddings, ``num_layers`` blocks, tied output.

  ``embed_init_scale`` multiplies the embedding's initial standard deviation
  (1.0 gives N(0, 1)): the paper's finding that relative step sizes are robust
  to the embedding's scale is tested by varying it. With ``scan_layers`` the
  blocks are one Block whose parameters are stacked on a leading axis named
  'layers' (a batch axis to Adafactor, replicated on the mesh), run by
  ``jax.lax.scan``: one block's code compiled once, and the stack the fused
  backward step (``adafactor_jax.fused_train_step``) updates layer by layer.
  ``activation_dtype`` is the dtype the layers compute in (None: the
  parameters'; the loss is taken in float32 either way), and ``remat``
  rematerialises each block in the backward pass.

  ``activation_sharding``, where the residual stream (batch, length, d_model)
  lives between blocks (None: wherever the compiler puts it). On a mesh whose
  'data' axis shards both the batch and the parameters (FSDP), the compiler
  left alone may gather the activations rather than the weights: the job pins
  them to their rows (train.create_model).
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
    scan_layers: bool = False,
    activation_dtype: Any = None,
    remat: bool = False,
    activation_sharding: jax.sharding.Sharding | None = None,
    *,
    rngs: nnx.Rngs,
  ) -> None:
    init = nnx.initializers.normal(stddev=embed_init_scale)
    dtypes = {"param_dtype": dtype, "dtype": activation_dtype}
    self.remat, self.activation_sharding = remat, activation_sharding
    self.embed = nnx.Embed(
      vocab_size, d_model, embedding_init=_named(init, "vocab", "embed"), **dtypes, rngs=rngs
    )
    self.position = nnx.Param(
      init(rngs.params(), (seq_len, d_model), dtype),
      out_sharding=(None, "embed"),
      eager_sharding=False,
    )
    self.blocks: Block | nnx.List
    if scan_layers:
      self.blocks = _stacked_blocks(num_layers, d_model, num_heads, mlp_dim, dtypes, rngs)
    else:
      self.blocks = nnx.List(
        [Block(d_model, num_heads, mlp_dim, dtypes, rngs=rngs) for _ in range(num_layers)]
      )
    self.final_norm = _norm(d_model, dtypes, rngs)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """The blocks' input: token plus position embeddings."""
    x = self.embed(tokens)
    return _constrain(
      x + self.position[: tokens.shape[-1]].astype(x.dtype), self.activation_sharding
    )

  def logits(self, x: jax.Array) -> jax.Array:
    """The blocks' output to logits: final norm, then the tied output embedding."""
    # T5's 1/sqrt(d_model), so that N(0, 1) embeddings give unit-scale logits at initialisation.
    return self.embed.attend(self.final_norm(x)) * x.shape[-1] ** -0.5

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed_tokens(tokens)
    if isinstance(self.blocks, Block):  # one Block of stacked parameters (scan_layers)
      x = _scan_blocks(self.blocks, x, self.remat, self.activation_sharding)
    else:
      for block in self.blocks:
        graphdef, params = nnx.split(block)
        x = _constrain(_layer(graphdef, self.remat)(params, x), self.activation_sharding)
    return self.logits(x)
