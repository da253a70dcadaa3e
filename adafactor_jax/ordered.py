"""An optimizer step in groups of parameters, one group after another: for the TPU compiler."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from adafactor_jax import _checks


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def size_groups(params: optax.Params, *, groups: int) -> list[list[int]]:
  """The indices of ``params``' leaves (``jax.tree.leaves`` order) in ``groups`` groups of
  about equal size, largest leaves first: a leaf goes to the next group once the groups so
  far hold their share of the elements. Empty groups are dropped (fewer leaves than groups,
  or one leaf larger than a share)."""
  leaves = jax.tree.leaves(params)
  sizes = [int(np.size(x)) for x in leaves]
  order = sorted(range(len(leaves)), key=lambda i: (-sizes[i], i))
  share = sum(sizes) / groups
  found: list[list[int]] = [[]]
  held = 0
  for i in order:
    if found[-1] and held >= share * len(found):
      found.append([])
    found[-1].append(i)
    held += sizes[i]
  return [g for g in found if g]


def _only(tree: Any, keep: set[int]) -> Any:
  """``tree`` with every leaf but those numbered ``keep`` replaced by optax.MaskedNode."""
  leaves = [x if i in keep else optax.MaskedNode() for i, x in enumerate(jax.tree.leaves(tree))]
  return jax.tree.unflatten(jax.tree.structure(tree), leaves)


def _group_state(tx: optax.GradientTransformation, masked_params: Any, state: Any) -> Any:
  """The part of ``state`` that ``tx.init(masked_params)`` would hold: the same leaves where
  it holds a leaf, MaskedNode where it holds one. ValueError where the state does not split
  by parameter (an array with entries of several parameters, as telemetry's)."""
  structure = jax.eval_shape(tx.init, masked_params)

  def part(shape: Any, value: Any) -> Any:
    if _is_masked(shape):
      return shape
    if np.shape(value) != shape.shape:
      raise ValueError(
        "update_and_apply needs tx's state to split by parameter, but a state array of "
        f"shape {np.shape(value)} holds {shape.shape} for some of the parameters (figures of "
        "several parameters in one array, as telemetry=True keeps). Build tx without "
        "telemetry, or use groups=1."
      )
    return value

  try:
    return jax.tree.map(part, structure, state, is_leaf=_is_masked)
  except (ValueError, TypeError) as e:
    if "update_and_apply" in str(e):
      raise
    first_line = str(e).splitlines()[0]
    raise ValueError(
      "update_and_apply needs tx's state to split by parameter as tx.init builds it for some "
      "of the parameters, and this one does not (telemetry=True keeps the figures of every "
      f"parameter together): {first_line}. Build tx without telemetry, or use groups=1."
    ) from e


def _merged(state: Any, part: Any) -> Any:
  """``state`` with the leaves ``part`` holds (its MaskedNodes keep ``state``'s)."""
  return jax.tree.map(lambda p, s: s if _is_masked(p) else p, part, state, is_leaf=_is_masked)


def update_and_apply(
  tx: optax.GradientTransformation,
  *,
  grads: optax.Updates,
  opt_state: optax.OptState,
  params: optax.Params,
  groups: int = 3,
  **extra_args: Any,
) -> tuple[optax.Params, optax.OptState]:
  r"""``tx.update`` and ``optax.apply_updates``, in groups of parameters one after another.

  The same numerics as ``updates, state = tx.update(grads, opt_state, params)`` followed by
  ``optax.apply_updates(params, updates)``, for a ``tx`` that updates each parameter from
  its own gradient and value (:func:`adafactor_jax.adafactor` without telemetry and
  ``skip_nonfinite``; no global-norm clipping): the parameters go in ``groups`` groups of
  about equal size, largest first (:func:`size_groups`), and each group is updated and
  applied by ``tx`` on its own, its new values behind a ``jax.lax.optimization_barrier``
  with the next groups' inputs, so that the compiler finishes one group before it starts
  the next.

  Why: on the TPU compiler, a step over a tree of many small leaves beside a large one (an
  embedding) interleaves the leaves' passes, and its memory-space assignment then copies
  and evicts buffers: this library's update of GPT-2 counts 63.4 bytes accessed per
  parameter on v5p (22.0 through HBM), against optax.adafactor's 35.9 (26.1). One group
  after another, a group's passes run together and nothing is copied across groups: 40.3
  (19.2 through HBM; ``python -m benchmarks.run --topology v5p:2x2x1 --trees
  t5_small,gpt2_124m`` measures it; docs/tpu.md). That schedule depends on the program
  around the update: in a step that also returns a scalar, as a train step returns its
  loss, the plain update of GPT-2 counts 32.6 on v5p (19.9 through HBM) and T5-small's
  moves less through HBM plain than in groups (15.4 against 16.8; ``--scalar-out``).
  Compile your own step both ways. On XLA:CPU the barriers only order work that runs one
  fusion at a time anyway.

  The optimizer state is ``tx``'s as ``tx.init(params)`` builds it, split by parameter and
  merged back: a checkpoint of it is the same as of the unordered step.

  Args:
    tx: the optimizer; its update of one parameter must read that parameter's gradient and
      value only, and its state split by parameter (a ValueError names what does not).
    grads: the gradients, a tree like ``params``.
    opt_state: ``tx``'s state for ``params``.
    params: the parameters.
    groups: how many groups (default 3, the best of 2, 3, 4 and 8 on GPT-2 and T5-small on
      v5p); 1 is the plain step.
    **extra_args: passed to each group's ``tx.update``.

  Returns:
    ``(new_params, new_opt_state)``, as the plain step.
  """
  if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
    raise ValueError(f"update_and_apply: groups must be an int >= 1, got {groups!r}.")
  _checks.check_tree_matches(grads, params)
  parts = size_groups(params, groups=groups)
  if len(parts) == 1:
    updates, opt_state = tx.update(grads, opt_state, params, **extra_args)
    return optax.apply_updates(params, updates), opt_state
  _checks.check_per_parameter(
    tx,
    params,
    opt_state,
    "update_and_apply",
    "which a group's update never sees). Use the plain step, or groups=1.",
  )
  treedef: Any = jax.tree.structure(params)  # jaxlib has no type stub for PyTreeDef
  leaves, grad_leaves = treedef.flatten_up_to(params), treedef.flatten_up_to(grads)
  new_leaves: list[Any] = list(leaves)  # each group's new values replace these
  new_state = opt_state
  masked = [_only(params, set(part)) for part in parts]
  states = [_group_state(tx, m, opt_state) for m in masked]
  for k, part in enumerate(parts):
    if k:  # the group before finishes before this one, and the rest, read their inputs
      later = [i for p in parts[k:] for i in p]
      done, inputs, later_states = jax.lax.optimization_barrier(
        (
          [new_leaves[i] for i in parts[k - 1]],
          [(leaves[i], grad_leaves[i]) for i in later],
          states[k:],
        )
      )
      states[k:] = later_states
      for i, value in zip(parts[k - 1], done, strict=True):
        new_leaves[i] = value
      for i, (param, grad) in zip(later, inputs, strict=True):
        leaves[i], grad_leaves[i] = param, grad
    keep = set(part)
    group_params = _only(treedef.unflatten(leaves), keep)
    group_grads = _only(treedef.unflatten(grad_leaves), keep)
    updates, group_state = tx.update(group_grads, states[k], group_params, **extra_args)
    applied = jax.tree.leaves(optax.apply_updates(group_params, updates))
    for i, value in zip(sorted(keep), applied, strict=True):
      new_leaves[i] = value
    new_state = _merged(new_state, group_state)
  return treedef.unflatten(new_leaves), new_state
