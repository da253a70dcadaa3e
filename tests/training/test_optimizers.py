"""Config to optimizer (optimizers.py): the schedule, the optimizer by name with the rest of the
section as its keyword arguments, and the keys the trainer gives one meaning for every optimizer."""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax.training import config as config_lib
from adafactor_jax.training import main, optimizers, train
from adafactor_jax.training.configs import adamw, big_vision, default, paper, t5_finetune
from tests.training.test_train import PROG, assert_refused


def test_learning_rate_schedule_warms_up_then_decays():
  assert optimizers.learning_rate_schedule(paper.get_config().optimizer, 100) is None  # rho_t
  opt = default.get_config().optimizer
  opt.learning_rate = 1e-2
  for warmup_steps, warmup_fraction, warmup in ((10, 0.0, 10), (0, 0.05, 5), (0, 0.0, 0)):
    opt.warmup_steps, opt.warmup_fraction = warmup_steps, warmup_fraction
    schedule = optimizers.learning_rate_schedule(opt, 100)
    values = np.array([float(schedule(t)) for t in range(101)])
    if warmup:
      assert 0 < values[0] < values[warmup // 2] < values[warmup]
      assert np.all(np.diff(values[: warmup + 1]) > 0)
    assert values[warmup] == pytest.approx(1e-2)
    assert np.all(np.diff(values[warmup:]) <= 0)
    assert values[100] < 0.5 * values[warmup]
  # The fraction follows num_steps: 5% of 1000 steps is 50.
  opt.warmup_fraction = 0.05
  values = [float(optimizers.learning_rate_schedule(opt, 1000)(t)) for t in (49, 50, 51)]
  assert values[0] < values[1] == pytest.approx(1e-2) and values[2] < values[1]
  bad = [
    ({"warmup_steps": 100, "warmup_fraction": 0.0}, "'optimizer.warmup_steps' must be in [0, num"),
    ({"warmup_steps": 0, "warmup_fraction": 1.0}, "'optimizer.warmup_fraction' must be in [0, 1)"),
    ({"warmup_steps": 10, "warmup_fraction": 0.05}, "(10) and 'optimizer.warmup_fraction' (0.05)"),
  ]
  for changes, message in bad:
    opt.update(changes)
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
      optimizers.learning_rate_schedule(opt, 100)
  opt.update({"learning_rate": None, "warmup_steps": 0, "schedule": "constant"})
  with pytest.raises(config_lib.ConfigError, match="'optimizer.warmup_fraction' need"):
    optimizers.learning_rate_schedule(opt, 100)


def test_every_shipped_config_resolves_and_builds_its_optimizer():
  configs = {
    "default": default.get_config(),
    "adamw": adamw.get_config(),
    "big_vision": big_vision.get_config(),
    "t5_finetune": t5_finetune.get_config(),
    **{f"paper:{row}": paper.get_config(row) for row in paper.ROWS},
  }
  names = set()
  for config in configs.values():
    resolved = config_lib.resolve_config(config)
    optimizers.create_optimizer(resolved.optimizer, resolved.num_steps)
    names.add(resolved.optimizer.name)
  assert names == {"adafactor", "adamw", "big_vision", "t5x"}
  assert paper.get_config("no_clipping").optimizer.clipping_threshold is None


@pytest.mark.parametrize(
  ("name", "learning_rate", "step_size"),
  [
    ("adafactor", None, 1e-2),  # the relative step rho_1 = min(1e-2, 1)
    ("adafactor", 3e-3, 3e-3),
    ("t5x", 3e-3, 3e-3),
    ("big_vision", 3e-3, 3e-3),
    ("adamw", 3e-3, 3e-3),
    ("stable_adamw", 3e-3, 3e-3),  # a zero gradient: RMS 0, nothing clipped
  ],
)
def test_weight_decay_means_adamws_for_every_optimizer(name, learning_rate, step_size):
  """optimizer.weight_decay = 0.1: with a zero gradient every optimizer's first step is
  X <- X (1 - lr * 0.1), as optax.adamw's (the library's weight_decay_rate would be 1 - 0.1)."""
  config = default.get_config()  # the optimizer's arguments at their defaults (momentum 0.9
  changes = {  # for big_vision, whose momentum is not optional)
    "name": name,
    "learning_rate": learning_rate,
    "weight_decay": 0.1,
    "telemetry": name not in optimizers.WITHOUT_TELEMETRY,
    "schedule": "constant",  # the first step at the full learning rate
    "warmup_fraction": 0.0,
  }
  for key, value in changes.items():
    config_lib.set_config_value(config, f"optimizer.{key}", value)
  config = config_lib.resolve_config(config)
  tx = optimizers.create_optimizer(config.optimizer, config.num_steps)
  params = {"w": jax.numpy.full((256, 128), 2.0), "b": jax.numpy.full((128,), -1.0)}
  grads = jax.tree.map(jax.numpy.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for key, x in params.items():
    np.testing.assert_allclose(updates[key], -step_size * 0.1 * x, rtol=1e-6)


@pytest.mark.parametrize("name", ["adafactor", "adamw", "t5x"])
def test_stochastic_rounding_key_rounds_bfloat16_params_for_any_optimizer(name):
  config = default.get_config()
  config_lib.set_config_value(config, "optimizer.name", name)
  config_lib.set_config_value(config, "optimizer.learning_rate", 1e-3)
  config_lib.set_config_value(config, "optimizer.telemetry", name != "adamw")
  config = config_lib.resolve_config(config)
  params = {"w": jax.numpy.ones((4, 4), jax.numpy.bfloat16)}
  grads = {"w": jax.numpy.full((4, 4), 1e-3, jax.numpy.bfloat16)}
  kinds = {}
  for rounding in (False, True):
    config_lib.set_config_value(config, "optimizer.stochastic_rounding", rounding)
    tx = optimizers.create_optimizer(config.optimizer, config.num_steps)
    updates, _ = tx.update(grads, tx.init(params), params)
    kinds[rounding] = updates["w"].dtype
  # Stochastic rounding's updates are float32 (see adafactor_jax.stochastic_rounding).
  assert kinds == {False: jax.numpy.bfloat16, True: jax.numpy.float32}


# --------------------------------------------------------------------------- the optimizer by name


@pytest.mark.parametrize("name", list(config_lib.OPTIMIZERS))
def test_the_arguments_a_config_leaves_out_are_the_functions_defaults(name):
  """The trainer restates no default: config.json records each argument at the signature's."""
  config = default.get_config()
  config.optimizer.name = name
  config.optimizer.telemetry = name not in optimizers.WITHOUT_TELEMETRY
  opt = config_lib.resolve_config(config).optimizer
  function = config_lib.OPTIMIZERS[name]
  arguments = {k: v for k, v in opt.items() if k not in config_lib.TRAINER_KEYS}
  for key, arg in inspect.signature(function).parameters.items():
    if key in config_lib.SUPPLIED:
      assert key not in arguments
    elif "dtype" in key and arg.default is not None:
      assert arguments.pop(key) == jnp.dtype(arg.default).name
    else:
      assert arguments.pop(key) == arg.default, key
  assert arguments == {}
  optimizers.create_optimizer(opt, 100)


def test_a_preset_runs_with_its_own_defaults():
  """configs/big_vision.py names the preset and its learning rate; the preset's momentum,
  bfloat16 momentum, beta2 cap and factoring from 32 are the preset's, not restated."""
  opt = config_lib.resolve_config(big_vision.get_config()).optimizer
  assert (opt.momentum, opt.momentum_dtype, opt.beta2_cap, opt.min_dim_size_to_factor) == (
    0.9,
    "bfloat16",
    0.999,
    32,
  )
  params = {"w": jnp.ones((64, 48)), "b": jnp.ones((48,))}
  tx = optimizers.create_optimizer(opt, 100)
  schedule = optimizers.learning_rate_schedule(opt, 100)
  preset = adafactor_jax.presets.big_vision(schedule, telemetry=True)
  state, expected = tx.init(params), preset.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(expected)
  assert jax.tree.map(lambda x: x.dtype, state) == jax.tree.map(lambda x: x.dtype, expected)


@pytest.mark.parametrize(
  ("config_spec", "flag", "name", "other"),
  [
    ("default", "--config.optimizer.b1=0.8", "adafactor", "'adamw'"),
    ("big_vision", "--config.optimizer.epsilon2=0.1", "big_vision", "'adafactor'"),
    ("adamw", "--config.optimizer.momentum=0.9", "adamw", "'adafactor'"),
  ],
)
def test_a_key_the_chosen_optimizer_does_not_take_is_refused_in_one_line(
  config_spec, flag, name, other, tmp_path, capsys
):
  key = flag.removeprefix("--config.").partition("=")[0]
  rc = main.main([PROG, "--config", config_spec, flag, f"--workdir={tmp_path / 'run'}"])
  err = assert_refused(capsys, rc, [f"'{key}'", f"optimizer {name!r}", other])
  assert err.count("\n") == 1
  assert not (tmp_path / "run").exists()


def test_a_key_is_refused_for_the_optimizer_the_flags_name(tmp_path, capsys):
  """--config.optimizer.name=big_vision after the default's: epsilon2 is Adafactor's alone."""
  flags = ["--config.optimizer.name=big_vision", "--config.optimizer.epsilon2=0.1"]
  assert main.main([PROG, *flags, f"--workdir={tmp_path / 'run'}"]) == 2
  assert "'optimizer.epsilon2': optimizer 'big_vision'" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()
  config = default.get_config()
  config.optimizer.name = "big_vision"
  config.optimizer.epsilon2 = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"'optimizer.epsilon2'.*'big_vision'"):
    config_lib.resolve_config(config)
  with pytest.raises(config_lib.ConfigError, match=r"'optimizer.epsilon2'.*'big_vision'"):
    optimizers.create_optimizer(config.optimizer, 100)


def test_an_argument_override_is_parsed_by_the_signatures_type(tmp_path, monkeypatch):
  started = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda *args: started.append(args))
  flags = ["--config.optimizer.momentum=0.9", "--config.optimizer.decay_offset=3"]
  assert main.main([PROG, *flags, f"--workdir={tmp_path}"]) == 0
  ((config, _, _),) = started
  assert config.optimizer.momentum == 0.9 and config.optimizer.decay_offset == 3
  assert config_lib.resolve_config(config).optimizer.epsilon2 == 1e-3  # the signature's


# --------------------------------------------------------------------------- clip_global_norm


def _optimizer(
  name: str, **changes
) -> tuple[ml_collections.ConfigDict, optax.GradientTransformation]:
  """The resolved optimizer section of ``name`` at a constant learning rate, and its tx."""
  config = default.get_config()
  changes = {
    "name": name,
    "learning_rate": 1e-2,
    "telemetry": name not in optimizers.WITHOUT_TELEMETRY,
    "schedule": "constant",
    "warmup_fraction": 0.0,
    **changes,
  }
  for key, value in changes.items():
    config_lib.set_config_value(config, f"optimizer.{key}", value)
  opt = config_lib.resolve_config(config).optimizer
  return opt, optimizers.create_optimizer(opt, 100)


@pytest.mark.parametrize("name", ["adafactor", "adamw", "big_vision"])
def test_clip_global_norm_is_optax_clip_by_global_norm_before_the_optimizer(name):
  """Each step's update is the unclipped optimizer's update of the gradient scaled by
  min(1, c / ||G||) (the norm over every leaf, in float64 here): clipped on the steps whose
  norm exceeds c, untouched on the others."""
  clip = 1.0
  _, clipped_tx = _optimizer(name, clip_global_norm=clip)
  _, plain_tx = _optimizer(name)
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(48, 40)), jnp.float32), "b": jnp.zeros((40,))}
  clipped_state, plain_state = clipped_tx.init(params), plain_tx.init(params)
  scaled = []
  for scale in (0.1, 0.001, 0.01, 0.05):  # global norms about 4.4, 0.04, 0.4, 2.2
    grads = {
      key: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype) for key, x in params.items()
    }
    norm = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64))) for g in grads.values()))
    factor = np.float32(min(1.0, clip / norm))
    scaled.append(factor < 1.0)
    expected, plain_state = plain_tx.update(
      {key: g * factor for key, g in grads.items()}, plain_state, params
    )
    updates, clipped_state = clipped_tx.update(grads, clipped_state, params)
    for key in params:
      np.testing.assert_allclose(updates[key], expected[key], rtol=2e-5, atol=1e-8)
    params = jax.tree.map(lambda x, u: x + u, params, updates)
  assert scaled == [True, False, False, True]
  # The clip is stateless: the state is the optimizer's, behind optax.chain's EmptyState.
  assert clipped_state[0] == optax.EmptyState()
  assert jax.tree.structure(clipped_state[1]) == jax.tree.structure(plain_state)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_a_clip_global_norm_that_is_not_positive_is_refused(value, tmp_path, capsys):
  opt, _ = _optimizer("adamw")
  opt.clip_global_norm = value
  with pytest.raises(config_lib.ConfigError, match=r"'optimizer.clip_global_norm' must be > 0"):
    optimizers.create_optimizer(opt, 100)
  flag = f"--config.optimizer.clip_global_norm={value}"
  rc = main.main([PROG, "--config", "adamw", flag, f"--workdir={tmp_path / 'run'}"])
  assert_refused(capsys, rc, ["'optimizer.clip_global_norm' must be > 0", repr(value)])
  assert not (tmp_path / "run").exists()


def test_clip_global_norm_is_refused_with_the_fused_backward_step():
  config = default.get_config()
  config.model.scan_layers = True
  config.optimizer.fused_backward = True
  config.optimizer.clip_global_norm = 1.0
  message = r"'optimizer.fused_backward' cannot clip by the global norm \('optimizer.clip_glob"
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.resolve_config(config)


def test_a_clipped_optimizers_state_converts_and_shards_as_the_unclipped_ones():
  """Switching (adafactor_jax.warm_start_state) and state_shardings see through the clip's
  EmptyState: the warm Adafactor state from a clipped AdamW's is the one from the same
  AdamW state without the clip (a gradient of norm 0.18, which the clip at 1 leaves as it
  is), behind the clip's own EmptyState."""
  params = {"w": jnp.ones((256, 128)), "b": jnp.ones((128,))}
  grads = jax.tree.map(lambda x: 1e-3 * x, params)
  adamw_opt, clipped_adamw = _optimizer("adamw", clip_global_norm=1.0, b2=0.95)
  _, adamw_tx = _optimizer("adamw", b2=0.95)
  _, clipped_state = clipped_adamw.update(grads, clipped_adamw.init(params), params)
  _, plain_state = adamw_tx.update(grads, adamw_tx.init(params), params)
  adafactor_opt, clipped_adafactor = _optimizer("adafactor", clip_global_norm=1.0, momentum=0.9)
  _, adafactor_tx = _optimizer("adafactor", momentum=0.9)
  warm = optimizers.switched_state(
    adafactor_opt, adamw_opt, clipped_adafactor, params, clipped_state
  )
  expected = optimizers.switched_state(adafactor_opt, adamw_opt, adafactor_tx, params, plain_state)
  assert warm[0] == optax.EmptyState()
  assert jax.tree.structure(warm[1]) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(warm[1]), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = adafactor_jax.state_shardings(
    clipped_adafactor, params=params, param_shardings=jax.tree.map(lambda _: sharding, params)
  )
  assert jax.tree.structure(shardings) == jax.tree.structure(clipped_adafactor.init(params))


# --------------------------------------------------------------------------- stable_adamw


def test_stable_adamw_in_the_job_is_the_preset_with_the_sections_arguments():
  """--config.optimizer.name=stable_adamw: the preset at its own b2 (0.99), with the job's
  schedule, 'optimizer.weight_decay' (None: 0, as for adamw) and the section's arguments."""
  params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)}
  grads = [jax.tree.map(lambda x, s=s: s * jnp.cos(x + s), params) for s in (0.1, 3.0, 0.5)]
  for changes, expected in (
    ({}, {"weight_decay": 0.0}),
    ({"weight_decay": 0.1, "clipping_threshold": 0.5}, {"weight_decay": 0.1}),
  ):
    opt, tx = _optimizer("stable_adamw", **changes)
    assert opt.b2 == 0.99 and opt.clipping_threshold == changes.get("clipping_threshold", 1.0)
    preset = adafactor_jax.presets.stable_adamw(
      1e-2, **expected, clipping_threshold=opt.clipping_threshold
    )
    states = tx.init(params), preset.init(params)
    for g in grads:
      (got, state), (want, preset_state) = (
        tx.update(g, states[0], params),
        preset.update(g, states[1], params),
      )
      states = state, preset_state
      np.testing.assert_array_equal(got["w"], want["w"])


def test_a_switch_from_stable_adamw_reads_its_adam_state_with_its_own_b2():
  params = {"w": jnp.ones((256, 128))}
  grads = {"w": jnp.full((256, 128), 0.1)}
  stable_opt, stable_tx = _optimizer("stable_adamw")
  _, source_state = stable_tx.update(grads, stable_tx.init(params), params)
  adafactor_opt, adafactor_tx = _optimizer("adafactor", momentum=0.9)
  warm = optimizers.switched_state(adafactor_opt, stable_opt, adafactor_tx, params, source_state)
  expected = adafactor_jax.warm_start_state(
    adafactor_tx, params=params, source_state=source_state, b1=0.9, b2=0.99
  )
  for got, want in zip(jax.tree.leaves(warm), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(got, want)
  # optax's default b2 (0.999) would debias v by 1 - 0.999 instead of 1 - 0.99: 10x off.
  other = adafactor_jax.warm_start_state(adafactor_tx, params=params, source_state=source_state)
  assert not all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(warm), jax.tree.leaves(other), strict=True)
  )


def test_a_warm_switch_into_stable_adamw_is_refused():
  config = default.get_config()
  config.optimizer.name, config.optimizer.telemetry = "stable_adamw", False
  config.optimizer.switch_from = "adamw"
  with pytest.raises(config_lib.ConfigError, match=r"'optimizer.name' is 'stable_adamw': pass"):
    config_lib.resolve_config(config)
  config.optimizer.warm_start = False
  config_lib.resolve_config(config)
