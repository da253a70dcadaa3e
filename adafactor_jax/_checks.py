"""Shared by the transformations: validation of hyperparameters and trees, state zeros."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core


def concrete_value(value: Any) -> Any:
  """Returns `value` as a NumPy scalar, or None when it is traced (unknown)."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
  left = "(" if low_open or low is None else "["
  right = ")" if high_open or high is None else "]"
  low_text = "-inf" if low is None else f"{low:g}"
  high_text = "inf" if high is None else f"{high:g}"
  return f"{left}{low_text}, {high_text}{right}"


def check_scalar(
  name: str,
  value: Any,
  *,
  low: float | None = None,
  high: float | None = None,
  low_open: bool = False,
  high_open: bool = False,
  allow_none: bool = False,
  allow_schedule: bool = False,
  integer: bool = False,
  hint: str = "",
) -> None:
  """Raises ValueError naming `name` unless `value` is a real scalar in range.

  Traced values (as optax.inject_hyperparams passes under jit) cannot be
  inspected and are accepted; they were checked when the optimizer was built.
  """
  if value is None:
    if allow_none:
      return
    raise ValueError(f"{name} must not be None.")
  if allow_schedule and callable(value):
    return
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be a number, got the bool {value!r}.")
  array = concrete_value(value)
  if array is None:
    return
  kind = "an integer" if integer else "a real number"
  if allow_schedule:
    kind += " or a schedule (a callable of the step count)"
  if array.ndim != 0 or array.dtype.kind not in ("i", "u", "f"):
    raise ValueError(f"{name} must be {kind}, got {value!r}.")
  number = array.item()
  if integer and array.dtype.kind == "f" and not float(number).is_integer():
    raise ValueError(f"{name} must be an integer, got {value!r}.")
  bad = not math.isfinite(number)
  bad = bad or (low is not None and (number < low or (low_open and number == low)))
  bad = bad or (high is not None and (number > high or (high_open and number == high)))
  if bad:
    interval = _interval(low, high, low_open, high_open)
    message = f"{name} must be in {interval}, got {value!r}."
    raise ValueError(f"{message} {hint}".rstrip())


def check_bool(name: str, value: Any) -> None:
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}.")


def path_name(path: jax.tree_util.KeyPath) -> str:
  """'encoder/layers/0/kernel' for a key path; '<root>' for a bare array."""
  return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def check_tree_matches(
  updates: Any,
  reference: Any,
  *,
  what: str = "gradient",
  shapes: bool = True,
  reference_is_state: bool = False,
) -> None:
  """Raises ValueError naming the parameter path where the trees differ.

  `reference` holds the parameters, or anything with their shapes (arrays,
  ShapeDtypeStructs). Called at trace time: it costs nothing in the compiled
  step. With ``shapes=False`` only the structures are compared (a tree of
  shardings against the params). With ``reference_is_state``, the shapes are
  those the optimizer state was made for, and the message says so: a state
  that ``tx.init`` made for other parameters is not the gradient's fault.
  """
  against = (
    "the parameters the optimizer state was made for" if reference_is_state else ("the parameters")
  )
  update_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  reference_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  update_paths = {path_name(p): leaf for p, leaf in update_leaves}
  reference_paths = {path_name(p): leaf for p, leaf in reference_leaves}
  missing = [p for p in reference_paths if p not in update_paths]
  extra = [p for p in update_paths if p not in reference_paths]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"no {what} for parameter(s) {', '.join(map(repr, missing))}")
    if extra:
      parts.append(f"{what} for unknown parameter(s) {', '.join(map(repr, extra))}")
    raise ValueError(f"The {what} tree does not match {against}: {'; '.join(parts)}.")
  structure: Any = jax.tree.structure(updates)  # Any: jaxlib has no type stub for PyTreeDef
  if structure != jax.tree.structure(reference):
    raise ValueError(
      f"The {what} tree has the paths of {against} but not their structure "
      f"(container types differ): {structure} vs {jax.tree.structure(reference)}."
    )
  for path, leaf in update_paths.items() if shapes else ():
    expected = tuple(np.shape(reference_paths[path]))
    if tuple(np.shape(leaf)) != expected:
      if reference_is_state:
        raise ValueError(
          f"The {what} for parameter '{path}' has shape {tuple(np.shape(leaf))}, but the "
          f"optimizer state was made (by tx.init) for a parameter of shape {expected}: "
          "initialise the state with the parameters you train."
        )
      raise ValueError(
        f"The {what} for parameter '{path}' has shape {tuple(np.shape(leaf))}, "
        f"but the parameter has shape {expected}."
      )


def zeros_like_param(
  param: Any, dtype: Any = jnp.float32, *, reduced_axes: tuple[int, ...] = ()
) -> jax.Array:
  """Zeros of the parameter's shape, size 1 on ``reduced_axes``, sharded like it.

  Computed from the parameter, not made by ``jnp.zeros``, so that state
  follows the parameter's sharding: under ``jax.jit`` by propagation (Auto
  mesh axes) or by type (Explicit ones), with the reduced axes replicated;
  eagerly, as each op's output. ``jnp.zeros`` would put the whole state on one
  device. min(|x|, 0) is 0 for every x that ``nan_to_num`` leaves; XLA does not
  fold it to a constant (which would drop the sharding), and it runs once, in
  ``init``. An abstract parameter (``jax.ShapeDtypeStruct``) stands for zeros
  with its shape, dtype and sharding, so that eager ``init`` returns the same
  state as for real arrays (as optax's ``init`` does).
  """
  if isinstance(param, jax.ShapeDtypeStruct):
    param = jnp.zeros(param.shape, param.dtype, device=param.sharding)
  if jnp.iscomplexobj(param):
    param = jnp.abs(param)  # a cast to float32 would warn that it drops the imaginary part
  zeros = jnp.minimum(jnp.abs(jnp.nan_to_num(jnp.asarray(param, jnp.float32))), 0.0)
  if reduced_axes:
    zeros = jnp.sum(zeros, reduced_axes, keepdims=True)
  return zeros.astype(dtype)


def _sub_jaxpr(eqn: Any) -> Any:
  """The jaxpr an equation calls once with its operands (jit, custom_jvp, remat...), or None
  (loops, whose outputs feed back into their inputs, are left to the conservative rule)."""
  if eqn.primitive.name in ("scan", "while", "cond"):
    return None
  for value in eqn.params.values():
    jaxpr = getattr(value, "jaxpr", value)
    if isinstance(jaxpr, jax_core.Jaxpr) and len(jaxpr.invars) == len(eqn.invars):
      return jaxpr
  return None


def _dependencies(jaxpr: Any) -> list[frozenset[int]]:
  """For each output of ``jaxpr``, the indices of the inputs it may depend on.

  Conservative: an equation's outputs depend on all its inputs, except through an
  optimization barrier (output i on input i) and calls, which are followed inside.
  """
  found: dict[Any, frozenset[int]] = {v: frozenset([i]) for i, v in enumerate(jaxpr.invars)}

  def of(v: Any) -> frozenset[int]:
    return found.get(v, frozenset()) if isinstance(v, jax_core.Var) else frozenset()

  for eqn in jaxpr.eqns:
    inputs = [of(v) for v in eqn.invars]
    inner = _sub_jaxpr(eqn)
    if eqn.primitive.name == "optimization_barrier":
      outputs = inputs
    elif inner is not None:
      outputs = [frozenset().union(*(inputs[j] for j in deps)) for deps in _dependencies(inner)]
    else:
      outputs = [frozenset().union(*inputs)] * len(eqn.outvars)
    found.update(zip(eqn.outvars, outputs, strict=True))
  return [of(v) for v in jaxpr.outvars]


def check_per_parameter(tx: Any, params: Any, state: Any, caller: str, why: str) -> None:
  """Raises ValueError unless ``tx``'s update of each parameter reads its own gradient and
  value only (traced on ``params``' shapes; ``why`` ends the message: what the caller lacks,
  and what to do instead)."""
  paths = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  n = len(paths)

  def update(grads: Any, params: Any, state: Any) -> Any:
    return tx.update(grads, state, params)[0]

  shapes = jax.eval_shape(lambda: (params, state))
  closed = jax.make_jaxpr(update)(shapes[0], shapes[0], shapes[1])
  for i, deps in enumerate(_dependencies(closed.jaxpr)[:n]):
    # Inputs 0..n-1 are the gradients, n..2n-1 the parameters, then the state.
    others = sorted({d % n for d in deps if d < 2 * n} - {i})
    if others:
      raise ValueError(
        f"{caller} needs tx to update each parameter from its own gradient and value, but "
        f"the update of '{paths[i]}' reads those of '{paths[others[0]]}' (a global-norm clip, "
        f"or a step skipped or accumulated as a whole, needs every gradient at once, {why}"
      )
