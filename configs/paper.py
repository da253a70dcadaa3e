"""The ablation rows of Shazeer & Stern (2018), Tables 2 and 3, on the default job.

Pick a row with ``--config configs/paper.py:<row>``. Each row changes only the
optimizer (or, for the embedding rows, the embedding's init scale) from the
paper's defaults, the ``defaults`` row: the default job with the paper's
relative step min(1e-2, 1/sqrt(t)) times the parameter's RMS, decay
1 - t^-0.8, update clipping at d = 1, factored, no momentum.

A fixed beta2 is Adam's bias-corrected beta2 written as a decay schedule:
beta2 (1 - beta2^(t-1)) / (1 - beta2^t) is close to min(beta2, 1 - 1/t), which
is ``decay_rate=1.0, beta2_cap=beta2``.
"""

from adafactor_jax.training.configs import default

PAPER = {  # the default job's optimizer with the paper's relative step, rather than a tuned one
  "optimizer.learning_rate": None,
  "optimizer.schedule": "constant",
  "optimizer.warmup_fraction": 0.0,
}
SLOW = {"optimizer.decay_rate": 1.0, "optimizer.beta2_cap": 0.999}
WARMUP = {"optimizer.learning_rate": 1e-2, "optimizer.warmup_steps": 100}
SMALL_EMBEDDING = {"model.embed_init_scale": 0.05}

ROWS = {
  "defaults": {},
  "momentum": {"optimizer.momentum": 0.9},
  "beta2_fast": {"optimizer.decay_rate": 1.0, "optimizer.beta2_cap": 0.9},
  "beta2_slow": SLOW,
  "beta2_slow_no_clipping": {**SLOW, "optimizer.clipping_threshold": None},
  "beta2_slow_no_clipping_warmup": {**SLOW, "optimizer.clipping_threshold": None, **WARMUP},
  "no_clipping": {"optimizer.clipping_threshold": None},
  "warmup": WARMUP,
  "unfactored": {"optimizer.factored": False},
  "absolute_step": {"optimizer.multiply_by_parameter_scale": False},
  "small_embedding": SMALL_EMBEDDING,
  "small_embedding_absolute_step": {
    **SMALL_EMBEDDING,
    "optimizer.multiply_by_parameter_scale": False,
  },
}


def get_config(row: str = "defaults"):
  if row not in ROWS:
    raise ValueError(f"configs/paper.py: unknown row {row!r}; the rows are {', '.join(ROWS)}.")
  config = default.get_config()
  for key, value in {**PAPER, **ROWS[row]}.items():
    section, name = key.split(".")
    with config[section].ignore_type():  # None for a float field
      config[section][name] = value
  return config
