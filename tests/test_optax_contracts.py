"""What optax's own tests ask of every optimizer (issue 16), item by item.

Complex parameters, ``init`` on abstract params, ``optax.tree.map_params``,
``jax.jit(tx.init)`` inside ``optax.inject_hyperparams``, keyword-only
arguments, and torch's ``maximize``.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import pytest

import adafactor_jax
from adafactor_jax import presets, schedules

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
    if function is adafactor_jax.state_shardings:
      # The deprecated positional form, kept while its last callers move (it warns).
      assert parameters[0].kind is inspect.Parameter.VAR_POSITIONAL
      parameters = parameters[1:]
    kinds = {p.name: p.kind for p in parameters}
    allowed = {inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD}
    assert set(kinds.values()) <= allowed, (name, kinds)


def test_16_5_an_argument_order_ported_from_optax_is_refused():
  with pytest.raises(TypeError):
    adafactor_jax.adafactor(1e-2, 128)  # optax: min_dim_size_to_factor; here it was decay_rate
  with pytest.raises(TypeError):
    adafactor_jax.scale_by_factored_rms(0.8, 0, None)


def test_16_5_state_shardings_positional_form_warns_and_agrees():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params, shardings = {"w": jnp.zeros((256, 512))}, {"w": device}
  tx = adafactor_jax.adafactor()
  expected = adafactor_jax.state_shardings(tx, params=params, param_shardings=shardings)
  with pytest.warns(DeprecationWarning, match="by keyword"):
    assert adafactor_jax.state_shardings(tx, params, shardings) == expected
  with pytest.raises(TypeError, match="by keyword"):
    adafactor_jax.state_shardings(tx, params, param_shardings=shardings)
