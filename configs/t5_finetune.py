"""T5-style fine-tuning: Adafactor with a constant absolute learning rate of 1e-3.

T5 fine-tunes with ``constant learning rate 0.001`` and no relative step
(adafactor_jax.presets.t5x: parameter scale and clipping on, 1 - t^-0.8).
Start from an existing run's checkpoint by copying its workdir.
"""

from adafactor_jax.training.configs import default


def get_config():
  config = default.get_config()
  config.optimizer.name = "t5x"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_fraction = 0.0
  return config
