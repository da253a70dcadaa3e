"""Parameter trees of well-known models, as nested dicts of float32 `jax.ShapeDtypeStruct`.

Shapes only: building a tree allocates nothing, so a step can be compiled (and its
memory read) for a model of any size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Tree = dict[str, Any]


def _leaf(*shape: int) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def _dense(d_in: int, d_out: int, *lead: int) -> Tree:
  return {"kernel": _leaf(*lead, d_in, d_out), "bias": _leaf(*lead, d_out)}


def _layer_norm(d: int, *lead: int) -> Tree:
  return {"scale": _leaf(*lead, d), "bias": _leaf(*lead, d)}


def t5(
  vocab: int = 32128,
  d_model: int = 512,
  d_ff: int = 2048,
  num_heads: int = 8,
  num_layers: int = 6,
  num_buckets: int = 32,
) -> Tree:
  """A T5 v1.0 encoder-decoder (HF naming); the defaults are t5-small, 60,506,624 params.

  Shared embedding, no biases, RMS-norm scales only, one relative attention
  bias (buckets, heads) per stack.
  """

  def attention() -> Tree:
    return {name: {"kernel": _leaf(d_model, d_model)} for name in ("q", "k", "v", "o")}

  def norm() -> Tree:
    return {"scale": _leaf(d_model)}

  def mlp() -> Tree:
    return {"wi": {"kernel": _leaf(d_model, d_ff)}, "wo": {"kernel": _leaf(d_ff, d_model)}}

  def stack(decoder: bool) -> Tree:
    layers = {}
    for i in range(num_layers):
      layer = {"self_attention": attention(), "self_attention_norm": norm()}
      if decoder:
        layer |= {"cross_attention": attention(), "cross_attention_norm": norm()}
      layers[f"block_{i}"] = layer | {"mlp": mlp(), "mlp_norm": norm()}
    bias = {"relative_attention_bias": {"embedding": _leaf(num_buckets, num_heads)}}
    return layers | bias | {"final_layer_norm": norm()}

  return {
    "shared": {"embedding": _leaf(vocab, d_model)},
    "encoder": stack(decoder=False),
    "decoder": stack(decoder=True),
  }


def gpt2(
  vocab: int = 50257,
  n_ctx: int = 1024,
  d_model: int = 768,
  n_layers: int = 12,
  stacked: bool = False,
) -> Tree:
  """GPT-2 (HF naming, tied head); the defaults are GPT-2 small, 124,439,808 params.

  With ``stacked``, every block leaf gets a leading axis of size ``n_layers``
  (one "h" block, as ``nn.scan`` / ``nnx.scan`` make it) instead of one block per layer.
  """

  def block(*lead: int) -> Tree:
    return {
      "ln_1": _layer_norm(d_model, *lead),
      "attn": {
        "c_attn": _dense(d_model, 3 * d_model, *lead),
        "c_proj": _dense(d_model, d_model, *lead),
      },
      "ln_2": _layer_norm(d_model, *lead),
      "mlp": {
        "c_fc": _dense(d_model, 4 * d_model, *lead),
        "c_proj": _dense(4 * d_model, d_model, *lead),
      },
    }

  blocks = block(n_layers) if stacked else {str(i): block() for i in range(n_layers)}
  return {
    "wte": {"embedding": _leaf(vocab, d_model)},
    "wpe": {"embedding": _leaf(n_ctx, d_model)},
    "h": blocks,
    "ln_f": _layer_norm(d_model),
  }


def vit(
  patch: int = 16,
  hidden: int = 768,
  mlp_dim: int = 3072,
  num_heads: int = 12,
  num_layers: int = 12,
  image_size: int = 224,
  num_classes: int = 1000,
) -> Tree:
  """A ViT (big_vision / Flax naming); the defaults are ViT-B/16, 86,567,656 params.

  Attention kernels keep their head axes, as ``nn.MultiHeadDotProductAttention``:
  query/key/value (hidden, heads, head_dim), out (heads, head_dim, hidden).
  """
  head_dim = hidden // num_heads
  tokens = (image_size // patch) ** 2 + 1

  def block() -> Tree:
    attention = {
      name: {"kernel": _leaf(hidden, num_heads, head_dim), "bias": _leaf(num_heads, head_dim)}
      for name in ("query", "key", "value")
    }
    attention["out"] = {"kernel": _leaf(num_heads, head_dim, hidden), "bias": _leaf(hidden)}
    return {
      "LayerNorm_0": _layer_norm(hidden),
      "MultiHeadDotProductAttention_1": attention,
      "LayerNorm_2": _layer_norm(hidden),
      "MlpBlock_3": {"Dense_0": _dense(hidden, mlp_dim), "Dense_1": _dense(mlp_dim, hidden)},
    }

  encoder: Tree = {f"encoderblock_{i}": block() for i in range(num_layers)}
  encoder["posembed_input"] = {"pos_embedding": _leaf(1, tokens, hidden)}
  encoder["encoder_norm"] = _layer_norm(hidden)
  return {
    "embedding": {"kernel": _leaf(patch, patch, 3, hidden), "bias": _leaf(hidden)},
    "cls": _leaf(1, 1, hidden),
    "Transformer": encoder,
    "head": _dense(hidden, num_classes),
  }


TREES: dict[str, Callable[[], Tree]] = {
  "t5_small": t5,
  "gpt2_124m": gpt2,
  "vit_b16": vit,
  "stacked": lambda: gpt2(stacked=True),
}
"""The benchmark's trees, by name (``stacked``: GPT-2 124M with scanned blocks)."""


def large_matrices(stacked: bool = False) -> Tree:
  """168M parameters in leaves too large to sit in a TPU core's on-chip memory: eight 4096 x 4096
  matrices (stacked: one 8 x 4096 x 4096 array, scanned layers), a 32768 x 1024 embedding and a
  bias of 4096. The TPU compiler's bytes for it are the HBM traffic of the update."""
  matrices = (
    {"layers": _leaf(8, 4096, 4096)} if stacked else {f"w{i}": _leaf(4096, 4096) for i in range(8)}
  )
  return matrices | {"embedding": _leaf(32768, 1024), "bias": _leaf(4096)}


EXTRA_TREES: dict[str, Callable[[], Tree]] = {
  "tiny": lambda: gpt2(vocab=256, n_ctx=64, d_model=128, n_layers=1),
  "large": large_matrices,
  "large_stacked": lambda: large_matrices(stacked=True),
}
"""Trees run only when named (``tiny``: 0.24M params, for smoke tests; ``large`` and
``large_stacked``: the TPU benchmark's trees of large leaves, see :func:`large_matrices`)."""

SWEEP: tuple[tuple[int, int, int], ...] = (
  # (d_model, n_layers, vocab) of GPT-like trees, n_ctx 1024: ~1M to ~500M params.
  (128, 3, 2048),
  (256, 4, 2048),
  (512, 4, 6144),
  (768, 8, 8192),
  (1024, 16, 50304),
  (1280, 22, 50304),
)


def sweep_tree(d_model: int, n_layers: int, vocab: int) -> Tree:
  """One size of the scaling sweep: a GPT-2-like tree."""
  return gpt2(vocab=vocab, n_ctx=1024, d_model=d_model, n_layers=n_layers)


def param_count(tree: Any) -> int:
  """The number of elements over a tree's array (or ShapeDtypeStruct) leaves."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or abstract arrays) in a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
