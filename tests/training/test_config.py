"""The config and the command line (config.py, main.py): loading configs by name or file,
overriding keys, and every refusal, each named in one line before anything is written."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

import adafactor_jax
from adafactor_jax.training import config as config_lib
from adafactor_jax.training import main, train
from adafactor_jax.training.configs import adamw, big_vision, default, paper, t5_finetune
from tests.training.test_train import (
  PAPER_FILE,
  PROG,
  TINY,
  assert_refused,
  file_hashes,
  run_main,
  tiny_flags,
)


def _write(path: Path, text: str) -> str:
  path.write_text(text)
  return str(path)


EXTRA_KEY_CONFIG = """
from adafactor_jax.training.configs import default

def get_config():
  config = default.get_config()
  config.optimizer.lr = 1.0
  return config
"""


DICT_CONFIG = """
from adafactor_jax.training.configs import default

def get_config():
  config = default.get_config()
  for key, value in {tiny!r}.items():
    *parents, leaf = key.split(".")
    holder = config
    for part in parents:
      holder = holder[part]
    holder[leaf] = value
  return config.to_dict()
"""


# (case, flags before the tiny ones with {tmp} for the test's directory, message fragments)
BAD_INPUTS = [
  ("unknown_key", ["--config.optimizer.lr=1"], ["'optimizer.lr'", "Did you mean --config."]),
  ("wrong_type", ["--config.num_steps=abc"], ["num_steps", "abc"]),
  ("unknown_key_in_file", ["--config={tmp}/extra.py"], ["unknown config key 'optimizer.lr'"]),
  ("negative_lr", ["--config.optimizer.learning_rate=-1"], ["'optimizer.learning_rate'", "> 0"]),
  ("heads_do_not_divide", ["--config.model.num_heads=3"], ["'model.d_model'", "'model.num_heads'"]),
  ("hf_style_decay_rate", ["--config.optimizer.decay_rate=-0.8"], ["decay_rate", "0.8"]),
  ("zero_steps", ["--config.num_steps=0"], ["'num_steps'", "> 0"]),
  ("eval_fraction_1.5", ["--config.data.eval_fraction=1.5"], ["'data.eval_fraction'"]),
  ("checkpoint_between_logs", ["--config.checkpoint_every=3"], ["checkpoint_every", "log_every"]),
  ("unknown_optimizer", ["--config.optimizer.name=adam"], ["'optimizer.name'", "'adam'"]),
  (
    "telemetry_of_adamw",
    ["--config.optimizer.name=adamw", "--config.optimizer.learning_rate=1e-3"],
    ["'optimizer.telemetry'", "adamw", "--config.optimizer.telemetry=False"],
  ),
  (
    "telemetry_of_optax_adafactor",
    ["--config.optimizer.name=optax_adafactor", "--config.optimizer.learning_rate=1e-3"],
    ["'optimizer.telemetry'", "'optax_adafactor'", "--config.optimizer.telemetry=False"],
  ),
  (
    "schedule_without_lr",
    ["--config.optimizer.learning_rate=None"],  # the default job's cosine schedule stays
    ["'optimizer.schedule'", "'optimizer.learning_rate'"],
  ),
  ("missing_corpus", ["--config.data.corpus={tmp}/nowhere"], ["data.corpus", "nowhere"]),
  ("no_matching_files", ["--config.data.corpus={tmp}/corpus"], ["data.corpus", "no files", ".py"]),
  ("unknown_flag", ["--bogus=1"], ["bogus"]),
  ("mesh_of_other_devices", ["--config.mesh.data=2"], ["'mesh.data' = 2", "the 1 device(s)"]),
  ("both_mesh_axes_-1", ["--config.mesh.model=-1"], ["'mesh.data' and 'mesh.model'", "-1"]),
  (
    "rule_of_an_unknown_mesh_axis",
    ["--config.mesh.logical_axis_rules=(('embed', 'dta'),)"],
    ["'mesh.logical_axis_rules'", "('embed', 'dta')", "'dta'"],
  ),
  (
    "rule_not_a_pair",
    ["--config.mesh.logical_axis_rules=('embed',)"],
    ["'mesh.logical_axis_rules'", "'embed'", "pair"],
  ),
]


@pytest.mark.parametrize(
  ("flags", "fragments"), [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_exits_2_naming_the_problem_and_writes_nothing(
  flags, fragments, tmp_path, capsys
):
  _write(tmp_path / "extra.py", EXTRA_KEY_CONFIG)
  (tmp_path / "corpus").mkdir()
  (tmp_path / "corpus" / "notes.txt").write_text("no python here\n" * 100)
  before = file_hashes(tmp_path)
  flags = [flag.format(tmp=tmp_path) for flag in flags]
  config_file = [flag for flag in flags if flag.startswith("--config=")]
  overrides = [flag for flag in flags if not flag.startswith("--config=")]
  workdir = tmp_path / "run"
  # A --config=<file> flag must come before the --config.<key> ones; the last override wins.
  rc = run_main(*config_file, *tiny_flags(), *overrides, f"--workdir={workdir}")
  assert_refused(capsys, rc, fragments)
  assert not workdir.exists()
  assert file_hashes(tmp_path) == before


def test_unknown_key_suggests_a_real_key(tmp_path, capsys):
  rc = run_main("--config.optimizer.nme=adamw", f"--workdir={tmp_path / 'run'}")
  err = assert_refused(capsys, rc, ["'optimizer.nme'", "Did you mean --config.optimizer.name?"])
  assert err.count("\n") == 1
  assert not (tmp_path / "run").exists()


def test_config_file_returning_a_dict_is_refused(tmp_path, capsys):
  config_file = _write(tmp_path / "as_dict.py", DICT_CONFIG.format(tiny=TINY))
  rc = run_main(f"--config={config_file}", f"--workdir={tmp_path / 'run'}")
  assert_refused(capsys, rc, ["ConfigDict", "dict"])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", [f"{PAPER_FILE}:no_such_row", "paper:no_such_row"])
def test_unknown_paper_row_is_refused_with_the_rows(spec, tmp_path, capsys):
  rc = run_main(f"--config={spec}", f"--workdir={tmp_path / 'run'}")
  out, err = capsys.readouterr()
  assert rc == 2
  assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
  assert "Traceback" not in err
  assert "unknown row 'no_such_row'" in err
  assert all(row in err for row in paper.ROWS)
  assert not (tmp_path / "run").exists()
  with pytest.raises(ValueError, match="no_such_row"):
    paper.get_config("no_such_row")


@pytest.mark.parametrize(
  ("spec", "name", "workdir"),
  [
    ([], "default", "runs/default"),
    (["--config", "big_vision"], "big_vision", "runs/big_vision"),
    (["--config=paper:no_clipping"], "no_clipping", "runs/paper-no_clipping"),
    (["--config", "configs/t5_finetune.py"], "t5_finetune", "runs/t5_finetune"),  # no such file
    (["--config", "adamw", "--workdir", "elsewhere"], "adamw", "elsewhere"),
  ],
)
def test_packaged_configs_by_name_from_any_directory(spec, name, workdir, tmp_path, monkeypatch):
  """Outside the checkout, as from a wheel: the packaged configs by name, each in its own
  runs/<name> unless --workdir says otherwise."""
  monkeypatch.chdir(tmp_path)
  started = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda *args: started.append(args))
  assert run_main(*spec, "--config.num_steps=7") == 0
  ((config, got_workdir, _),) = started
  assert got_workdir == workdir and config.num_steps == 7
  expected = {
    "default": default.get_config(),
    "big_vision": big_vision.get_config(),
    "no_clipping": paper.get_config("no_clipping"),
    "t5_finetune": t5_finetune.get_config(),
    "adamw": adamw.get_config(),
  }[name]
  expected.num_steps = 7
  # The flags' config holds the optimizer's arguments that the file leaves out, at their defaults.
  resolve = config_lib.resolve_config
  assert resolve(config).to_dict() == resolve(expected).to_dict()


def test_an_unknown_config_name_lists_the_packaged_ones(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  rc = run_main("--config", "big_visio")
  err = assert_refused(capsys, rc, ["'big_visio'", "no such file, nor a packaged config"])
  for name in ("adamw", "big_vision", "default", "t5_finetune", "paper:<row>", "no_clipping"):
    assert name in err
  assert list(tmp_path.iterdir()) == []
  assert main.main([PROG, "--help"]) == 0
  out = capsys.readouterr().out
  assert (
    "Packaged configs: adamw, big_vision, decoder_1b, decoder_8b, default, smoke, t5_finetune, "
    "paper:<row>" in out
  )


def test_bad_flag_in_a_real_process_exits_2_on_stderr(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "adafactor_jax.training",
      "--config.optimizr.name=adamw",
      f"--workdir={workdir}",
    ],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2
  assert proc.stderr.startswith(f"{PROG}: error: ")
  assert "'optimizr.name'" in proc.stderr
  assert "Did you mean --config.optimizer.name?" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stdout == ""
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
  ("script", "missing"),
  [
    ("train_cli", "ml_collections"),
    ("train_cli", "flax"),
    ("train_cli", "tensorboardX"),
    ("compare_cli", "orbax"),
  ],
)
def test_console_scripts_without_the_train_extra_name_it_in_one_line(script, missing, tmp_path):
  """As after a plain ``pip install adafactor-jax``: the script says what to install."""
  code = (
    f"import sys; sys.modules[{missing!r}] = None\n"
    f"from adafactor_jax.training import {script}; {script}()\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
  )
  assert proc.returncode == 1
  prog = {"train_cli": "adafactor-train", "compare_cli": "adafactor-compare"}[script]
  assert proc.stderr.startswith(f"{prog}: error: ") and proc.stderr.count("\n") == 1, proc.stderr
  assert "pip install -e '.[train]'" in proc.stderr and repr(missing) in proc.stderr
  assert proc.stdout == "" and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["seed", "data.suffixes", "data.eval_fraction"])
def test_none_for_a_key_that_cannot_be_none_is_refused(key, tmp_path, capsys):
  workdir = tmp_path / "run"
  rc = run_main(*tiny_flags(), f"--config.{key}=None", f"--workdir={workdir}")
  assert_refused(capsys, rc, [key])
  assert not workdir.exists()


@pytest.mark.parametrize("overrides", [[], ["--config.num_steps=2"]], ids=["plain", "override"])
def test_missing_config_file_is_refused_naming_it(overrides, tmp_path, capsys):
  missing = tmp_path / "missing_config.py"
  rc = run_main(f"--config={missing}", *overrides, f"--workdir={tmp_path / 'run'}")
  assert_refused(capsys, rc, [str(missing)])
  assert not (tmp_path / "run").exists()


def test_override_on_a_dict_config_file_is_refused(tmp_path, capsys):
  config_file = _write(tmp_path / "small_dict.py", "def get_config():\n  return {'seed': 1}\n")
  rc = run_main(f"--config={config_file}", "--config.num_steps=2", f"--workdir={tmp_path / 'run'}")
  assert_refused(capsys, rc, ["dict"])
  assert not (tmp_path / "run").exists()


def test_stray_positional_argument_is_refused(tmp_path, capsys, monkeypatch):
  started = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda *args: started.append(args))
  rc = run_main(*tiny_flags(), f"--workdir={tmp_path / 'run'}", str(Path(adamw.__file__)))
  assert started == []
  assert_refused(capsys, rc, ["adamw.py"])


def test_resolve_config_fills_defaults_and_coerces_types():
  user = ml_collections.ConfigDict(
    {"num_steps": 7, "optimizer": {"learning_rate": 1}, "data": {"suffixes": [".txt", ".md"]}}
  )
  resolved = config_lib.resolve_config(user)
  assert resolved.num_steps == 7
  assert resolved.optimizer.learning_rate == 1.0
  assert isinstance(resolved.optimizer.learning_rate, float)
  assert resolved.data.suffixes == (".txt", ".md")
  reference = default.get_config()
  assert resolved.model.to_dict() == reference.model.to_dict()
  # The optimizer's arguments that the config leaves out: the function's defaults.
  decay_rate = inspect.signature(adafactor_jax.adafactor).parameters["decay_rate"].default
  assert resolved.optimizer.decay_rate == decay_rate
  assert user.to_dict() == {
    "num_steps": 7,
    "optimizer": {"learning_rate": 1},
    "data": {"suffixes": [".txt", ".md"]},
  }


@pytest.mark.parametrize(
  ("user", "fragments"),
  [
    ({"num_steps": True}, ["'num_steps'", "int", "bool"]),
    ({"optimizer": {"weight_decay": -0.1}}, ["'optimizer.weight_decay'", ">= 0"]),
    ({"model": {"d_model": "wide"}}, ["'model.d_model'", "int", "'wide'"]),
    ({"optimizer": {"decay_rte": 0.8}}, ["'optimizer.decay_rte'", "'optimizer.decay_rate'"]),
    ({"data": {"eval_fraction": 0.0}}, ["'data.eval_fraction'"]),
    ({"model": {"param_dtype": "float33"}}, ["'model.param_dtype'", "'float33'"]),
  ],
  ids=[
    "bool_for_int",
    "negative_weight_decay",
    "str_for_int",
    "typo_key",
    "eval_fraction_0",
    "bad_dtype",
  ],
)
def test_resolve_config_refuses_naming_the_key(user, fragments):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.resolve_config(ml_collections.ConfigDict(user))
  assert all(fragment in str(error.value) for fragment in fragments), str(error.value)
  assert isinstance(error.value, ValueError)


def test_set_config_value_sets_none_on_a_typed_field():
  config = default.get_config()
  config_lib.set_config_value(config, "optimizer.clipping_threshold", None)
  assert config.optimizer.clipping_threshold is None
  assert config_lib.resolve_config(config).optimizer.clipping_threshold is None
