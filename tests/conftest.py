"""Shared fixtures: parameters of every rank, and gradients to feed them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

# With libtpu installed (the [tpu] extra, to compile for TPU topologies without a TPU), jax
# probes for a TPU on first use and logs warnings on every process's stderr; the suite runs on
# the CPU, and compiling for a topology still works under JAX_PLATFORMS=cpu. libtpu's lock file
# would also keep two processes (a test and its subprocess) from compiling at once.
if importlib.util.find_spec("libtpu") is not None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np
import optax

from adafactor_jax._checks import path_name

# The configurations in which adafactor and optax.adafactor coincide
# (tests/test_alias.py), with argument names both take.
OPTAX_CASES = {
  "defaults": {},
  "no clipping": {"clipping_threshold": None},
  "no parameter scale": {"multiply_by_parameter_scale": False},
  "momentum": {"momentum": 0.9},
  "weight decay": {"weight_decay_rate": 1e-3},
  "not factored": {"factored": False},
  "min dim 16": {"min_dim_size_to_factor": 16},
  "decay_rate 0.6": {"decay_rate": 0.6},
}


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
  """1-D to 4-D float32 parameters; some factored by default, some not."""
  rng = np.random.default_rng(seed)
  shapes = {
    "bias": (300,),  # rank 1: full second moment
    "kernel": (256, 192),  # factored
    "narrow": (8, 300),  # second dim < 128: full second moment
    "stacked": (4, 160, 144),  # factored with a batch axis
    "conv": (3, 3, 128, 160),  # a conv kernel, factored on its two last axes
  }
  params = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
  params["bias"][:] = 0.0  # exercises epsilon2
  return params


def make_grads(params, step: int, seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng([seed, step])
  scale = 10.0 ** rng.uniform(-3, 1)  # the gradient scale moves across steps
  return {
    k: (scale * rng.standard_normal(p.shape) * (1 + rng.random(p.shape[-1:]))).astype(np.float32)
    for k, p in params.items()
  }


def run_optax(tx: optax.GradientTransformation, params, grads_list, jit: bool = True):
  """Applies tx for each gradient; returns (final params, final state)."""
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  if jit:
    step = jax.jit(step)
  for grads in grads_list:
    params, state = step(params, state, jax.tree.map(jnp.asarray, grads))
  return params, state


def run_accumulating_float64(
  tx: optax.GradientTransformation, params, grads_list, jit: bool = True
):
  """Like run_optax, but the parameters are kept in float64 by the harness.

  The optimizer sees float32 parameters and returns float32 updates; adding
  those in float64 keeps float32 *storage* rounding (which can be large next to
  a tiny step, e.g. with warmup_init) out of a comparison of the update numerics.
  """
  params64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
  state = tx.init(jax.tree.map(jnp.asarray, params))
  update = jax.jit(tx.update) if jit else tx.update
  for grads in grads_list:
    params32 = {k: jnp.asarray(v, jnp.float32) for k, v in params64.items()}
    updates, state = update(jax.tree.map(jnp.asarray, grads), state, params32)
    params64 = {k: params64[k] + np.asarray(updates[k], np.float64) for k in params64}
  return params64, state


def wide(x) -> np.ndarray:
  """x in float64, or complex128 if it is complex (a float64 cast drops the imaginary part)."""
  return np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)


def relative_error(actual: dict, expected: dict, start: dict) -> dict[str, float]:
  """Per leaf: |actual - expected| / |expected - start|, the error relative to
  the total parameter movement."""
  out = {}
  for k in expected:
    moved = np.linalg.norm(wide(expected[k]) - wide(start[k]))
    diff = np.linalg.norm(wide(actual[k]) - wide(expected[k]))
    out[k] = diff / moved
  return out


def bits(x) -> np.ndarray:
  """The raw bits of an array, so that -0.0 != +0.0 and NaN payloads count."""
  x = np.asarray(x)
  return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_bit_identical(actual, expected, what: str = "") -> None:
  """Same tree structure, and leaf by leaf the same dtype, shape and bits."""
  leaves_a, tree_a = jax.tree.flatten(actual)
  leaves_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e, what
  assert leaves_e, f"nothing to compare {what}"
  for i, (x, y) in enumerate(zip(leaves_a, leaves_e, strict=True)):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.dtype, x.shape) == (y.dtype, y.shape), (what, i)
    assert np.array_equal(bits(x), bits(y)), (what, i, x, y)


def assert_tree_allclose(actual, expected, **kwargs) -> None:
  """Same tree structure, and leaf by leaf np.testing.assert_allclose in float64."""
  leaves_a, tree_a = jax.tree.flatten(actual)
  leaves_e, tree_e = jax.tree.flatten(expected)
  assert tree_a == tree_e
  for x, y in zip(leaves_a, leaves_e, strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **kwargs)


def changed(a, b) -> bool:
  """True when some leaf of a differs in its bits from the matching leaf of b."""
  return any(
    not np.array_equal(bits(x), bits(y))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


_COLLECTIVE = re.compile(
  r"= (\(.*?\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
  r"(?:-start)?\("
)


def collectives(hlo_text: str) -> list[tuple[str, str]]:
  """(op, result type) of every cross-device collective in compiled HLO text."""
  return [(op, result) for result, op in _COLLECTIVE.findall(hlo_text)]


def named_leaves(tree) -> dict:
  """A tree's leaves by their '/'-joined paths."""
  return {path_name(path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def run_check_script(name: str) -> dict:
  """Runs tests/<name> (a script that simulates 8 devices, so must own its process) and
  returns the JSON it prints."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
    [sys.executable, os.path.join(root, "tests", name)],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=root,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def the_node(state, node_type):
  """The one node of ``node_type`` in an optimizer state (found by type, at any depth)."""
  (node,) = [
    n
    for n in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, node_type))
    if isinstance(n, node_type)
  ]
  return node
