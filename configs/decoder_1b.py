"""A 1B-parameter decoder for a TPU pod: Llama-3.2-1B's shapes, sequence 2048, FSDP over 'data'.

d_model 2048, 16 layers, 32 heads of 64; the MLP's hidden width 12288 is Llama's 8192 times
1.5, since this model's GELU MLP has two matrices where Llama's SwiGLU has three (the same
parameters and FLOPs). The vocabulary is the job's bytes (256), so nearly all of its 1.07B
parameters are in the blocks. bfloat16 activations, float32 parameters and optimizer state,
each block rematerialised in the backward pass, the blocks scanned. Every parameter and the
batch are sharded over all the chips ('data'; ``--config.mesh.model`` adds tensor parallelism
through the logical rules). Check that a pod run fits before paying for one::

  adafactor-train --config decoder_1b --topology v5e:16x16 --compile_only
"""

from adafactor_jax.training.configs import default


def get_config():
  config = default.get_config()
  config.num_steps = 10_000
  config.log_every = 100
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.data.seq_len = 2048
  config.data.batch_size = 256  # 0.5M tokens a step
  config.model.d_model = 2048
  config.model.num_layers = 16
  config.model.num_heads = 32
  config.model.mlp_dim = 12288
  config.model.activation_dtype = "bfloat16"
  config.model.remat = True
  config.model.scan_layers = True
  return config
