"""A short demo: fit a small MLP with Adafactor and AdamW, and compare memory.

Run with ``python -m adafactor_jax.demo [--steps N]``. The data is a synthetic
teacher network, made on the spot: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import adafactor_jax


def init_mlp(key: jax.Array, sizes: list[int]) -> dict:
  params = {}
  for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    key, sub = jax.random.split(key)
    params[f"layer{i}"] = {
      "kernel": jax.random.normal(sub, (n_in, n_out)) / jnp.sqrt(n_in),
      "bias": jnp.zeros((n_out,)),
    }
  return params


def mlp(params: dict, x: jax.Array) -> jax.Array:
  *hidden, last = params.values()
  for layer in hidden:
    x = jax.nn.gelu(x @ layer["kernel"] + layer["bias"])
  return x @ last["kernel"] + last["bias"]


def train(tx: optax.GradientTransformation, steps: int, seed: int = 0) -> tuple[list, int]:
  sizes = [64, 512, 512, 16]
  teacher = init_mlp(jax.random.PRNGKey(1000), sizes)
  params = init_mlp(jax.random.PRNGKey(seed), sizes)
  state = tx.init(params)

  def loss_fn(params, x):
    return jnp.mean(jnp.square(mlp(params, x) - mlp(teacher, x)))

  @jax.jit
  def step(params, state, key):
    x = jax.random.normal(key, (256, sizes[0]))
    loss, grads = jax.value_and_grad(loss_fn)(params, x)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for i in range(steps):
    params, state, loss = step(params, state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  return losses, state_bytes


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  optimizers = {
    "adafactor (paper defaults)": adafactor_jax.adafactor(),
    "adafactor (lr=1e-2, momentum 0.9 bf16)": adafactor_jax.adafactor(
      learning_rate=1e-2, momentum=0.9, momentum_dtype=jnp.bfloat16
    ),
    "adamw (lr=1e-3)": optax.adamw(1e-3),
  }
  print(f"{'optimizer':40} {'first loss':>10} {'final loss':>10} {'state bytes':>12} {'time':>7}")
  for name, tx in optimizers.items():
    start = time.perf_counter()
    losses, state_bytes = train(tx, args.steps)
    elapsed = time.perf_counter() - start
    final = sum(losses[-10:]) / len(losses[-10:])
    print(f"{name:40} {losses[0]:10.4f} {final:10.4f} {state_bytes:12,d} {elapsed:6.1f}s")


if __name__ == "__main__":
  main()
