"""The default job: a small byte-level Transformer LM on the Python stdlib, with Adafactor.

Adafactor as the fair comparison (adafactor-compare --suite fair) found it best on this job: the
paper's update (factored, 1 - t^-0.8, clipping, parameter scale, no momentum) with a learning
rate of 4e-2 times each parameter's scale, warmed up over 5% of the run, then cosine decay;
configs/paper.py:defaults has the paper's relative step instead. About 4 minutes on 2 CPU cores.

Every field any config may set is defined here, but for the optimizer's own arguments (see
`optimizer` below): other configs start from this one, and a key that is not here is an error.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_steps = 1000
  config.log_every = 50
  config.eval_every = 200
  config.eval_batches = 16
  config.checkpoint_every = 250
  config.keep_checkpoints = 2

  config.data = ml_collections.ConfigDict()
  config.data.corpus = ""  # a directory of text files or one file; "" is the Python stdlib
  config.data.suffixes = (".py",)
  config.data.max_bytes = 16_000_000
  config.data.eval_fraction = 0.05
  config.data.seq_len = 128
  config.data.batch_size = 16

  config.model = ml_collections.ConfigDict()
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.embed_init_scale = 1.0
  config.model.param_dtype = "float32"
  # The dtype the layers compute in ("bfloat16" on TPUs); None: the parameters'. The loss is
  # taken in float32 either way.
  config.model.activation_dtype = config_dict.placeholder(str)
  # Each block recomputed in the backward pass, which keeps only the blocks' inputs.
  config.model.remat = False
  # The blocks as one stack scanned over a leading 'layers' axis (optimizer.fused_backward
  # needs it); its checkpoints are not an unscanned model's.
  config.model.scan_layers = False

  # The device mesh over every device of every process: -1 takes all the remaining devices,
  # so the default is data parallelism over all of them (one device: a mesh of one).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.model = 1
  # Logical axis name (model.py) -> mesh axis, or None for replicated; names not listed are
  # replicated. 'embed' over 'data' shards every parameter over the data axis too (FSDP).
  config.mesh.logical_axis_rules = (
    ("batch", "data"),
    ("embed", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("joined_kv", "model"),
  )

  # `name` picks the optimizer: "adafactor" (adafactor_jax.adafactor), "big_vision", "t5x" or
  # "stable_adamw" (adafactor_jax.presets), "adamw" (optax.adamw) or "optax_adafactor"
  # (optax.adafactor).
  # Besides the keys below, the trainer's, the section holds keyword arguments of that function
  # (e.g. decay_rate, clipping_threshold, momentum, momentum_dtype for "adafactor"; b1, b2 for
  # "adamw"): every one left out takes the function's default, and config.json records it. A key
  # the chosen optimizer does not take is refused.
  opt = config.optimizer = ml_collections.ConfigDict()
  opt.name = "adafactor"
  # None: the paper's relative step size rho_t = min(1e-2, 1/sqrt(t))
  opt.learning_rate = 4e-2
  opt.schedule = "cosine"  # with a learning rate: "constant", "cosine" or "rsqrt"
  # Linear warmup of the learning rate schedule, in steps or as a fraction of num_steps
  # (rounded; it follows --config.num_steps): one of them.
  opt.warmup_steps = 0
  opt.warmup_fraction = 0.05
  # Decoupled weight decay, for every optimizer as optax.adamw's: X <- X - lr_t * wd * X, with
  # lr_t the learning rate schedule (Adafactor's relative step size rho_t without one).
  opt.weight_decay = config_dict.placeholder(float)
  # Each layer's update applied inside the backward pass (adafactor_jax.fused_train_step), so
  # at most one layer's gradient exists at a time: needs model.scan_layers and an optimizer
  # that updates each parameter from its own gradient ("adafactor", no skip_nonfinite).
  opt.fused_backward = False
  # Clip the gradient by its global norm before the optimizer (optax.clip_by_global_norm), as
  # nanoGPT and MaxText clip AdamW's at 1.0; any optimizer; None: no clipping. The job records
  # the global norm before clipping (and, with this key, the share of steps clipped) every
  # log_every steps. Not with fused_backward, whose step never holds the whole gradient.
  opt.clip_global_norm = config_dict.placeholder(float)
  opt.stochastic_rounding = False  # round bfloat16/float16 params stochastically, any optimizer
  opt.rounding_seed = 0
  # Record the figures each step computes anyway (adafactor_jax.telemetry): RMS(U), clipping,
  # parameter scale, beta2, step size. Read at log steps only, into metrics.jsonl, optimizer.png
  # and TensorBoard. The Adafactors only: optax's record none (configs/adamw.py sets False).
  opt.telemetry = True
  # Switching optimizers mid-run: the name of the optimizer whose checkpoints the workdir
  # holds (e.g. "adamw"); the run resumes there with this optimizer, its state converted
  # (adafactor_jax.warm_start_state) or, with warm_start False, started afresh.
  opt.switch_from = config_dict.placeholder(str)
  opt.warm_start = True
  return config
