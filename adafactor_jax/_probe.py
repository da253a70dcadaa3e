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
