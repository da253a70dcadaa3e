"""A smoke run: the default job, shrunk to a tiny model and 40 steps (well under a minute).

It exercises everything a full run does (checkpoints, evaluation, metrics, plots,
TensorBoard, telemetry) and checks an installation: ``adafactor-train --config smoke``.
Its loss says nothing about the optimizer.
"""

from adafactor_jax.training.configs import default


def get_config():
  config = default.get_config()
  config.num_steps = 40
  config.log_every = 10
  config.eval_every = 20
  config.eval_batches = 2
  config.checkpoint_every = 20
  config.data.max_bytes = 1_000_000
  config.data.seq_len = 32
  config.data.batch_size = 8
  config.model.d_model = 32
  config.model.num_layers = 2
  config.model.num_heads = 2
  config.model.mlp_dim = 64
  return config
