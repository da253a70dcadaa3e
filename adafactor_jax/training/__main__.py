"""``python -m adafactor_jax.training``: the same as ``adafactor-train``."""

from adafactor_jax.training import train_cli

train_cli()
