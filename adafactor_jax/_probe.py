"""The probe that warm_start_state passes down a chain as an extra argument."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ARG = "adafactor_jax_warm_start_probe"
"""The name of the extra argument of ``update`` that carries a :class:`Probe`."""


class Probe:
  """Asks this library's stateful transformations for the update of a given tree.

  Given as the extra argument ``ARG`` to ``tx.update`` (optax.chain, masked,
  multi_transform and inject_hyperparams pass extra arguments on), it makes
  :func:`adafactor_jax.scale_by_factored_rms` precondition with its statistics
  as they are (no decay, no new G²) and :func:`adafactor_jax.ema_momentum` store
  the update it is given instead of averaging it in. Each counts itself here,
  at trace time, so that the caller can tell whether the probe reached them all.
  """

  def __init__(self) -> None:
    self.statistics = 0
    self.momentum = 0


def find(extra_args: Mapping[str, Any]) -> Probe | None:
  probe = extra_args.get(ARG)
  return probe if isinstance(probe, Probe) else None


DEFERRED_CLIPPING_ARG = "adafactor_jax_deferred_clipping"
"""The name of the extra argument of ``update`` that carries a :class:`DeferredClipping`."""


class DeferredClipping:
  """Moves update clipping from :func:`adafactor_jax.scale_by_factored_rms` into int8
  :func:`adafactor_jax.ema_momentum`, for :func:`adafactor_jax.adafactor` alone.

  Given as the extra argument ``DEFERRED_CLIPPING_ARG``, it makes the factored transformation
  return its update unclipped and leave its clipping denominators here, one per leaf in the
  update's leaf order, and the momentum divide by them, so that it sees the unclipped update
  too and can bound each line's maximum in the pass that computes the clipping denominator
  (:func:`adafactor_jax.momentum.chord_bound`). Only a chain whose transformations between
  the two scale each leaf by a factor (step size, parameter scale) gives the same update
  either way; :func:`adafactor_jax.adafactor` passes it only to such a chain and checks, with
  :meth:`check`, that both took part.
  """

  def __init__(self) -> None:
    self.denominators: list[Any] | None = None
    self.taken = False

  def check(self) -> None:
    if self.denominators is None or not self.taken:
      raise AssertionError(
        "deferred clipping: the factored transformation gave its denominators "
        f"({self.denominators is not None}) and the momentum took them ({self.taken}); both must"
      )


def find_deferred_clipping(extra_args: Mapping[str, Any]) -> DeferredClipping | None:
  deferral = extra_args.get(DEFERRED_CLIPPING_ARG)
  return deferral if isinstance(deferral, DeferredClipping) else None
