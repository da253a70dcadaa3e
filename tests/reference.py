"""An independent float64 NumPy reference of Adafactor (Shazeer & Stern 2018).

Written from the paper, not from the library: the factored statistics use the
paper's row and column *sums* with the factored axes moved last, the second
moment is formed as the full matrix V̂ = R Cᵀ / (1ᵀR), and every step is
float64. Options follow `adafactor_jax.adafactor`'s documented order of
operations. Complex parameters are complex128, with |G|² in place of G² and
|U|², |X|² in the RMS values (the convention of optax's complex support).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import ml_dtypes
import numpy as np


def _wide(x) -> np.ndarray:
  """x in float64, or complex128 if it is complex."""
  return np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)


def _abs2(x: np.ndarray) -> np.ndarray:
  """|x|², real; x * x for real x."""
  return (x * np.conj(x)).real


def int8_block_axis(shape: tuple[int, ...]) -> int | None:
  """The longest axis (the later one on a tie); None for a scalar, its own block."""
  return max(range(len(shape)), key=lambda i: (shape[i], i)) if shape else None


def line_max(x: np.ndarray) -> np.ndarray:
  """max |x| over each int8 block (a line along the longest axis), keeping that axis."""
  axis = int8_block_axis(x.shape)
  return np.abs(x) if axis is None else np.max(np.abs(x), axis, keepdims=True)


def int8_round_trip(m: np.ndarray, absmax: np.ndarray | None = None) -> np.ndarray:
  """m as int8 momentum stores it: one block per line along the longest axis (the
  later one on a tie; a scalar alone), values rounded to the grid of absmax / 127
  (to nearest even), in float64; absmax is max|m| per line unless given (an upper
  bound of it)."""
  if absmax is None:
    absmax = line_max(m)
  with np.errstate(invalid="ignore", divide="ignore"):
    q = np.where(absmax > 0, np.round(127 * m / absmax), 0.0)
  return q * (absmax / 127)


def two_largest_axes(shape, min_dim_size_to_factor):
  """Two largest dims (later axis wins a tie), if the smaller is large enough."""
  if len(shape) < 2:
    return None
  ranked = sorted(range(len(shape)), key=lambda i: (shape[i], i))
  first, second = ranked[-1], ranked[-2]
  if shape[second] < min_dim_size_to_factor:
    return None
  return tuple(sorted((first, second)))


@dataclass
class Options:
  learning_rate: float | Callable[[int], float] | None = None
  decay_rate: float = 0.8
  decay_offset: int = 0
  beta2_cap: float | None = None
  clipping_threshold: float | None = 1.0
  multiply_by_parameter_scale: bool = True
  epsilon1: float = 1e-30
  epsilon2: float = 1e-3
  warmup_init: bool = False
  momentum: float | None = None
  momentum_dtype: str = "float32"
  weight_decay_rate: float | Callable[[int], float] | None = None
  weight_decay_mask: dict | None = None
  factored: bool = True
  min_dim_size_to_factor: int = 128
  skip_nonfinite: bool = False
  weight_decay_scaled_by_step: bool = False
  maximize: bool = False
  # (shape) -> factored axes; None for two_largest_axes with min_dim_size_to_factor.
  factor_axes: Callable[[tuple[int, ...]], tuple[int, int] | None] | None = None
  # int8 momentum on each line's exact maximum, as ema_momentum in a chain of its own;
  # adafactor itself, with clipping, takes the chord bound.
  int8_exact_maxima: bool = False


@dataclass
class LeafState:
  axes: tuple[int, int] | None
  row: np.ndarray | None = None  # sums over the column axis, shape (..., n)
  col: np.ndarray | None = None  # sums over the row axis, shape (..., m)
  v: np.ndarray | None = None
  m: np.ndarray | None = None


@dataclass
class Reference:
  """Runs Adafactor in float64 on a dict of NumPy parameters."""

  options: Options
  params: dict
  t: int = 0
  skipped: int = 0
  state: dict = field(default_factory=dict)
  # What the last step computed on the way (the library's telemetry): per parameter
  # RMS(U) before clipping, the clipping denominator, the parameter scale and the RMS
  # of the step before momentum and weight decay; per step beta2 and the step size.
  figures: dict = field(default_factory=dict)
  beta2: float = 0.0
  step_size: float = 0.0

  def __post_init__(self):
    self.params = {k: _wide(v) for k, v in self.params.items()}
    o = self.options
    for name, x in self.params.items():
      if not o.factored:
        axes = None
      elif o.factor_axes is not None:
        axes = o.factor_axes(x.shape)
      else:
        axes = two_largest_axes(x.shape, o.min_dim_size_to_factor)
      leaf = LeafState(axes)
      if axes is None:
        leaf.v = np.zeros(x.shape)
      else:
        moved = np.moveaxis(x, axes, (-2, -1))
        leaf.row = np.zeros(moved.shape[:-1])
        leaf.col = np.zeros(moved.shape[:-2] + moved.shape[-1:])
      if o.momentum is not None:
        leaf.m = np.zeros_like(x)
      self.state[name] = leaf

  def _beta2(self, t):
    o = self.options
    beta2 = 1.0 - max(t - o.decay_offset, 1) ** (-o.decay_rate)
    return beta2 if o.beta2_cap is None else min(beta2, o.beta2_cap)

  def _step_size(self, t):
    o = self.options
    if o.learning_rate is None:
      limit = 1e-6 * t if o.warmup_init else 1e-2
      return min(limit, 1.0 / np.sqrt(t))
    if callable(o.learning_rate):
      return float(o.learning_rate(t - 1))
    return o.learning_rate

  def step(self, grads: dict) -> None:
    o = self.options
    grads = {k: _wide(g) for k, g in grads.items()}
    if o.skip_nonfinite and not all(np.all(np.isfinite(g)) for g in grads.values()):
      self.skipped += 1
      return
    self.t += 1
    t = self.t
    beta2 = self.beta2 = self._beta2(t)
    self.step_size = self._step_size(t)
    for name, g in grads.items():
      x, leaf = self.params[name], self.state[name]
      if leaf.axes is None:
        leaf.v = beta2 * leaf.v + (1 - beta2) * (_abs2(g) + o.epsilon1)
        u = g / np.sqrt(leaf.v)
      else:
        g_moved = np.moveaxis(g, leaf.axes, (-2, -1))
        sq = _abs2(g_moved) + o.epsilon1
        # The paper's sums: R = (G²+ε1) 1_m, C = 1_nᵀ (G²+ε1); the library keeps
        # means, and R Cᵀ / (1ᵀR) is the same either way.
        leaf.row = beta2 * leaf.row + (1 - beta2) * sq.sum(-1)
        leaf.col = beta2 * leaf.col + (1 - beta2) * sq.sum(-2)
        v_hat = leaf.row[..., :, None] * leaf.col[..., None, :] / leaf.row.sum(-1)[..., None, None]
        u = np.moveaxis(g_moved / np.sqrt(v_hat), (-2, -1), leaf.axes)
      figures = self.figures[name] = {"rms_update_before_clipping": np.sqrt(np.mean(_abs2(u)))}
      if o.clipping_threshold is not None:
        denominator = max(1.0, np.sqrt(np.mean(_abs2(u))) / o.clipping_threshold)
        figures["clipping_denominator"] = denominator
        u = u / denominator
      wd = None
      if o.weight_decay_rate is not None and (o.weight_decay_mask or {}).get(name, True):
        wd = o.weight_decay_rate(t - 1) if callable(o.weight_decay_rate) else o.weight_decay_rate
      if wd is not None and o.weight_decay_scaled_by_step:
        u = u + wd * x  # HF: multiplied by the step size and parameter scale below
      alpha = -self._step_size(t) if o.maximize else self._step_size(t)
      if o.multiply_by_parameter_scale:
        figures["parameter_scale"] = max(o.epsilon2, np.sqrt(np.mean(_abs2(x))))
        alpha *= figures["parameter_scale"]
      u = alpha * u
      figures["rms_step"] = np.sqrt(np.mean(_abs2(u)))
      if o.momentum is not None:
        new_m = o.momentum * leaf.m + (1 - o.momentum) * u
        if o.momentum_dtype == "bfloat16":
          # As the library documents: float32 arithmetic, rounded once, and the
          # parameters move by the momentum as stored.
          new_m = new_m.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        elif (
          o.momentum_dtype == "int8"
          and "clipping_denominator" in figures
          and not o.int8_exact_maxima
          and not (wd is not None and o.weight_decay_scaled_by_step)
        ):
          # adafactor's grid with clipping: f(c) = max|β1 M + (1-β1) c W| is convex in c, and
          # at c = 1/δ below the chord (1 - c) f(0) + c f(1), W the unclipped step.
          c = 1.0 / figures["clipping_denominator"]
          unclipped = u / c
          bound = (1 - c) * line_max(o.momentum * leaf.m) + c * line_max(
            o.momentum * leaf.m + (1 - o.momentum) * unclipped
          )
          new_m = int8_round_trip(new_m, bound)
        elif o.momentum_dtype == "int8":
          new_m = int8_round_trip(new_m)
        leaf.m = u = new_m
      if wd is not None and not o.weight_decay_scaled_by_step:
        u = u + wd * x
      self.params[name] = x - u


def _reduced_axes(x: np.ndarray, batch_axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(i for i in range(x.ndim) if i not in batch_axes)


def slice_rms(x, batch_axes: tuple[int, ...] = ()) -> np.ndarray:
  """sqrt(mean(|x|²)) in float64 over every axis but ``batch_axes``, kept as size 1."""
  x = _wide(x)
  return np.sqrt(np.mean(_abs2(x), axis=_reduced_axes(x, batch_axes), keepdims=True))


def clip_by_rms(u, threshold: float, batch_axes: tuple[int, ...] = ()) -> np.ndarray:
  """Section 6: U / max(1, RMS(U)/d), per slice along ``batch_axes``, in float64."""
  return _wide(u) / np.maximum(1.0, slice_rms(u, batch_axes) / threshold)


def parameter_scale(x, epsilon2: float, batch_axes: tuple[int, ...] = ()) -> np.ndarray:
  """Section 8: max(ε2, RMS(X)), per slice along ``batch_axes``, in float64."""
  return np.maximum(epsilon2, slice_rms(x, batch_axes))


@dataclass
class StableAdamW:
  """StableAdamW in float64, as Algorithm 1 of Wortsman et al. (2023) writes it.

  The bias correction sits in the decay rates, β̂ = β(1 − β^{t−1})/(1 − β^t), so that the
  averages v_t (of g_t) and u_t (of g_t², the paper's names) are the corrected moments
  themselves; then, per tensor, RMS_t = sqrt(mean(g_t² / max(u_t, ε²))) (the paper's
  sqrt(E[g_t²/u_t]), guarded as the authors' code guards it), η_t = α_t / max(1, RMS_t / d),
  θ_t = θ_{t−1} − η_t λ θ_{t−1} − η_t v_t / (√u_t + ε). ``learning_rate`` is a float or
  ``step -> α`` with the step counted from 0 (optax's schedules); ``denominators`` holds
  the last step's max(1, RMS_t / d) per parameter.
  """

  params: dict
  learning_rate: float | Callable[[int], float]
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.0
  clipping_threshold: float = 1.0
  t: int = 0
  moments: dict = field(default_factory=dict)
  denominators: dict = field(default_factory=dict)

  def __post_init__(self):
    self.params = {k: _wide(v) for k, v in self.params.items()}
    self.moments = {k: (np.zeros_like(x), np.zeros_like(x)) for k, x in self.params.items()}

  def step(self, grads: dict) -> None:
    self.t += 1
    t = self.t
    b1_hat = self.b1 * (1 - self.b1 ** (t - 1)) / (1 - self.b1**t)
    b2_hat = self.b2 * (1 - self.b2 ** (t - 1)) / (1 - self.b2**t)
    alpha = self.learning_rate(t - 1) if callable(self.learning_rate) else self.learning_rate
    for name, g in grads.items():
      g, theta = _wide(g), self.params[name]
      v, u = self.moments[name]
      v = b1_hat * v + (1 - b1_hat) * g
      u = b2_hat * u + (1 - b2_hat) * g * g
      self.moments[name] = v, u
      rms = np.sqrt(np.mean(g * g / np.maximum(u, self.eps**2)))
      denominator = self.denominators[name] = max(1.0, rms / self.clipping_threshold)
      eta = float(alpha) / denominator
      self.params[name] = (
        theta - eta * self.weight_decay * theta - eta * v / (np.sqrt(u) + self.eps)
      )
