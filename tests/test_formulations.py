"""The step's two formulations compute one algorithm.

`factored._precondition` and `momentum._stored_once` choose their formulation by the platform
the step is compiled for: XLA:CPU's (barriers, stacked row means) on the CPU, the algorithm as
written on every other compiler (the TPU's). On this CPU the rest of the suite runs the first
only; here the second runs on the CPU too, against the float64 reference, at extreme values,
and against the first, on plain matrices and on stacked layers (rank-3 leaves whose leading
axis is a batch axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adafactor_jax
from adafactor_jax import factored, momentum
from tests import test_alias, test_extreme_values
from tests.conftest import make_grads, make_params, relative_error, run_accumulating_float64


def _use_other_compilers_formulation(monkeypatch: pytest.MonkeyPatch) -> None:
  monkeypatch.setattr(factored, "_precondition_for_cpu", factored._precondition_plain)
  monkeypatch.setattr(momentum, "_stored_once", lambda tree: tree)


@pytest.fixture
def other_compilers_formulation(monkeypatch: pytest.MonkeyPatch) -> None:
  _use_other_compilers_formulation(monkeypatch)


@pytest.mark.usefixtures("other_compilers_formulation")
@pytest.mark.parametrize("name", list(test_alias.CASES))
def test_matches_float64_reference(name):
  test_alias.test_matches_float64_reference(name)


@pytest.mark.usefixtures("other_compilers_formulation")
@pytest.mark.parametrize("pattern", list(test_extreme_values.PATTERNS))
@pytest.mark.parametrize("option", ["defaults", "no clipping"])
def test_extreme_gradients_match_the_reference(option, pattern):
  test_extreme_values.test_extreme_gradients_stay_finite_and_match_the_reference(
    option, "float32", pattern
  )


@pytest.mark.usefixtures("other_compilers_formulation")
@pytest.mark.parametrize("shape", [(130,), (256, 130), (3, 200, 140)])
def test_gradients_too_large_to_square_stay_finite(shape):
  test_extreme_values.test_gradients_too_large_to_square_in_float32_stay_finite(3e38, shape, 1.0)


STACKED = {
  "layers": (3, 160, 144),  # scanned layers: a batch axis, then the factored pair
  "experts": (4, 2, 128, 136),  # two batch axes
}
STACKED_FACTOR_DIMS = [
  ("layers", adafactor_jax.FactorAxes(row=(1,), col=(2,), batch=(0,))),
  ("experts", adafactor_jax.FactorAxes(row=(2,), col=(3,), batch=(0, 1))),
]


def _params(tree: str) -> dict[str, np.ndarray]:
  if tree == "plain":
    return make_params()
  rng = np.random.default_rng(0)
  return {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in STACKED.items()}


@pytest.mark.parametrize("tree", ["plain", "stacked"])
@pytest.mark.parametrize(
  "kwargs",
  [
    {},
    {"learning_rate": 1e-2},
    {"clipping_threshold": None},
    {"factored": False},
    {"momentum": 0.9},
    {"momentum": 0.9, "momentum_dtype": jnp.bfloat16},
    {"momentum": 0.9, "momentum_dtype": jnp.int8},
    {"telemetry": True},
  ],
  ids=lambda kwargs: ",".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults",
)
def test_the_formulations_agree(monkeypatch, tree, kwargs):
  """Twelve steps of each, from the same start: the parameters' paths agree to float32
  rounding (measured: at most 8.5e-8 of the movement). bfloat16 and int8 momentum round
  nearly equal float32 values, so a one-ulp difference before rounding can move an element
  by a grid step (measured: 2.1e-5 and 7.4e-5 of the movement). The telemetry agrees too."""
  if tree == "stacked":
    kwargs = {**kwargs, "factor_dims": STACKED_FACTOR_DIMS}
  params = _params(tree)
  grads = [make_grads(params, step) for step in range(12)]
  cpu, cpu_state = run_accumulating_float64(adafactor_jax.adafactor(**kwargs), params, grads)
  _use_other_compilers_formulation(monkeypatch)
  other, other_state = run_accumulating_float64(adafactor_jax.adafactor(**kwargs), params, grads)
  for leaf in params:
    assert np.any(cpu[leaf] != params[leaf]), leaf
  errors = relative_error(other, cpu, params)
  rounded = kwargs.get("momentum_dtype") in (jnp.bfloat16, jnp.int8)
  assert max(errors.values()) < (1e-3 if rounded else 1e-6), errors
  if kwargs.get("telemetry"):
    cpu_figures, other_figures = (adafactor_jax.telemetry(s) for s in (cpu_state, other_state))
    assert cpu_figures.keys() == other_figures.keys()
    for name, value in cpu_figures.items():
      np.testing.assert_allclose(other_figures[name], value, rtol=1e-5, err_msg=name)


def test_each_platform_compiles_its_own_formulation():
  """The CPU's program holds the barriers of its formulation; the same step lowered for the
  TPU holds none (no device needed to lower)."""
  tx = adafactor_jax.adafactor(momentum=0.9, momentum_dtype=jnp.bfloat16)
  params = {"w": jnp.ones((256, 192))}
  state = tx.init(params)

  def step(params, state, grads):
    return tx.update(grads, state, params)

  traced = jax.jit(step).trace(params, state, params)
  cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
  tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
  assert "optimization_barrier" in cpu
  assert "optimization_barrier" not in tpu
