"""Telemetry (issue 15): the figures each step computes anyway, kept in the state.

The figures are checked against the float64 reference (tests/reference.py), which
records RMS(U) before clipping, the clipping denominator, the parameter scale and
the step's RMS as it computes them; telemetry off must leave state and step as they
were, and on, it must only add scalars.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import adafactor_jax
from adafactor_jax import FactorAxes, TelemetryState, presets
from tests.conftest import assert_bit_identical, make_grads, make_params, run_check_script
from tests.readme import code_blocks
from tests.reference import Options, Reference

STEPS = 5
# 'stacked' (4, 160, 144) is four layers: statistics, clipping and scale per layer.
STACKED = [("stacked", FactorAxes(row=(1,), col=(2,), batch=(0,)))]
LAYERS = 4


def _split_stack(tree: dict) -> dict:
  """The tree with 'stacked' as four separate parameters, as the reference sees it."""
  out = {k: v for k, v in tree.items() if k != "stacked"}
  out |= {f"stacked[{i}]": tree["stacked"][i] for i in range(LAYERS)}
  return out


@jax.jit(static_argnums=0)
def _step(tx, params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state, updates


def _run(tx, params, grads_list):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  updates = []
  for grads in grads_list:
    params, state, u = _step(tx, params, state, jax.tree.map(jnp.asarray, grads))
    updates.append(u)
  return params, state, updates


def _without_telemetry(state):
  """The state with every TelemetryState replaced by the state it wraps."""
  is_node = lambda x: isinstance(x, TelemetryState)  # noqa: E731
  return jax.tree.map(lambda x: x.inner_state if is_node(x) else x, state, is_leaf=is_node)


CASES = {
  "paper": {},
  "no clipping": {"clipping_threshold": None},
  "tight clipping, lr": {"clipping_threshold": 0.5, "learning_rate": 1e-2},
  "unfactored": {"factored": False},
  "schedule, no parameter scale": {
    "learning_rate": optax.linear_schedule(1e-2, 1e-3, 4),
    "multiply_by_parameter_scale": False,
  },
  "momentum": {"momentum": 0.9},
}


@pytest.mark.parametrize("name", list(CASES))
def test_figures_equal_the_float64_reference(name):
  """Factored, unfactored and per-layer figures, with and without clipping, under jit."""
  kwargs = CASES[name]
  params = make_params()
  grads = [make_grads(params, t) for t in range(STEPS)]
  reference = Reference(Options(**kwargs), _split_stack(params))
  for g in grads:
    reference.step(_split_stack(g))
  tx = adafactor_jax.adafactor(factor_dims=STACKED, telemetry=True, **kwargs)
  _, state, _ = _run(tx, params, grads)
  figures = jax.jit(adafactor_jax.telemetry)(state)

  expected = {"beta2": reference.beta2, "step_size": reference.step_size}
  for param, by_name in reference.figures.items():
    expected |= {f"{param}/{figure}": value for figure, value in by_name.items()}
  assert sorted(figures) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_allclose(float(figures[key]), value, rtol=1e-5, err_msg=key)
    assert figures[key].shape == () and figures[key].dtype == jnp.float32
  denominators = [v for k, v in figures.items() if k.endswith("clipping_denominator")]
  if kwargs.get("clipping_threshold", 1.0) is None:
    assert not denominators
  elif "tight" in name:
    assert all(d > 1 for d in denominators), denominators


def test_off_is_the_step_and_state_without_the_argument():
  """telemetry=False adds no node: the state is the chain of the pieces' own states."""
  params = make_params()
  state = adafactor_jax.adafactor(telemetry=False).init(params)
  stats, *rest = state
  assert isinstance(stats, adafactor_jax.ScaleByFactoredRmsState)
  # The relative step size's schedule, the parameter scale, the sign.
  assert [type(x) for x in rest] == [optax.ScaleByScheduleState, optax.EmptyState, optax.EmptyState]
  is_node = lambda x: isinstance(x, TelemetryState)  # noqa: E731
  assert not any(is_node(x) for x in jax.tree.leaves(state, is_leaf=is_node))
  for tx in (adafactor_jax.clip_by_update_rms(), adafactor_jax.scale_by_parameter_scale()):
    assert tx.init(params) == optax.EmptyState()
  # The step is that of the chain of optax's and the pieces' own transformations, built
  # without the argument; telemetry=True, which records figures, is another step.
  by_hand = optax.chain(
    adafactor_jax.scale_by_factored_rms(clipping_threshold=1.0),
    optax.scale_by_learning_rate(adafactor_jax.relative_step_size(), flip_sign=False),
    adafactor_jax.scale_by_parameter_scale(),
    optax.scale(-1.0),
  )
  grads = make_grads(params, 0)
  jaxprs = [
    str(jax.make_jaxpr(tx.update)(grads, tx.init(params), params))
    for tx in (
      adafactor_jax.adafactor(telemetry=False),
      by_hand,
      adafactor_jax.adafactor(telemetry=True),
    )
  ]
  assert jaxprs[0] == jaxprs[1]
  assert jaxprs[0] != jaxprs[2]
  with pytest.raises(ValueError, match="opt_state records no telemetry"):
    adafactor_jax.telemetry(state)


@pytest.mark.parametrize(
  "kwargs",
  [{}, {"momentum": 0.9, "weight_decay_rate": 1e-3}, {"skip_nonfinite": True}, {"factored": False}],
  ids=["paper", "momentum and weight decay", "skip_nonfinite", "unfactored"],
)
def test_on_adds_figures_and_changes_no_bit_of_the_step(kwargs):
  params = make_params()
  grads = [make_grads(params, t) for t in range(3)]
  on = adafactor_jax.adafactor(factor_dims=STACKED, telemetry=True, **kwargs)
  off = adafactor_jax.adafactor(factor_dims=STACKED, **kwargs)
  params_on, state_on, updates_on = _run(on, params, grads)
  params_off, state_off, updates_off = _run(off, params, grads)
  assert_bit_identical(updates_on, updates_off, "updates")
  assert_bit_identical(params_on, params_off, "params")
  assert_bit_identical(_without_telemetry(state_on), state_off, "the state telemetry wraps")


def test_without_clipping_the_step_differs_at_most_in_float32_rounding():
  """RMS(U) then rides along in the row pass (as clipping's does): the row sums are
  taken in another order, so a statistic may differ in its last bit."""
  params = make_params()
  grads = [make_grads(params, t) for t in range(3)]
  on, off = (adafactor_jax.adafactor(clipping_threshold=None, telemetry=t) for t in (True, False))
  _, _, updates_on = _run(on, params, grads)
  _, _, updates_off = _run(off, params, grads)
  for u_on, u_off in zip(updates_on, updates_off, strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=0), u_on, u_off)


def test_state_grows_by_one_scalar_per_figure_and_slice():
  params = make_params()
  on, off = (adafactor_jax.adafactor(factor_dims=STACKED, telemetry=t) for t in (True, False))
  state_on, state_off = on.init(params), off.init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  slices = len(params) - 1 + LAYERS
  # RMS(U), clipping denominator, parameter scale per slice; beta2 and step size.
  assert nbytes(state_on) - nbytes(state_off) == 4 * (3 * slices + 2)
  figures = adafactor_jax.telemetry(state_on)
  assert len(figures) == 4 * slices + 2  # rms_step is derived, not stored
  # Before the first step: zeros, and denominators of 1 (nothing clipped).
  for name, value in figures.items():
    assert float(value) == (1.0 if name.endswith("clipping_denominator") else 0.0), name
  # A step writes every figure in place: the bytes stay, the figures are the step's.
  grads = make_grads(params, 0)
  _, state_on = jax.jit(on.update)(grads, state_on, params)
  _, state_off = jax.jit(off.update)(grads, state_off, params)
  assert nbytes(state_on) - nbytes(state_off) == 4 * (3 * slices + 2)
  after = adafactor_jax.telemetry(state_on)
  assert after.keys() == figures.keys()
  assert all(
    float(after[k]) > 0 for k in figures if k.endswith(("rms_update_before_clipping", "rms_step"))
  )
  assert float(after["beta2"]) == 0.0 and float(after["step_size"]) == pytest.approx(1e-2)


def test_names_per_slice_and_per_path():
  params = {
    "blocks": [{"mlp": {"kernel": jnp.ones((256, 128))}}],
    "experts": jnp.ones((2, 3, 128, 160)),  # two batch axes
  }
  factor_dims = [("experts", FactorAxes(row=(2,), col=(3,), batch=(0, 1)))]
  tx = adafactor_jax.adafactor(factor_dims=factor_dims, telemetry=True)
  _, state, _ = _run(tx, params, [jax.tree.map(jnp.ones_like, params)])
  figures = adafactor_jax.telemetry(state)
  assert list(figures)[:2] == ["beta2", "step_size"]
  per_parameter = [
    "rms_update_before_clipping",
    "clipping_denominator",
    "parameter_scale",
    "rms_step",
  ]
  assert list(figures)[2:6] == [f"blocks/0/mlp/kernel/{f}" for f in per_parameter]
  slices = [k.split("/")[0] for k in list(figures)[6:]]
  expected = [f"experts[{i},{j}]" for i in range(2) for j in range(3)]
  assert slices == [s for s in expected for _ in per_parameter]
  # Each slice is its own: all-ones gradients give RMS(U) = 1 in every one.
  np.testing.assert_allclose(float(figures["experts[1,2]/rms_update_before_clipping"]), 1.0)


def test_a_fused_state_names_each_layer_by_its_index_first():
  """fused_train_step's FusedState (each layer's state stacked by jax.vmap, rest's apart):
  layer k's figures are those of its own state, under k then the slice's own batch axes,
  inside multi_transform too, with rest's beside them; a path in both trees is refused."""
  layer = {"experts": jnp.ones((2, 128, 160)), "norm": jnp.ones((128,))}
  layers = jax.tree.map(lambda x: jnp.stack([x, 2 * x, 3 * x]), layer)  # RMS k + 1
  rest = {"embed": jnp.ones((256, 128))}
  factor_dims = [("experts", FactorAxes(row=(1,), col=(2,), batch=(0,)))]
  tx = optax.multi_transform(
    {
      "matrices": adafactor_jax.adafactor(factor_dims=factor_dims, telemetry=True),
      "vectors": adafactor_jax.adafactor(1e-3, telemetry=True),
    },
    lambda tree: jax.tree.map(lambda x: "matrices" if x.ndim > 1 else "vectors", tree),
  )
  layer_states = jax.vmap(tx.update)(layers, jax.vmap(tx.init)(layers), layers)[1]
  state = adafactor_jax.FusedState(layer_states, tx.update(rest, tx.init(rest), rest)[1])
  figures = adafactor_jax.telemetry(state)
  expected = fused_figures_from_parts(state)
  assert figures.keys() == expected.keys()
  assert all(figures[name] == expected[name] for name in figures)
  assert "experts[2,1]/parameter_scale" in figures and "vectors/step_size" in figures
  for k in range(3):
    assert figures[f"experts[{k},1]/parameter_scale"] == pytest.approx(k + 1)
    assert figures[f"norm[{k}]/parameter_scale"] == pytest.approx(k + 1)
  assert figures["embed/parameter_scale"] == pytest.approx(1.0)
  clashing = adafactor_jax.FusedState(state.layers, tx.init({"norm": jnp.ones((128,))}))
  with pytest.raises(ValueError, match=r"opt_state is a FusedState .* parameters \['norm'\]"):
    adafactor_jax.telemetry(clashing)


def fused_figures_from_parts(state: adafactor_jax.FusedState) -> dict:
  """telemetry of a FusedState built from its parts' own: rest's figures, and each layer's
  slice's per-parameter figures under the layer's index first (``path[k]``, or ``path[k,j]``
  where the slice has batch axes); per-step figures, the same in every layer, are rest's."""
  expected = adafactor_jax.telemetry(state.rest)
  per_step = dict(expected)
  for k in range(len(jax.tree.leaves(state.layers)[0])):
    own = adafactor_jax.telemetry(jax.tree.map(lambda x, k=k: x[k], state.layers))
    for name, value in own.items():
      path, _, figure = name.rpartition("/")
      if name in per_step:
        assert value == per_step[name], name
      elif "[" in path:
        expected[path.replace("[", f"[{k},") + "/" + figure] = value
      else:
        expected[f"{path}[{k}]/{figure}"] = value
  return expected


def test_a_skipped_step_leaves_the_figures_and_counts_itself():
  params = make_params()
  tx = adafactor_jax.adafactor(telemetry=True, skip_nonfinite=True)
  grads = make_grads(params, 0)
  poisoned = {**grads, "kernel": grads["kernel"].copy()}
  poisoned["kernel"][3, 5] = np.nan
  params, state, _ = _run(tx, params, [grads])
  before = adafactor_jax.telemetry(state)
  params, skipped, _ = _step(tx, params, state, poisoned)
  after = adafactor_jax.telemetry(skipped)
  assert int(before["skipped_steps"]) == 0 and int(after["skipped_steps"]) == 1
  del before["skipped_steps"], after["skipped_steps"]
  assert_bit_identical(after, before, "figures across a skipped step")
  _, taken, _ = _step(tx, params, skipped, make_grads(params, 1))
  assert float(adafactor_jax.telemetry(taken)["beta2"]) > float(after["beta2"])


def test_multi_steps_records_the_figures_of_the_step_it_takes():
  params = make_params()
  g1, g2 = make_grads(params, 0), make_grads(params, 1)
  multi = optax.MultiSteps(adafactor_jax.adafactor(telemetry=True), every_k_schedule=2)
  _, state, _ = _run(multi, params, [g1])
  assert_bit_identical(
    adafactor_jax.telemetry(state), adafactor_jax.telemetry(multi.init(params)), "mini-step"
  )
  _, state, _ = _run(multi, params, [g1, g2])
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  _, plain, _ = _run(adafactor_jax.adafactor(telemetry=True), params, [mean])
  expected = adafactor_jax.telemetry(plain)
  figures = adafactor_jax.telemetry(state)
  assert figures.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(figures[key], expected[key], rtol=1e-5, err_msg=key)


def test_inject_hyperparams_records_the_injected_step_size_under_jit():
  params = make_params()
  grads = make_grads(params, 0)
  tx = optax.inject_hyperparams(adafactor_jax.adafactor)(learning_rate=1e-2, telemetry=True)
  state = jax.jit(tx.init)(params)
  _, state = jax.jit(tx.update)(grads, state, params)
  figures = jax.jit(adafactor_jax.telemetry)(state)
  _, plain, _ = _run(adafactor_jax.adafactor(1e-2, telemetry=True), params, [grads])
  expected = adafactor_jax.telemetry(plain)
  assert figures.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(figures[key], expected[key], rtol=1e-6, err_msg=key)
  state.hyperparams["learning_rate"] = jnp.asarray(3e-3)
  _, state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(adafactor_jax.telemetry(state)["step_size"], 3e-3)


def test_a_chain_of_the_pieces_masked_and_multi_transform():
  params = make_params()
  grads = [make_grads(params, t) for t in range(2)]
  parts = [
    adafactor_jax.scale_by_factored_rms(telemetry=True),
    adafactor_jax.clip_by_update_rms(telemetry=True),
    optax.scale_by_learning_rate(1e-2),
    adafactor_jax.scale_by_parameter_scale(telemetry=True),
  ]
  _, state, _ = _run(optax.chain(*parts), params, grads)
  figures = adafactor_jax.telemetry(state)
  _, fused, _ = _run(adafactor_jax.adafactor(1e-2, telemetry=True), params, grads)
  expected = adafactor_jax.telemetry(fused)
  # optax's step size records nothing, so neither it nor rms_step is there.
  assert figures.keys() == {k for k in expected if not k.endswith(("step_size", "rms_step"))}
  for key in figures:
    np.testing.assert_allclose(figures[key], expected[key], rtol=1e-5, err_msg=key)
  # adafactor_jax.scale_by_learning_rate records it: then every figure is there.
  parts[2] = adafactor_jax.scale_by_learning_rate(1e-2, telemetry=True)
  _, state, _ = _run(optax.chain(*parts), params, grads)
  figures = adafactor_jax.telemetry(state)
  assert figures.keys() == expected.keys()
  for key in figures:
    np.testing.assert_allclose(figures[key], expected[key], rtol=1e-5, err_msg=key)

  # masked: only the masked-in parameters; multi_transform: per-step names by label.
  mask = {k: k in ("kernel", "bias") for k in params}
  _, state, _ = _run(optax.masked(adafactor_jax.adafactor(telemetry=True), mask), params, grads)
  assert {k.split("/")[0] for k in adafactor_jax.telemetry(state)} == {
    "beta2",
    "step_size",
    "kernel",
    "bias",
  }
  labels = {k: "matrices" if params[k].ndim > 1 else "vectors" for k in params}
  multi = optax.multi_transform(
    {
      "matrices": adafactor_jax.adafactor(telemetry=True),
      "vectors": adafactor_jax.adafactor(1e-3, decay_rate=0.5, telemetry=True),
    },
    labels,
  )
  _, state, _ = _run(multi, params, grads)
  figures = adafactor_jax.telemetry(state)
  assert float(figures["vectors/step_size"]) == pytest.approx(1e-3)
  assert float(figures["matrices/step_size"]) == pytest.approx(1e-2)  # min(1e-2, 1/sqrt(2))
  assert float(figures["vectors/beta2"]) == pytest.approx(1 - 2**-0.5)
  assert float(figures["matrices/beta2"]) == pytest.approx(1 - 2**-0.8)
  np.testing.assert_allclose(
    figures["bias/rms_step"],
    figures["bias/rms_update_before_clipping"]
    / figures["bias/clipping_denominator"]
    * 1e-3
    * figures["bias/parameter_scale"],
  )


def test_flax_nnx_optimizer_state_reads_like_the_optax_state():
  nnx = pytest.importorskip("flax.nnx")
  model = nnx.Linear(256, 192, rngs=nnx.Rngs(0))
  tx = adafactor_jax.adafactor(telemetry=True, skip_nonfinite=True)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = {"bias": model.bias[...], "kernel": model.kernel[...]}
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((4, 256))) ** 2))(model)
  optimizer.update(model, grads)
  figures = adafactor_jax.telemetry(optimizer.opt_state)
  plain_grads = {"bias": grads.bias[...], "kernel": grads.kernel[...]}
  _, state, _ = _run(tx, params, [plain_grads])
  expected = adafactor_jax.telemetry(state)
  assert figures.keys() == expected.keys()
  for key in expected:
    np.testing.assert_allclose(figures[key], expected[key], rtol=1e-6, err_msg=key)


@pytest.mark.parametrize("name", ["t5x", "big_vision", "hf_transformers", "torch_adafactor"])
def test_presets_take_telemetry(name):
  params = make_params()
  build = getattr(presets, name)
  tx = build(1e-3, telemetry=True) if name == "big_vision" else build(telemetry=True)
  _, state, _ = _run(tx, params, [make_grads(params, 0)])
  figures = adafactor_jax.telemetry(state)
  assert {"beta2", "step_size", "kernel/rms_update_before_clipping", "kernel/rms_step"} <= set(
    figures
  )
  assert ("kernel/parameter_scale" in figures) == (name != "big_vision")


def test_warm_start_keeps_the_telemetry_nodes():
  params = make_params()
  adamw = optax.adamw(1e-3)
  _, adam_state, _ = _run(adamw, params, [make_grads(params, 0)])
  tx = adafactor_jax.adafactor(telemetry=True)
  state = adafactor_jax.warm_start_state(tx, params=params, source_state=adam_state)
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params))
  _, state, _ = _step(tx, jax.tree.map(jnp.asarray, params), state, make_grads(params, 1))
  assert float(adafactor_jax.telemetry(state)["beta2"]) == pytest.approx(1 - 2**-0.8)


@pytest.mark.parametrize(
  "build",
  [
    adafactor_jax.adafactor,
    adafactor_jax.scale_by_factored_rms,
    adafactor_jax.clip_by_update_rms,
    adafactor_jax.scale_by_parameter_scale,
    presets.t5x,
  ],
)
def test_telemetry_must_be_a_bool(build):
  with pytest.raises(ValueError, match="telemetry must be True or False"):
    build(telemetry="yes")


@pytest.fixture(scope="module")
def on_eight_devices():
  """tests/telemetry_sharded_checks.py's observations, one subprocess for all cases."""
  return run_check_script("telemetry_sharded_checks.py")


@pytest.mark.parametrize("case", ["2x4-auto-model", "2x4-explicit-model"])
def test_on_eight_devices_the_figures_are_replicated_scalars_and_cost_no_communication(
  on_eight_devices, case
):
  observed = on_eight_devices[case]
  assert "error" not in observed, observed.get("error")
  # The same collectives as without telemetry: the figures are the all-reduced RMS values
  # that clipping and the parameter scale need anyway.
  assert observed["collectives_on"] == observed["collectives_off"]
  assert observed["updates_bit_identical"]
  assert observed["names"] == observed["expected_names"]
  assert observed["max_relative_error"] <= 1e-6
  for shardings in (observed["figure_shardings_init"], observed["figure_shardings_after_steps"]):
    assert shardings and all(spec == [] for spec in shardings.values()), shardings
  assert observed["figure_shardings_after_steps"] == observed["figure_shardings_init"]


def test_the_readme_example_runs():
  (example,) = [block for block in code_blocks("python") if "adafactor_jax.telemetry(" in block]
  namespace: dict = {}
  exec(compile(example, "README.md", "exec"), namespace)
  figures = namespace["figures"]
  assert float(figures["dense/kernel/clipping_denominator"]) >= 1.0
  assert figures["step_size"] == pytest.approx(1e-2)
