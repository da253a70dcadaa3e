"""Big Vision's Adafactor variant (ViT): momentum 0.9 kept in bfloat16, beta2 capped at 0.999.

No parameter scale and no clipping, factoring from 32 up, momentum before the
learning rate, which is absolute: adafactor_jax.presets.big_vision.
"""

from adafactor_jax.training.configs import default


def get_config():
  config = default.get_config()
  opt = config.optimizer
  opt.name = "big_vision"
  opt.learning_rate = 3e-3
  opt.momentum = 0.9
  opt.momentum_dtype = "bfloat16"
  opt.beta2_cap = 0.999
  opt.min_dim_size_to_factor = 32
  return config
