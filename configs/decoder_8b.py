"""An 8B-parameter decoder for a TPU pod: Llama-3-8B's shapes, FSDP over 'data', 4-way tensor
parallelism over 'model'.

As configs/decoder_1b.py (sequence 2048, bfloat16 activations, remat, scanned blocks, a byte
vocabulary), with d_model 4096, 32 layers, 32 heads of 128 and an MLP of 21504 (Llama's
14336 times 1.5, for two matrices where SwiGLU has three): 7.79B parameters. The mesh is
('data', 'model') = (chips / 4, 4): the MLP, attention and vocabulary axes over 'model', every
parameter's 'embed' axis over 'data'::

  adafactor-train --config decoder_8b --topology v5e:16x16 --compile_only
"""

from adafactor_jax.training.configs import decoder_1b


def get_config():
  config = decoder_1b.get_config()
  config.model.d_model = 4096
  config.model.num_layers = 32
  config.model.mlp_dim = 21504
  config.mesh.model = 4
  return config
