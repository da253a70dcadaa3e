"""AdamW baseline on the default job: linear warmup (the default 5% of the run), then cosine decay.

The fair comparison sweeps its learning rate (adafactor-compare --suite fair).
"""

from adafactor_jax.training.configs import default


def get_config():
  config = default.get_config()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.telemetry = False  # optax.adamw records no telemetry
  return config
