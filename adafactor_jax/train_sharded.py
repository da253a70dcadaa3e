"""Trains the Transformer LM sharded on a device mesh, on one host or several.

The parameters are sharded by their logical axis names (``model.py``) through
``LOGICAL_AXIS_RULES``; Adafactor chooses its factored axes from the same names
(``adafactor_jax.logical_factor_dims``); ``jax.jit(tx.init)`` puts each
statistic on the devices of its parameter, and ``adafactor_jax.state_shardings``
gives the train step its shardings before it is compiled. The data batch is
sharded over the 'data' mesh axis.

One process, 8 simulated CPU devices, a 2 x 4 mesh::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m adafactor_jax.train_sharded

Two processes on this machine, 4 devices each, over ``jax.distributed`` (gloo
collectives on CPU; start both)::

  export XLA_FLAGS=--xla_force_host_platform_device_count=4
  python -m adafactor_jax.train_sharded --num_processes 2 --process_id 0 &
  python -m adafactor_jax.train_sharded --num_processes 2 --process_id 1

``--out file.npz`` writes the losses and the final parameters (process 0).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import adafactor_jax
from adafactor_jax import input_pipeline, train
from adafactor_jax._checks import path_name

LOGICAL_AXIS_RULES = (
  ("batch", "data"),
  ("embed", "data"),  # FSDP: parameters sharded over the data axis too
  ("vocab", "model"),
  ("mlp", "model"),
  ("joined_kv", "model"),
)
"""Logical axis name -> mesh axis; names not listed are replicated."""

_COLLECTIVE = re.compile(
  r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
  r"(?:-start)?\("
)


def mesh_spec(names: PartitionSpec | None) -> PartitionSpec:
  """A PartitionSpec of mesh axes for a spec of logical names."""
  rules = dict(LOGICAL_AXIS_RULES)
  return PartitionSpec(*(rules.get(name) for name in (names or ())))


def collectives(hlo_text: str) -> list[tuple[str, str]]:
  """(op, result type) of every cross-device collective in compiled HLO text."""
  return [(op, result) for result, op in _COLLECTIVE.findall(hlo_text)]


def per_device_bytes(tree: Any) -> int:
  """Bytes that the first device holds of a tree of sharded arrays."""
  device = jax.local_devices()[0]
  return sum(
    shard.data.nbytes
    for x in jax.tree.leaves(tree)
    for shard in x.addressable_shards
    if shard.device == device
  )


def config(num_steps: int) -> Any:
  cfg = train.default_config.get_config()
  cfg.num_steps = num_steps
  cfg.data.max_bytes = 2_000_000
  cfg.data.batch_size = 16
  cfg.data.seq_len = 64
  return cfg


def run(mesh_shape: tuple[int, int], num_steps: int) -> dict[str, Any]:
  """Trains ``num_steps`` on a (data, model) mesh; returns losses and params."""
  cfg = config(num_steps)
  # Auto axes: XLA shards the model's activations; the optimizer follows
  # Explicit axes as well (tests/test_sharding.py).
  mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  model = train.create_model(cfg)
  graphdef, host_params = nnx.split(model)
  axes = nnx.get_partition_spec(host_params)
  param_shardings = jax.tree.map(
    lambda spec: NamedSharding(mesh, mesh_spec(spec)),
    axes,
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )
  # Every process built the same host params (one seed); each puts its shards.
  params = jax.tree.map(
    lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: np.asarray(x)[index]),
    host_params,
    param_shardings,
  )
  tx = adafactor_jax.adafactor(
    learning_rate=1e-2, factor_dims=adafactor_jax.logical_factor_dims(axes)
  )
  opt_state = jax.jit(tx.init)(params)  # follows the params' shardings
  opt_shardings = adafactor_jax.state_shardings(tx, params, param_shardings)

  corpus = input_pipeline.load_corpus(max_bytes=cfg.data.max_bytes, min_bytes=cfg.data.seq_len + 2)
  replicated = NamedSharding(mesh, PartitionSpec())
  text = jax.make_array_from_callback(corpus.train.shape, replicated, lambda i: corpus.train[i])
  batch_sharding = NamedSharding(mesh, mesh_spec(PartitionSpec("batch")))
  loss_fn = functools.partial(train.next_token_loss, graphdef)

  @functools.partial(
    jax.jit,
    in_shardings=(param_shardings, opt_shardings, replicated),
    out_shardings=(param_shardings, opt_shardings, replicated),
    donate_argnums=(0, 1),
  )
  def train_step(params, opt_state, step):
    batch = input_pipeline.batch_at(
      text, jax.random.key(cfg.seed), step, cfg.data.batch_size, cfg.data.seq_len
    )
    batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @functools.partial(jax.jit, in_shardings=(opt_shardings, param_shardings, param_shardings))
  def update(opt_state, grads, params):
    return tx.update(grads, opt_state, params)

  update_hlo = update.lower(opt_state, params, params).compile().as_text()
  losses = []
  for step in range(num_steps):
    params, opt_state, loss = train_step(params, opt_state, jnp.asarray(step))
    losses.append(float(loss))
  gathered = multihost_utils.process_allgather(params, tiled=True)
  return {
    "losses": losses,
    "params": named_leaves(jax.tree.map(np.asarray, gathered)),
    "param_bytes_per_device": per_device_bytes(params),
    "state_bytes_per_device": per_device_bytes(opt_state),
    "update_collectives": collectives(update_hlo),
  }


def named_leaves(tree: Any) -> dict[str, Any]:
  """A tree's leaves by their '/'-joined paths."""
  return {path_name(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mesh", default="2x4", help="data x model devices, e.g. 2x4, 8x1, 1x1")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--coordinator", default="127.0.0.1:12355")
  parser.add_argument("--out", default="", help="an .npz for losses and final params")
  args = parser.parse_args(argv)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      args.coordinator, args.num_processes, args.process_id, initialization_timeout=60
    )
  mesh_shape = tuple(int(n) for n in args.mesh.split("x"))
  result = run(mesh_shape, args.steps)
  if jax.process_index() == 0:
    summary = {k: v for k, v in result.items() if k != "params"}
    print(json.dumps(summary, indent=1))
    if args.out:
      np.savez(args.out, losses=np.asarray(result["losses"]), **result["params"])
  if args.num_processes > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
