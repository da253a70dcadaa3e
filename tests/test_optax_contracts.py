"""What optax's own tests ask of every optimizer (issue 16), item by item.

Complex parameters, ``init`` on abstract params, ``optax.tree.map_params``,
``jax.jit(tx.init)`` inside ``optax.inject_hyperparams``, keyword-only
arguments, and torch's ``maximize``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import adafactor_jax
from adafactor_jax import presets, schedules
from tests.conftest import assert_bit_identical, relative_error, run_optax
from tests.reference import Options, Reference

# --------------------------------------------------------------------------- 16.1 complex


STEPS = 6

# Factored (with and without a batch axis), unfactored and vector parameters.
COMPLEX_SHAPES = {
  "kernel": (256, 192),
  "stacked": (2, 160, 144),
  "narrow": (8, 300),
  "bias": (300,),
}


def _complex_tree(shapes: dict, seed: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    k: (scale * (rng.standard_normal(s) + 1j * rng.standard_normal(s))).astype(np.complex64)
    for k, s in shapes.items()
  }


def _complex_grads(seed: int) -> list[dict]:
  # Scales that move across steps and differ between real and imaginary parts.
  rng = np.random.default_rng(seed)
  grads = []
  for step in range(STEPS):
    g = _complex_tree(COMPLEX_SHAPES, 100 * seed + step, 10.0 ** rng.uniform(-3, 1))
    grads.append({k: (v.real + 3j * v.imag).astype(np.complex64) for k, v in g.items()})
  return grads


COMPLEX_CASES = {
  "defaults": {},
  "no clipping": {"clipping_threshold": None},
  "tight clipping": {"clipping_threshold": 0.3},
  "no parameter scale": {"multiply_by_parameter_scale": False},
  "weight decay": {"weight_decay_rate": 1e-2},
  "not factored": {"factored": False},
  "min dim 16": {"min_dim_size_to_factor": 16},
}


@pytest.mark.parametrize("name", list(COMPLEX_CASES))
def test_16_1_complex_params_match_optax_adafactor(name):
  """optax keeps the second moment of |G|², and so does this library."""
  kwargs = {"learning_rate": 1e-2, **COMPLEX_CASES[name]}
  params = _complex_tree(COMPLEX_SHAPES, 0, 0.05)
  grads = _complex_grads(1)
  theirs, _ = run_optax(optax.adafactor(**kwargs), params, grads)
  ours, state = run_optax(adafactor_jax.adafactor(**kwargs), params, grads)
  assert all(x.dtype == jnp.complex64 for x in jax.tree.leaves(ours))
  errors = relative_error(ours, theirs, params)
  assert max(errors.values()) < 2e-6, errors
  # The imaginary parts moved (a cast to float32 would have dropped them).
  for k in params:
    assert np.linalg.norm(np.imag(ours[k] - params[k])) > 0.1 * np.linalg.norm(ours[k] - params[k])
  stats = jax.tree.leaves((state[0].v_row, state[0].v_col, state[0].v))
  assert {x.dtype for x in stats} == {jnp.dtype(jnp.float32)}  # |G|² is real


@pytest.mark.parametrize(
  "kwargs",
  [{}, {"learning_rate": 1e-2, "momentum": 0.9}, {"factored": False, "weight_decay_rate": 1e-3}],
  ids=["paper", "momentum", "unfactored"],
)
def test_16_1_complex_params_match_the_float64_reference(kwargs):
  """Against tests/reference.py in complex128, momentum included (which optax
  stores in float32, dropping its imaginary part: see the README)."""
  params = _complex_tree(COMPLEX_SHAPES, 2, 0.05)
  grads = _complex_grads(3)
  reference = Reference(Options(**kwargs), params)
  for g in grads:
    reference.step(g)
  ours, _ = run_optax(adafactor_jax.adafactor(**kwargs), params, grads)
  errors = relative_error(ours, reference.params, params)
  assert max(errors.values()) < 1e-5, errors


def _real_and_imaginary_only(seed: int) -> tuple[dict, list[dict]]:
  """Per parameter, values that are all real or all imaginary: there |G|² is
  the square of the one non-zero part, so optax's complex convention and
  split_real_and_imaginary (a real optimizer on each part) coincide."""
  params = _complex_tree(COMPLEX_SHAPES, seed, 0.05)
  grads = _complex_grads(seed + 1)

  def keep(tree):
    return {
      k: (v.real if k in ("kernel", "bias") else 1j * v.imag).astype(np.complex64)
      for k, v in tree.items()
    }

  return keep(params), [keep(g) for g in grads]


@pytest.mark.parametrize("kwargs", [{}, {"learning_rate": 1e-2, "momentum": 0.9}])
def test_16_1_complex_params_equal_split_real_and_imaginary_where_they_agree(kwargs):
  params, grads = _real_and_imaginary_only(4)
  ours, _ = run_optax(adafactor_jax.adafactor(**kwargs), params, grads)
  split = optax.contrib.split_real_and_imaginary(adafactor_jax.adafactor(**kwargs))
  theirs, _ = run_optax(split, params, grads)
  errors = relative_error(ours, theirs, params)
  assert max(errors.values()) < 1e-6, errors


def test_16_1_standalone_clip_and_scale_use_the_modulus():
  rng = np.random.default_rng(5)
  u = (rng.standard_normal((6, 7)) + 2j * rng.standard_normal((6, 7))).astype(np.complex64)
  x = (0.1 * rng.standard_normal((6, 7)) - 0.3j * rng.standard_normal((6, 7))).astype(np.complex64)
  rms_u = np.sqrt(np.mean(np.abs(u.astype(np.complex128)) ** 2))
  rms_x = np.sqrt(np.mean(np.abs(x.astype(np.complex128)) ** 2))
  clipped, _ = adafactor_jax.clip_by_update_rms(0.5).update({"u": u}, optax.EmptyState())
  np.testing.assert_allclose(clipped["u"], u / max(1.0, rms_u / 0.5), rtol=1e-6)
  assert clipped["u"].dtype == jnp.complex64
  scale = adafactor_jax.scale_by_parameter_scale(1e-3)
  scaled, _ = scale.update({"u": u}, optax.EmptyState(), {"u": x})
  np.testing.assert_allclose(scaled["u"], u * max(1e-3, rms_x), rtol=1e-6)


def test_16_1_complex_params_with_a_bfloat16_momentum_are_refused_by_name():
  tx = adafactor_jax.adafactor(learning_rate=1e-2, momentum=0.9, momentum_dtype=jnp.bfloat16)
  params = {"real": jnp.zeros(3), "layer": {"z": jnp.zeros(3, jnp.complex64)}}
  with pytest.raises(ValueError, match="bfloat16 has no complex counterpart.*'layer/z'"):
    tx.init(params)


def test_16_1_complex_step_temporaries_stay_bounded():
  """At most the bytes of the complex parameter: on XLA:CPU, |G|² (and |X|²)
  reach its reductions as float32 arrays, because they do not fuse complex
  element ops (measured: 1.00x; the float32 path needs 0.9%, asserted in
  test_factored.py and test_benchmarks.py)."""
  shapes = {"w": jax.ShapeDtypeStruct((1024, 512), jnp.complex64)}
  tx = adafactor_jax.adafactor(learning_rate=1e-2)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = jax.eval_shape(tx.init, shapes)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(shapes, state, shapes).compile()
  assert compiled.memory_analysis().temp_size_in_bytes <= 1.05 * 1024 * 512 * 8


# --------------------------------------------------------------------------- 16.2 abstract init


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


INIT_PARAMS = {
  "kernel": jnp.zeros((256, 192)),
  "bias": jnp.zeros(192, jnp.bfloat16),
  "z": jnp.zeros((4, 3), jnp.complex64),
  "scalar": jnp.zeros(()),
}


@pytest.mark.parametrize(
  "kwargs",
  [{}, {"momentum": 0.9, "stochastic_rounding": True, "skip_nonfinite": True}],
  ids=["paper", "every state"],
)
def test_16_2_init_on_shape_dtype_structs_returns_the_state(kwargs):
  tx = adafactor_jax.adafactor(**kwargs)
  state = tx.init(_abstract(INIT_PARAMS))
  assert_bit_identical(state, tx.init(INIT_PARAMS), "init from ShapeDtypeStructs")
  abstract_state = jax.eval_shape(tx.init, _abstract(INIT_PARAMS))
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
    lambda x: (x.shape, x.dtype), abstract_state
  )
  # One bare leaf, as optax's sharding_test does it, and the state updates.
  single = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
  assert tx.init(single) is not None
  grads = jax.tree.map(jnp.ones_like, INIT_PARAMS)
  updates, _ = jax.jit(tx.update)(grads, state, INIT_PARAMS)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


def test_16_2_init_on_shape_dtype_structs_places_the_state_by_their_sharding():
  device = jax.devices()[-1]
  sharding = jax.sharding.SingleDeviceSharding(device)
  params = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), INIT_PARAMS
  )
  tx = adafactor_jax.adafactor(momentum=0.9)
  state = tx.init(params)
  arrays = [x for x in jax.tree.leaves(state[0]) if x.ndim]
  assert arrays and all(x.devices() == {device} for x in arrays)
  # It steps like the state of concrete parameters, and stays on that device.
  concrete = jax.device_put(INIT_PARAMS, device)
  grads = jax.tree.map(lambda x: 0.1 * jnp.cos(x), concrete)
  updates, new_state = jax.jit(tx.update)(grads, state, concrete)
  expected, _ = jax.jit(tx.update)(grads, tx.init(INIT_PARAMS), INIT_PARAMS)
  jax.tree.map(np.testing.assert_array_equal, updates, expected)
  assert all(x.devices() == {device} for x in jax.tree.leaves(new_state))
  # state_shardings, which traces init, accepts the same abstract params.
  shardings = adafactor_jax.state_shardings(
    tx, params=params, param_shardings=jax.tree.map(lambda _: sharding, params)
  )
  assert jax.tree.structure(shardings) == jax.tree.structure(tx.init(params))


# --------------------------------------------------------------------------- 16.3 map_params


def _statistic_spec(x, spec):
  """The README's map_params function: the parameter's spec, with the axes a
  statistic averages over (size 1) left unsharded; None where there is none."""
  return (
    None if x is None else P(*(a if n > 1 else None for a, n in zip(spec, x.shape, strict=False)))
  )


def test_16_3_map_params_with_the_documented_is_leaf_gives_usable_specs():
  params = {"w": jnp.zeros((256, 192)), "b": jnp.zeros(192), "s": jnp.zeros(())}
  specs = {"w": P("data", "model"), "b": P("model"), "s": P()}
  tx = adafactor_jax.adafactor(momentum=0.9)
  state = tx.init(params)
  # optax's documented call stops at the None of a statistic that does not
  # apply (no placeholder arrays here); None as a leaf is the one change.
  with pytest.raises(ValueError, match="pytree structure"):
    optax.tree.map_params(
      tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: None
    )
  copied = optax.tree.map_params(
    tx,
    lambda _, spec: spec,
    state,
    specs,
    transform_non_params=lambda _: None,
    is_leaf=lambda x: x is None,
  )
  assert copied[0].v_row == {"w": specs["w"], "b": specs["b"], "s": specs["s"]}
  # A spec per statistic that jit accepts on any mesh: the averaged axes unsharded.
  state_specs = optax.tree.map_params(
    tx,
    _statistic_spec,
    state,
    specs,
    transform_non_params=lambda _: None,
    is_leaf=lambda x: x is None,
  )
  stats = state_specs[0]
  assert stats.count is None
  assert stats.v_row == {"w": P("data", None), "b": None, "s": None}
  assert stats.v_col == {"w": P(None, "model"), "b": None, "s": None}
  assert stats.v == {"w": None, "b": P("model"), "s": P()}
  assert state_specs[3].momentum == specs
  # Usable as they are: the init compiled with them as out_shardings.
  mesh = jax.make_mesh((1, 1), ("data", "model"))
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), state_specs)
  compiled = jax.jit(tx.init, out_shardings=shardings).lower(params).compile()
  assert jax.tree.structure(compiled.output_shardings) == jax.tree.structure(state)


# --------------------------------------------------------------------------- 16.4 jit(init)


PARAMS_4 = {
  "kernel": jnp.ones((256, 192)),
  "bias": jnp.ones(192),
  "conv": jnp.ones((3, 3, 128, 256)),
}


@pytest.mark.parametrize(
  "kwargs",
  [{}, {"momentum": 0.9, "stochastic_rounding": True, "rounding_seed": 7}],
  ids=["lr only", "momentum and rounding"],
)
def test_16_4_jit_init_under_inject_hyperparams_needs_no_static_args(kwargs):
  tx = optax.inject_hyperparams(adafactor_jax.adafactor)(learning_rate=1e-2, **kwargs)
  state = jax.jit(tx.init)(PARAMS_4)
  assert_bit_identical(state, tx.init(PARAMS_4), "jit(init) against init")
  stats = state.inner_state[0]
  assert stats.v_row["kernel"].shape == (256, 1) and stats.v["kernel"] is None
  assert stats.v["bias"].shape == (192,)
  updates, state = jax.jit(tx.update)(PARAMS_4, state, PARAMS_4)
  expected, _ = adafactor_jax.adafactor(learning_rate=1e-2, **kwargs).update(
    PARAMS_4, tx.init(PARAMS_4).inner_state, PARAMS_4
  )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), updates, expected)


def test_16_4_a_traced_min_dim_size_to_factor_keeps_the_clear_error():
  tx = optax.inject_hyperparams(adafactor_jax.adafactor)(min_dim_size_to_factor=200)
  with pytest.raises(ValueError, match="min_dim_size_to_factor is traced.*static_args"):
    jax.jit(tx.init)(PARAMS_4)
  static = optax.inject_hyperparams(adafactor_jax.adafactor, static_args="min_dim_size_to_factor")
  state = jax.jit(static(min_dim_size_to_factor=200).init)(PARAMS_4)
  stats = state.inner_state[0]
  assert stats.v["kernel"].shape == (256, 192)  # 192 < 200: not factored (128 would)
  assert stats.v_row["kernel"] is None


# --------------------------------------------------------------------------- 16.5 keyword-only


def _public_functions() -> dict:
  """Every public function of the package, its presets and its schedules."""
  found = {}
  for module, names in (
    (adafactor_jax, adafactor_jax.__all__),
    (presets, dir(presets)),
    (schedules, dir(schedules)),
  ):
    for name in names:
      value = getattr(module, name)
      if (
        not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__.startswith("adafactor_jax")
      ):
        found[f"{value.__module__}.{name}"] = value
  return found


def test_16_5_public_arguments_after_the_first_are_keyword_only():
  functions = _public_functions()
  assert len(functions) >= 20, sorted(functions)
  for name, function in functions.items():
    parameters = list(inspect.signature(function).parameters.values())[1:]
    kinds = {p.name: p.kind for p in parameters}
    allowed = {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}
    assert set(kinds.values()) <= allowed, (name, kinds)


def test_16_5_an_argument_order_ported_from_optax_is_refused():
  with pytest.raises(TypeError):
    adafactor_jax.adafactor(1e-2, 128)  # optax: min_dim_size_to_factor; here it was decay_rate
  with pytest.raises(TypeError):
    adafactor_jax.scale_by_factored_rms(0.8, 0, None)


# --------------------------------------------------------------------------- 16.6 maximize


def test_16_6_torch_adafactor_maximize_steps_like_the_negated_gradient():
  rng = np.random.default_rng(6)
  params = {"w": jnp.asarray(rng.standard_normal((8, 6)), jnp.float32), "b": jnp.ones(6)}
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), params) for _ in "abc"]
  kwargs = {"lr": 3e-2, "weight_decay": 0.5}
  ascend, _ = run_optax(presets.torch_adafactor(maximize=True, **kwargs), params, grads)
  negated = [jax.tree.map(jnp.negative, g) for g in grads]
  descend, _ = run_optax(presets.torch_adafactor(**kwargs), params, negated)
  # torch: grad = -grad when maximizing; weight decay still shrinks X.
  assert_bit_identical(ascend, descend, "maximize against descent on -G")
  plain, _ = run_optax(presets.torch_adafactor(**kwargs), params, grads)
  assert not np.allclose(ascend["w"], plain["w"])
  # Ascent on f(X) = sum(X): every parameter grows without weight decay.
  ones = [jax.tree.map(jnp.ones_like, params)] * 3
  up, _ = run_optax(presets.torch_adafactor(lr=3e-2, maximize=True), params, ones)
  assert all(np.all(up[k] > params[k]) for k in params)
  with pytest.raises(ValueError, match="maximize must be True or False"):
    presets.torch_adafactor(maximize=1)
