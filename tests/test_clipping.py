"""clip_by_update_rms: against the float64 reference of Section 6."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import adafactor_jax
from adafactor_jax import FactorAxes
from tests.conftest import assert_bit_identical, make_params
from tests.reference import clip_by_rms, slice_rms

# "stacked" is 4 layers of (160, 144): each is its own parameter.
STACKED = [("stacked", FactorAxes(row=(1,), col=(2,), batch=(0,)))]


def _updates(seed: int = 0) -> dict[str, jax.Array]:
  """Updates of every rank whose RMS runs from 0.03 to 30: some clipped, some not, and
  the four slices of 'stacked' at RMS 0.1, 0.7, 2 and 9."""
  rng = np.random.default_rng(seed)
  params = make_params(seed)
  scales = {"bias": 0.03, "kernel": 30.0, "narrow": 0.9, "stacked": 1.0, "conv": 4.0}
  updates = {k: scales[k] * rng.standard_normal(np.shape(p)) for k, p in params.items()}
  updates["stacked"] *= np.asarray([0.1, 0.7, 2.0, 9.0])[:, None, None]
  return {k: jnp.asarray(u, jnp.float32) for k, u in updates.items()}


def _batch_axes(name: str, factor_dims) -> tuple[int, ...]:
  return (0,) if factor_dims and name == "stacked" else ()


@pytest.mark.parametrize("threshold", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("factor_dims", [None, STACKED], ids=["whole", "per slice"])
def test_clips_as_the_float64_reference(threshold, factor_dims):
  updates = _updates()
  tx = adafactor_jax.clip_by_update_rms(threshold, factor_dims=factor_dims)
  clipped, state = jax.jit(tx.update)(updates, tx.init(updates))
  clipped_any = untouched_any = False
  for name, u in updates.items():
    batch_axes = _batch_axes(name, factor_dims)
    expected = clip_by_rms(u, threshold, batch_axes)
    assert clipped[name].dtype == jnp.float32
    np.testing.assert_allclose(clipped[name], expected, rtol=1e-6, atol=0, err_msg=name)
    over = slice_rms(u, batch_axes) > threshold
    clipped_any |= bool(np.any(over))
    untouched_any |= bool(np.any(~over))
    # Clipped slices end at RMS d; the others are returned bit for bit.
    rms_after = slice_rms(clipped[name], batch_axes)
    np.testing.assert_allclose(rms_after[over], threshold, rtol=1e-5)
    mask = np.broadcast_to(~over, u.shape)
    np.testing.assert_array_equal(np.asarray(clipped[name])[mask], np.asarray(u)[mask])
  assert clipped_any and untouched_any
  assert state == tx.init(updates)  # stateless


def test_per_slice_clipping_differs_from_whole_parameter_clipping():
  """The batch axis matters: whole, the stack is clipped by one RMS; per slice, its two
  small layers pass untouched and its two large ones are clipped each by its own."""
  u = _updates()["stacked"]
  whole, _ = adafactor_jax.clip_by_update_rms(1.0).update({"stacked": u}, None)
  per_slice, _ = adafactor_jax.clip_by_update_rms(1.0, factor_dims=STACKED).update(
    {"stacked": u}, None
  )
  np.testing.assert_array_equal(per_slice["stacked"][:2], u[:2])
  assert not np.allclose(whole["stacked"][:2], u[:2])
  np.testing.assert_allclose(slice_rms(per_slice["stacked"], (0,))[2:].ravel(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.complex64])
def test_low_precision_and_complex_updates(dtype):
  """The RMS is taken in float32 (of |U| for complex U); the update keeps its dtype."""
  rng = np.random.default_rng(3)
  u = 3.0 * rng.standard_normal((64, 48))
  if dtype == jnp.complex64:
    u = u + 2j * rng.standard_normal((64, 48))
  u = jnp.asarray(u, dtype)
  tx = adafactor_jax.clip_by_update_rms(0.5)
  clipped, _ = jax.jit(tx.update)({"u": u}, tx.init({"u": u}))
  assert clipped["u"].dtype == dtype
  expected = clip_by_rms(
    np.asarray(u.astype(jnp.complex64 if dtype == jnp.complex64 else jnp.float32)), 0.5
  )
  # One rounding to the dtype: half an ulp, relative, or of the least subnormal (float16).
  finfo = jnp.finfo(jnp.float32 if dtype == jnp.complex64 else dtype)
  rtol, atol = (1e-6, 0.0) if dtype == jnp.complex64 else (finfo.eps / 2, finfo.smallest_subnormal)
  actual = np.asarray(clipped["u"], expected.dtype)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=float(atol))


def test_telemetry_records_the_reference_figures_of_each_update_and_changes_no_bit():
  plain = adafactor_jax.clip_by_update_rms(1.0, factor_dims=STACKED)
  recorded = adafactor_jax.clip_by_update_rms(1.0, factor_dims=STACKED, telemetry=True)
  state = recorded.init(_updates())
  for seed in (1, 2):  # the second update's figures replace the first's
    updates = _updates(seed)
    expected, _ = plain.update(updates, plain.init(updates))
    clipped, state = jax.jit(recorded.update)(updates, state)
    assert_bit_identical(clipped, expected)
    figures = adafactor_jax.telemetry(state)
    for name, u in updates.items():
      batch_axes = _batch_axes(name, STACKED)
      rms = slice_rms(u, batch_axes).ravel()
      for i, r in enumerate(rms):
        where = f"{name}[{i}]" if batch_axes else name
        np.testing.assert_allclose(figures[f"{where}/rms_update_before_clipping"], r, rtol=1e-6)
        np.testing.assert_allclose(figures[f"{where}/clipping_denominator"], max(1.0, r), rtol=1e-6)
    assert len(figures) == 2 * (len(updates) - 1 + 4)
