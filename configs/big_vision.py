"""Big Vision's Adafactor variant (ViT): momentum 0.9 kept in bfloat16, beta2 capped at 0.999.

No parameter scale and no clipping, factoring from 32 up, momentum before the
learning rate, which is absolute: adafactor_jax.presets.big_vision.
"""

from adafactor_jax.training.configs import default


def get_config():
  config = default.get_config()
  config.optimizer.name = "big_vision"  # its other arguments at the preset's defaults
  config.optimizer.learning_rate = 3e-3
  return config
