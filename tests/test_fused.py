"""fused_train_step: the unfused step's numerics, the float64 reference's, less memory, and a
clear refusal of what needs every gradient at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from benchmarks import gpt, memory
from tests.conftest import relative_error
from tests.reference import Options, Reference
from tests.test_telemetry import fused_figures_from_parts

CONFIG = gpt.Config(d_model=128, n_layers=3, vocab=256, seq_len=32, batch=2)
STEPS = 4
# Parameter scale, clipping and momentum on. An absolute step of 0.1 (times the parameter
# scale) moves each weight ~1% of its RMS a step, so that storing the parameters in float32
# (an ulp is 6e-8 of them) does not swamp a comparison relative to the movement.
OPTIONS = {"learning_rate": 0.1, "momentum": 0.9, "clipping_threshold": 1.0}


def _layer(p, x):
  """gpt.layer with the key bias held by jax.lax.stop_gradient. Its gradient is zero in exact
  arithmetic (softmax is invariant to a shift shared by all keys), and rounding noise in
  float, which Adafactor scales to unit size, so that no two programs would agree on it nor,
  through its clipping RMS, on the rest of c_attn's bias. Held, it is exactly zero in every
  program, and every element of every leaf is compared."""
  c_attn = p["attn"]["c_attn"]
  q, k, v = jnp.split(c_attn["bias"], 3, axis=-1)
  bias = jnp.concatenate([q, jax.lax.stop_gradient(k), v], axis=-1)
  return gpt.layer({**p, "attn": {**p["attn"], "c_attn": {**c_attn, "bias": bias}}}, x)


def _embed64(rest, tokens):
  """The model in float64 (parameters stay float32, gradients come back float32): the
  fused and unfused programs then round their float32 gradients alike, so what the
  comparison sees is the fused step, not XLA's float32 reassociation."""
  return gpt.embed(rest, tokens).astype(jnp.float64)


def _head64(rest, x, tokens):
  return gpt.head(jax.tree.map(lambda p: p.astype(jnp.float64), rest), x, tokens)


def _loss64(params, tokens):
  layers, rest = params

  def step(x, p):
    return jax.checkpoint(_layer)(p, x), None

  x, _ = jax.lax.scan(step, _embed64(rest, tokens), layers)
  return _head64(rest, x, tokens)


def _named(params) -> dict[str, np.ndarray]:
  """(layers, rest) as one flat dict of float64 arrays, by path."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(x, np.float64)
    for path, x in jax.tree_util.tree_leaves_with_path(params)
  }


def _fused_run(tx, steps: int = STEPS, dtype=jnp.float32):
  """The fused step from gpt.init_params stored in ``dtype``, in float64 compute;
  (start, params per step, losses, final state)."""
  start = jax.tree.map(lambda x: x.astype(dtype), gpt.init_params(CONFIG))
  layers, rest = start
  fused = adafactor_jax.fused_train_step(tx, embed=_embed64, layer=_layer, head=_head64)
  state = fused.init(layers, rest)
  step = jax.jit(fused.step, donate_argnums=(2,))
  trajectory, losses = [], []
  for t in range(steps):
    layers, rest, state, loss = step(layers, rest, state, gpt.random_batch(CONFIG, t))
    trajectory.append((layers, rest))
    losses.append(float(loss))
  return start, trajectory, losses, state


def test_equals_the_unfused_step_with_per_layer_statistics():
  """Against jax.grad of the whole loss and adafactor with the stacked axis a batch axis
  (per-layer statistics, clipping and parameter scale): to 1e-6 of the movement, every
  step, every element of every leaf (measured: 4.4e-7). The model runs in float64: in
  float32, XLA rounds the two programs' gradients differently (4e-7 apart), which measured
  1.1e-6."""
  with jax.enable_x64(True):
    start, fused, fused_losses, _ = _fused_run(adafactor_jax.adafactor(**OPTIONS))
    tx = adafactor_jax.adafactor(**OPTIONS, factor_dims=gpt.factor_dims)

    @jax.jit
    def unfused_step(params, state, tokens):
      loss, grads = jax.value_and_grad(_loss64)(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    params, state = start, tx.init(start)
    for t in range(STEPS):
      params, state, loss = unfused_step(params, state, gpt.random_batch(CONFIG, t))
      assert float(loss) == fused_losses[t]
      expected, actual = _named(params), _named(fused[t])
      errors = relative_error(actual, expected, _named(start))
      assert max(errors.values()) < 1e-6, (t, max(errors, key=errors.get), max(errors.values()))
  for leaf in jax.tree.leaves(fused[-1]):
    assert leaf.dtype == jnp.float32


def test_matches_the_float64_reference_layer_by_layer():
  """tests/reference.py with each layer's parameters as parameters of their own, fed the
  gradients at the fused step's parameters, stored in float64 here so that the comparison
  sees the step, not float32 storage (an ulp of a weight is ~6e-6 of a step's movement):
  to 1e-6 of the movement (measured 1.7e-7, every leaf whole)."""
  with jax.enable_x64(True):
    start, fused, _, _ = _fused_run(adafactor_jax.adafactor(**OPTIONS), dtype=jnp.float64)
    grad = jax.jit(jax.grad(_loss64))

    def per_layer(named: dict) -> dict:
      out = {}
      for path, x in named.items():
        if path.startswith("0/"):
          out |= {f"{path}#{i}": x[i] for i in range(CONFIG.n_layers)}
        else:
          out[path] = x
      return out

    reference = Reference(Options(**OPTIONS), per_layer(_named(start)))
    params = start
    for t in range(STEPS):
      grads = per_layer(_named(grad(params, gpt.random_batch(CONFIG, t))))
      reference.step(grads)
      params = fused[t]
    actual, initial = per_layer(_named(params)), per_layer(_named(start))
    errors = relative_error(actual, reference.params, initial)
    assert max(errors.values()) < 1e-6, (max(errors, key=errors.get), max(errors.values()))


def test_state_is_per_layer_and_int8_momentum_works_too():
  layers, rest = gpt.init_params(CONFIG)
  tx = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.int8)
  fused = adafactor_jax.fused_train_step(tx, embed=gpt.embed, layer=gpt.layer, head=gpt.head)
  state = jax.jit(fused.init)(layers, rest)
  assert isinstance(state, adafactor_jax.FusedState)
  statistics, *_, momentum, _ = state.layers
  assert statistics.count.shape == (CONFIG.n_layers,)
  assert statistics.v_row["mlp"]["c_fc"]["kernel"].shape == (CONFIG.n_layers, 128, 1)
  assert momentum.momentum["mlp"]["c_fc"]["kernel"].dtype == jnp.int8
  # A block per row of 512 (its longest axis) of each layer.
  assert momentum.scale["mlp"]["c_fc"]["kernel"].shape == (CONFIG.n_layers, 128, 1)
  step = jax.jit(fused.step, donate_argnums=(0, 1, 2))
  losses = []
  for _ in range(3):
    layers, rest, state, loss = step(layers, rest, state, gpt.random_batch(CONFIG, 0))
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  assert [int(c) for c in state.layers[0].count] == [3] * CONFIG.n_layers
  assert int(state.rest[0].count) == 3


@pytest.mark.parametrize(
  "tx, fragment",
  [
    (adafactor_jax.adafactor(skip_nonfinite=True), "cannot skip a whole step.*skip_nonfinite"),
    (
      optax.chain(optax.clip_by_global_norm(1.0), adafactor_jax.adafactor()),
      "the update of '.*' reads those of '.*' \\(a global-norm clip",
    ),
    (optax.MultiSteps(adafactor_jax.adafactor(), 4), "reads those of"),
  ],
  ids=["skip_nonfinite", "global-norm clip", "MultiSteps"],
)
def test_what_needs_every_gradient_at_once_is_refused(tx, fragment):
  fused = adafactor_jax.fused_train_step(tx, embed=gpt.embed, layer=gpt.layer, head=gpt.head)
  with pytest.raises(ValueError, match=fragment):
    fused.init(*gpt.init_params(CONFIG))


def test_per_parameter_transformations_are_accepted():
  for tx in (
    adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.bfloat16, weight_decay_rate=1e-3),
    optax.chain(optax.clip(1.0), optax.adamw(1e-3)),
    optax.inject_hyperparams(adafactor_jax.adafactor)(learning_rate=1e-2),
  ):
    fused = adafactor_jax.fused_train_step(tx, embed=gpt.embed, layer=gpt.layer, head=gpt.head)
    fused.init(*gpt.init_params(CONFIG))


def test_peak_memory_is_at_most_0_7_of_the_unfused_steps():
  """XLA's memory analysis of the whole train step, compiled abstractly, on a small
  GPT-2-like model whose layers outweigh its embeddings: the fused step never holds the
  layers' gradients, only one layer's. (Measured: 0.64.)"""
  config = gpt.Config(d_model=256, n_layers=8, vocab=1024, seq_len=64, batch=2)
  peaks = {
    name: memory.peak_bytes(memory.compile_train_step(name, config, jnp.float32))["peak"]
    for name in ("adafactor_jax", "adafactor_jax_fused", "sgd")
  }
  assert peaks["adafactor_jax_fused"] <= 0.7 * peaks["adafactor_jax"], peaks
  # The unfused Adafactor sits at SGD's peak: parameters, every gradient, activations.
  assert peaks["adafactor_jax"] <= 1.05 * peaks["sgd"], peaks
  layer_bytes = 4 * sum(np.prod(x.shape) for x in jax.tree.leaves(gpt.param_shapes(config)[0]))
  assert peaks["adafactor_jax"] - peaks["adafactor_jax_fused"] >= 0.8 * layer_bytes, peaks


def test_a_flax_nnx_model_with_a_scanned_block_trains_fused():
  """The README's recipe: split the model, merge one block's graphdef for ``layer``, and
  ``nnx.update`` the model with the new parameters."""
  from flax import nnx

  d, vocab, n_layers = 64, 128, 3

  class Block(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(d, rngs=rngs)
      self.mlp_in = nnx.Linear(d, 4 * d, rngs=rngs)
      self.mlp_out = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x):
      return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm(x))))

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.embed = nnx.Embed(vocab, d, rngs=rngs)

      @nnx.split_rngs(splits=n_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def blocks(rngs):
        return Block(rngs)

      self.blocks = blocks(rngs)
      self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(x, block):
        return block(x)

      return self.embed.attend(self.norm(run(self.embed(tokens), self.blocks)))

  def next_token_loss(logits, tokens):
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1))

  model = Model(nnx.Rngs(0))
  _, params = nnx.split(model, nnx.Param)
  layers = params["blocks"]
  rest = {k: v for k, v in params.items() if k != "blocks"}
  block_def = nnx.graphdef(Block(nnx.Rngs(1)))
  embed_def, norm_def = nnx.graphdef(model.embed), nnx.graphdef(model.norm)

  def embed(rest, tokens):
    return nnx.merge(embed_def, rest["embed"])(tokens[:, :-1])

  def layer(p, h):
    return nnx.merge(block_def, p)(h)

  def head(rest, h, tokens):
    out = nnx.merge(embed_def, rest["embed"]).attend(nnx.merge(norm_def, rest["norm"])(h))
    return next_token_loss(out, tokens)

  fused = adafactor_jax.fused_train_step(
    adafactor_jax.adafactor(momentum=0.9), embed=embed, layer=layer, head=head
  )
  state = fused.init(layers, rest)
  step = jax.jit(fused.step)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (4, 17)), jnp.int32)
  before = float(next_token_loss(model(tokens[:, :-1]), tokens))
  losses = []
  for _ in range(5):
    layers, rest, state, loss = step(layers, rest, state, tokens)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(before, rel=1e-6)  # the same model, split
  nnx.update(model, {**rest, "blocks": layers})
  after = float(next_token_loss(model(tokens[:, :-1]), tokens))
  assert after < losses[-1] < losses[0]


def test_the_readmes_worked_example_trains():
  from tests.readme import code_blocks

  # The other example (tests/training/test_fused_job.py) is on the training side's model.
  (example,) = [
    block for block in code_blocks("python") if "fused_train_step" in block and "nnx" not in block
  ]
  namespace: dict = {}
  exec(compile(example, "README.md", "exec"), namespace)
  losses = namespace["losses"]
  assert len(losses) == 20 and losses[-1] < 0.8 * losses[0], losses


def test_telemetry_of_a_fused_state_names_each_layer_by_its_index():
  """telemetry(FusedState) gives each layer's figures under its index, the figures of that
  layer's state alone, beside rest's, on the host and inside jit; the stacked .layers alone
  are refused, naming what to pass."""
  layers, rest = gpt.init_params(CONFIG)
  tx = adafactor_jax.adafactor(telemetry=True)
  fused = adafactor_jax.fused_train_step(tx, embed=gpt.embed, layer=gpt.layer, head=gpt.head)
  state = fused.init(layers, rest)
  step = jax.jit(fused.step)
  layers, rest, state, _ = step(layers, rest, state, gpt.random_batch(CONFIG, 0))
  before_second = jax.tree.map(np.asarray, layers)
  layers, rest, state, _ = step(layers, rest, state, gpt.random_batch(CONFIG, 1))
  figures = adafactor_jax.telemetry(state)
  expected = fused_figures_from_parts(state)
  assert figures.keys() == expected.keys()
  assert all(figures[name] == expected[name] for name in figures)
  # Each layer's parameter scale is the RMS of its own kernel before the step (at least 1e-3).
  for i in range(CONFIG.n_layers):
    kernel = np.asarray(before_second["mlp"]["c_fc"]["kernel"][i], np.float64)
    rms = max(1e-3, np.sqrt(np.mean(kernel**2)))
    assert figures[f"mlp/c_fc/kernel[{i}]/parameter_scale"] == pytest.approx(rms, rel=1e-5)
  assert figures["beta2"] == pytest.approx(1 - 2**-0.8)
  traced = jax.jit(adafactor_jax.telemetry)(state)
  assert traced.keys() == figures.keys()
  assert all(np.asarray(traced[name]) == figures[name] for name in figures)
  with pytest.raises(ValueError, match=r"pass fused_train_step's FusedState whole"):
    adafactor_jax.telemetry(state.layers)
