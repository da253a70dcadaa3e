"""Sharded optimizer state, and factored axes chosen by logical axis names."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from adafactor_jax import _checks
from adafactor_jax.factored import DEFAULT_MIN_DIM_SIZE_TO_FACTOR, FactorAxes, default_factor_dims

ROLES = ("row", "col", "batch", None)
"""What a logical axis name can stand for in :data:`STANDARD_FACTOR_RULES`."""

STANDARD_FACTOR_RULES: Mapping[str, str | None] = MappingProxyType(
  {
    # T5X's standard_logical_factor_rules(), with 'expert' as a batch axis.
    "embed": "row",
    "vocab": "col",
    "mlp": "col",
    "heads": "col",
    "kv": "col",
    "joined_kv": "col",
    "q_wi_fused": "col",
    "o_wo_fused": "col",
    "multiquery_heads": "col",
    "kv_fused": "col",
    "mlp_activations": "col",
    "layers": "batch",
    "stack": "batch",
    "expert": "batch",
    "relpos_buckets": None,
    "layer_norm_scale": None,
  }
)
"""Logical axis name -> role: 'row', 'col', 'batch', or None (neither).

Compatible with T5X's names. A row axis is kept by :math:`R` and averaged over
by :math:`C`, a column axis the converse; a batch axis indexes independent
parameters (scanned layers, experts). See :class:`adafactor_jax.FactorAxes`.
"""


# Duck-typed so that flax stays an optional dependency.
def _is_nnx_variable(x: Any) -> bool:
  return hasattr(x, "get_metadata")


def _is_linen_box(x: Any) -> bool:  # nn.Partitioned and nn.LogicallyPartitioned
  return hasattr(x, "names") and hasattr(x, "unbox")


def _is_names_leaf(x: Any) -> bool:
  if x is None or isinstance(x, PartitionSpec) or _is_nnx_variable(x) or _is_linen_box(x):
    return True
  return isinstance(x, (tuple, list)) and all(n is None or isinstance(n, (str, tuple)) for n in x)


def _axis_names(path: str, leaf: Any) -> tuple | None:
  """The logical names of one parameter's axes, or None when it has none."""
  if _is_nnx_variable(leaf):  # with sharding metadata, or a PartitionSpec from get_partition_spec
    value = leaf.get_value() if hasattr(leaf, "get_value") else None
    if isinstance(value, PartitionSpec) and len(value):
      return tuple(value)
    metadata = leaf.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      if metadata.get(key):
        return tuple(metadata[key])
    return None
  if _is_linen_box(leaf):
    return tuple(leaf.names)
  if leaf is None:
    return None
  if isinstance(leaf, (PartitionSpec, tuple, list)):
    return tuple(leaf)
  raise ValueError(
    f"param_axes at '{path}' is a {type(leaf).__name__}, not logical axis names. "
    "Pass a tree of PartitionSpecs or name tuples with the params' structure, "
    "e.g. nnx.get_partition_spec(nnx.state(model)) or nn.get_partition_spec(variables)."
  )


def _param_key(path: str) -> str:
  # An nnx.Variable in a params tree adds a '/value' key that a tree of its
  # PartitionSpecs may not have; a leaf cannot be both 'x' and 'x/value'.
  return path.removesuffix("/value")


def _role(name: Any, table: Mapping[str, str | None]) -> str | None:
  if isinstance(name, tuple):  # Several logical names on one axis: the first with a role.
    return next((r for r in (_role(n, table) for n in name) if r is not None), None)
  return table.get(name)


def logical_factor_dims(
  param_axes: Any,
  *,
  rules: Mapping[str, str | None] | None = None,
  min_dim_size_to_factor: int = DEFAULT_MIN_DIM_SIZE_TO_FACTOR,
) -> Callable[[str, tuple[int, ...]], FactorAxes]:
  """Chooses each parameter's factored and batch axes by its logical axis names.

  Each axis's name is looked up in :data:`STANDARD_FACTOR_RULES`, updated by
  ``rules``: 'row' and 'col' axes give :math:`R` and :math:`C` (several axes
  may share a role, e.g. an attention kernel ('embed', 'heads', 'kv')), and
  'batch' axes ('layers' of scanned blocks, 'expert') give each slice its
  own statistics, update clipping and parameter scale. A parameter is
  factored when its row axes and its column axes each hold at least
  ``min_dim_size_to_factor`` elements; smaller ones keep a full second moment.
  When the names give no row or no column axis (no names, unknown names, a
  bias), the default choice of :func:`adafactor_jax.default_factor_dims`
  applies to the non-batch axes, whatever the rank (T5X raises there, #243).
  For matrices the choice is then the default one: the rules only tell R from
  C, and :math:`\\hat V` is symmetric in them.

  Args:
    param_axes: a tree with the params' structure whose leaves name each
      parameter's axes: ``nnx.get_partition_spec(nnx.state(model))``,
      ``nn.get_partition_spec(variables)``, the boxed Flax params themselves
      (``nnx.Variable`` with sharding metadata, ``nn.Partitioned``), or
      PartitionSpecs / tuples of names; None for a parameter without names.
    rules: name -> 'row' | 'col' | 'batch' | None, added to (or overriding)
      the standard table.
    min_dim_size_to_factor: the least number of elements (>= 1) of the row
      axes and of the column axes for a parameter to be factored.

  Returns:
    A ``factor_dims`` callable ``(path, shape) -> FactorAxes`` (empty ``row``
    and ``col`` for a full second moment) for :func:`adafactor_jax.adafactor`,
    :func:`adafactor_jax.scale_by_factored_rms`,
    :func:`adafactor_jax.clip_by_update_rms` and
    :func:`adafactor_jax.scale_by_parameter_scale`. It raises ValueError for a
    parameter path that ``param_axes`` lacks, or whose names do not match its
    rank.
  """
  _checks.check_scalar("min_dim_size_to_factor", min_dim_size_to_factor, low=1, integer=True)
  if rules is not None and not isinstance(rules, Mapping):
    raise ValueError(f"rules must be a mapping of logical axis name -> role, got {rules!r}.")
  table = {**STANDARD_FACTOR_RULES, **(rules or {})}
  for name, role in table.items():
    if role not in ROLES:
      raise ValueError(
        f"rules[{name!r}] must be one of {ROLES} (row, column, batch, or neither), got {role!r}."
      )
  leaves = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=_is_names_leaf)[0]
  names_by_param = {}
  for key_path, leaf in leaves:
    path = _checks.path_name(key_path)
    names_by_param[_param_key(path)] = _axis_names(path, leaf)

  def choose(path: str, shape: tuple[int, ...]) -> FactorAxes:
    try:
      names = names_by_param[_param_key(path)]
    except KeyError:
      raise ValueError(
        f"logical_factor_dims has no axis names for parameter '{path}': param_axes "
        "must have the structure of the params the optimizer is given."
      ) from None
    if names is None:
      pair = default_factor_dims(shape, min_dim_size_to_factor=min_dim_size_to_factor)
      return FactorAxes((pair[0],), (pair[1],)) if pair else FactorAxes()
    if len(names) != len(shape):
      raise ValueError(
        f"Parameter '{path}' of shape {shape} has {len(names)} logical axis names "
        f"{names}; it needs one per axis."
      )
    roles = [_role(name, table) for name in names]
    row, col, batch = (tuple(i for i, r in enumerate(roles) if r == want) for want in ROLES[:3])
    if not (row and col):
      rest = [i for i in range(len(shape)) if i not in batch]
      pair = default_factor_dims(
        [shape[i] for i in rest], min_dim_size_to_factor=min_dim_size_to_factor
      )
      row, col = ((rest[pair[0]],), (rest[pair[1]],)) if pair else ((), ())
    elif min(math.prod(shape[i] for i in axes) for axes in (row, col)) < min_dim_size_to_factor:
      row, col = (), ()
    return FactorAxes(row, col, batch)

  return choose


def state_shardings(tx: optax.GradientTransformation, *, params: Any, param_shardings: Any) -> Any:
  """The shardings of ``tx.init(params)`` for params sharded as given.

  For ``in_shardings``/``out_shardings`` of ``jax.jit``, so that a sharded
  train step compiles before any array exists. ``params`` may be arrays or
  abstract values (``jax.eval_shape``, ``jax.ShapeDtypeStruct``);
  ``param_shardings`` is a tree of ``jax.sharding.Sharding`` (e.g.
  ``NamedSharding``) with the params' structure, on Auto or Explicit mesh axes.

  The answer is what ``jax.jit(tx.init)`` gives such params, read from XLA's
  compiled init (cheap: init only makes zeros): this library's state is made
  from the parameters, so that factored statistics are sharded like their
  parameter with the averaged axes replicated, full-size buffers (unfactored
  second moments, momentum) exactly like it, and counters replicated.

  Returns:
    A tree of shardings with the structure of ``tx.init(params)``.
  """

  def abstract(path: jax.tree_util.KeyPath, param: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    if not isinstance(sharding, Sharding):
      raise ValueError(
        f"param_shardings at '{_checks.path_name(path)}' must be a jax.sharding.Sharding "
        f"(e.g. NamedSharding(mesh, spec)), got {sharding!r}."
      )
    dtype = getattr(param, "dtype", None) or jnp.result_type(param)
    return jax.ShapeDtypeStruct(np.shape(param), dtype, sharding=sharding)

  _checks.check_tree_matches(param_shardings, params, what="param_shardings", shapes=False)
  abstract_params = jax.tree_util.tree_map_with_path(abstract, params, param_shardings)
  shardings = jax.jit(tx.init).lower(abstract_params).compile().output_shardings
  meshes = {s.mesh for s in jax.tree.leaves(param_shardings) if isinstance(s, NamedSharding)}
  if len(meshes) != 1:
    return shardings
  (mesh,) = meshes
  like = {
    tuple(path): (param.shape, sharding)
    for (path, param), sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract_params),
      jax.tree.leaves(param_shardings),
      strict=True,
    )
  }
  shapes = jax.eval_shape(tx.init, abstract_params)
  return jax.tree_util.tree_map_with_path(functools.partial(_placed, mesh, like), shapes, shardings)


def _placed(
  mesh: Any,
  like: dict[tuple[Any, ...], tuple[tuple[int, ...], Sharding]],
  path: jax.tree_util.KeyPath,
  leaf: jax.ShapeDtypeStruct,
  sharding: Sharding,
) -> Sharding:
  """The sharding of a state leaf, where jit's propagation alone gets it wrong.

  A leaf made from no parameter's value (optax's ``zeros_like`` moments, a step count) is
  placed by jit as it likes: replicated, or on the default device, which is not on the mesh
  when compiling ahead of time for other devices (a TPU topology). A leaf at a parameter's path
  (its path ends with the parameter's) and of its shape is sharded as that parameter; any
  other leaf off the mesh is replicated on it, as counters are.
  """
  if sharding.device_set <= set(mesh.devices.flat) and not sharding.is_fully_replicated:
    return sharding
  for start in range(len(path) + 1):
    param = like.get(tuple(path[start:]))
    if param is not None and param[0] == leaf.shape and not param[1].is_fully_replicated:
      return param[1]
  if sharding.device_set <= set(mesh.devices.flat):
    return sharding
  return NamedSharding(mesh, PartitionSpec())
