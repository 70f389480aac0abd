"""Range-coding tables, identical on every machine, and parameter quantization.

  _dexp, _dlog, ...     elementary functions from correctly rounded IEEE
                        operations only (no libm), so every machine builds
                        bit-identical float64 tables
  scale_index, centre   the quantized entropy parameters: a table level per
                        scale (nearest in log) and an integer centre per mean
  boundary_flags        elements too close to a quantization boundary for a
                        decoder on another backend to agree (the fix lists)
  gaussian_tables       one zero-mean discretized Gaussian per scale level
  factorized_tables     per-channel tables of a FactorizedPrior (hyper-latents)

docs/bitstream.md explains the scheme and its guarantees.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import constriction
import numpy as np

from tcr_jax.codec import entropy

SCALE_MIN = entropy.SCALE_LOWER_BOUND
SCALE_MAX = 256.0
SCALE_LEVELS = 64
TAIL_MASS = 1e-9
DEFAULT_TOL = 2e-5
MAX_TOL = 1e-4
CENTRE_LIMIT = 512  # means beyond +-512 use centre 0
MAX_ABS_VALUE = 1 << 31  # largest coded |latent|
MAX_HYPER_SUPPORT = 1 << 13  # symbols per hyper-latent channel table

_model = constriction.stream.model


# --------------------------------------------------------------------------
# Deterministic elementary functions: only correctly rounded IEEE operations,
# so every machine computes the same float64 tables bit for bit.

_LN2_HI = 6.93147180369123816490e-01  # 32 significant bits: n * hi is exact
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_SQRT_HALF = 0.70710678118654752440
_INV_SQRT_PI = 0.56418958354775628695


def _dexp(x) -> np.ndarray:
  """exp(x): range reduction by ln 2 and a degree-16 Taylor polynomial."""
  x = np.clip(np.asarray(x, np.float64), -745.0, 709.0)
  n = np.floor(x * _INV_LN2 + 0.5)
  r = (x - n * _LN2_HI) - n * _LN2_LO  # |r| <= 0.347
  p = np.ones_like(r)
  for k in range(16, 0, -1):
    p = 1.0 + r * p / k
  return np.ldexp(p, n.astype(np.int32))


def _dlog(x) -> np.ndarray:
  """log(x), x > 0: frexp, then 2 atanh((m - 1) / (m + 1)) as a series."""
  m, e = np.frexp(np.asarray(x, np.float64))
  low = m < _SQRT_HALF
  m = np.where(low, m * 2.0, m)
  e = (e - low).astype(np.float64)
  s = (m - 1.0) / (m + 1.0)  # |s| <= 0.1716
  s2 = s * s
  series = np.zeros_like(s)
  for k in range(12, -1, -1):
    series = 1.0 / (2 * k + 1) + s2 * series
  return e * _LN2_HI + (e * _LN2_LO + 2.0 * s * series)


def _dtanh(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  t = _dexp(-2.0 * np.abs(x))
  return np.sign(x) * (1.0 - t) / (1.0 + t)


def _dsigmoid(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  e = _dexp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _dsoftplus(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return np.maximum(x, 0.0) + _dlog(1.0 + _dexp(-np.abs(x)))


def _derfc(x) -> np.ndarray:
  """erfc(x) for x >= 0: Taylor series of erf below 1.5, continued fraction above."""
  x = np.asarray(x, np.float64)
  small = x < 1.5
  z = np.where(small, x, 0.0)
  z2 = z * z
  term = z.copy()
  total = z.copy()
  for n in range(1, 40):
    term = term * -z2 / n
    total = total + term / (2 * n + 1)
  erfc_small = 1.0 - 2.0 * _INV_SQRT_PI * total
  z = np.where(small, 1.5, x)
  f = z.copy()
  # erfc(z) = e^{-z^2} / sqrt(pi) / (z + (1/2) / (z + 1 / (z + (3/2) / ...)))
  for k in range(80, 0, -1):
    f = z + (0.5 * k) / f
  erfc_large = _dexp(-z * z) * _INV_SQRT_PI / f
  return np.where(small, erfc_small, erfc_large)


def _normal_upper_tail(t) -> np.ndarray:
  """P(N(0, 1) > t) for t >= 0."""
  return 0.5 * _derfc(np.asarray(t, np.float64) * _SQRT_HALF)


# --------------------------------------------------------------------------
# Quantized parameters: (table level, integer centre) from (scale, mean).

_LOG_MIN = float(_dlog(SCALE_MIN))
_LOG_STEP = float((_dlog(SCALE_MAX) - _dlog(SCALE_MIN)) / (SCALE_LEVELS - 1))


def scale_table() -> np.ndarray:
  """The SCALE_LEVELS table scales, 0.11 ... 256, evenly spaced in log."""
  return _dexp(_LOG_MIN + _LOG_STEP * np.arange(SCALE_LEVELS))


def _scale_position(scale) -> np.ndarray:
  """Position in level units, shifted by 1/2: level k covers [k, k + 1).

  np.log is fine here (unlike in the tables): a last-bit difference between
  machines is a parameter deviation like any other, covered by the lists.
  """
  s = np.maximum(np.asarray(scale, np.float64), SCALE_MIN)
  return (np.log(s) - _LOG_MIN) / _LOG_STEP + 0.5


def scale_index(scale, listed=None) -> np.ndarray:
  """Table level of each scale: the nearest in log (q_scale).

  `listed` marks elements on the encoder's fix list: they take the level
  below their nearest level boundary.
  """
  pos = _scale_position(scale)
  idx = np.clip(np.floor(pos), 0, SCALE_LEVELS - 1)
  if listed is not None:
    below = np.clip(np.rint(pos), 1, SCALE_LEVELS - 1) - 1
    idx = np.where(listed, below, idx)
  return idx.astype(np.int64)


def centre(mean, listed=None) -> np.ndarray:
  """Integer centre (q_centre): floor(mean + 1/2) for |mean| < CENTRE_LIMIT,
  0 beyond (where a relative tolerance would cover several half-integers).

  Listed elements near +-CENTRE_LIMIT take floor(mean + 1/2); other listed
  elements the integer below their nearest half-integer boundary.
  """
  m = np.asarray(mean, np.float64)
  g = m + 0.5
  c = np.where(np.abs(m) < CENTRE_LIMIT, np.floor(g), 0.0)
  if listed is not None:
    near_limit = np.abs(np.abs(m) - CENTRE_LIMIT) < 0.25
    c = np.where(listed, np.where(near_limit, np.floor(g), np.rint(g) - 1.0), c)
  return c.astype(np.int64)


def scale_boundaries() -> np.ndarray:
  """Scales of the level boundaries: entry k (1..) separates levels k - 1, k."""
  return _dexp(_LOG_MIN + _LOG_STEP * (np.arange(SCALE_LEVELS) - 0.5))


_SCALE_BOUNDARIES = scale_boundaries()


def boundary_flags(scale, mean, tol: float) -> tuple[np.ndarray, np.ndarray]:
  """Elements whose parameters lie within 2 tol max(1, |p|) of a boundary.

  The deviation model: a parameter p computed on another backend deviates by
  less than tol max(1, |p|) (absolute below 1, relative above: the networks'
  float error is proportional to their activations, not to a small scale).
  Sound for tol <= MAX_TOL: then the listed elements' nearest boundary is
  unambiguous on both sides (3 tol max(1, |p|) < 1/4 of the spacing).
  """
  if not 0.0 <= tol <= MAX_TOL:
    raise ValueError(f"tol must lie in [0, {MAX_TOL}], got {tol}")
  s = np.maximum(np.asarray(scale, np.float64), SCALE_MIN)
  nearest = np.clip(np.rint(_scale_position(s)), 1, SCALE_LEVELS - 1)
  b = _SCALE_BOUNDARIES[nearest.astype(np.int64)]
  near_scale = np.abs(s - b) < 2.0 * tol * np.maximum(1.0, s)
  m = np.asarray(mean, np.float64)
  g = m + 0.5
  window = 2.0 * tol * np.maximum(1.0, np.abs(m))
  near_half = (np.abs(g - np.rint(g)) < window) & (np.abs(m) < CENTRE_LIMIT)
  near_limit = np.abs(np.abs(m) - CENTRE_LIMIT) < window
  return near_scale, near_half | near_limit


# --------------------------------------------------------------------------
# Gaussian tables.


def _coded_pmf(pmf: np.ndarray) -> np.ndarray:
  """Approximately the distribution constriction codes with: normalized,
  every symbol at least 2^-24 (its 24-bit precision). For ideal-bit counts."""
  q = np.maximum(pmf / pmf.sum(), 2.0 ** -24)
  return q / q.sum()


@dataclasses.dataclass(frozen=True)
class GaussianTables:
  """Per level: half-width K (symbols -K..K, escape 2K + 1), model, pmf."""
  scales: np.ndarray
  half_widths: np.ndarray
  models: tuple
  pmfs: tuple


@functools.lru_cache(maxsize=1)
def gaussian_tables() -> GaussianTables:
  scales = scale_table()
  tail_z = 6.11  # 2 P(N > 6.11) < 1e-9
  half_widths = np.maximum(1, np.ceil(tail_z * scales - 0.5)).astype(np.int64)
  models, pmfs = [], []
  for s, k in zip(scales, half_widths):
    v = np.abs(np.arange(-k, k + 1, dtype=np.float64))
    upper = _normal_upper_tail((v + 0.5) / s)
    lower = np.where(v == 0, 0.5, _normal_upper_tail(np.maximum(v - 0.5, 0) / s))
    pmf = np.where(v == 0, 1.0 - 2.0 * upper, lower - upper)
    escape = 2.0 * _normal_upper_tail((k + 0.5) / s)
    pmf = np.append(pmf, escape)
    models.append(_model.Categorical(pmf, perfect=False))
    pmfs.append(_coded_pmf(pmf))
  return GaussianTables(scales, half_widths, tuple(models), tuple(pmfs))


# --------------------------------------------------------------------------
# Factorized-prior tables for hyper-latents.


def _factorized_logits_np(x: np.ndarray, matrices, biases, gates) -> np.ndarray:
  """entropy.factorized_logits_cumulative in deterministic float64.

  x: (C, 1, N); `matrices` already softplus'ed and `gates` tanh'ed. Matrix
  products as explicit sums over the (tiny) inner dimension in fixed
  order, instead of BLAS.
  """
  for i, (m, bias) in enumerate(zip(matrices, biases)):
    acc = m[:, :, 0:1] * x[:, 0:1, :]
    for j in range(1, m.shape[2]):
      acc = acc + m[:, :, j:j + 1] * x[:, j:j + 1, :]
    x = acc + bias
    if i < len(gates):
      x = x + gates[i] * _dtanh(x)
  return x


@dataclasses.dataclass(frozen=True)
class FactorizedTables:
  """Per hyper-latent channel: support [lo, hi] (+ escape) and its model."""
  lo: np.ndarray
  hi: np.ndarray
  models: tuple
  pmfs: tuple


def factorized_tables(prior_params: Mapping[str, Any]) -> FactorizedTables:
  """Integer tables from a FactorizedPrior's parameters (host, float64).

  Cached on the parameters' bytes, so repeated calls with the same model are
  free.
  """
  names = sorted(prior_params)
  arrays = tuple(np.asarray(prior_params[n], np.float32) for n in names)
  key = (tuple(names), tuple(a.shape for a in arrays),
         b"".join(a.tobytes() for a in arrays))
  return _factorized_tables_cached(key)


@functools.lru_cache(maxsize=8)
def _factorized_tables_cached(key) -> FactorizedTables:
  names, shapes, raw = key
  params, offset = {}, 0
  for name, shape in zip(names, shapes):
    size = int(np.prod(shape)) * 4
    params[name] = np.frombuffer(raw[offset:offset + size], np.float32
                                 ).reshape(shape).astype(np.float64)
    offset += size
  n = sum(1 for name in names if name.startswith("matrix_"))
  matrices = [_dsoftplus(params[f"matrix_{i}"]) for i in range(n)]
  biases = [params[f"bias_{i}"] for i in range(n)]
  gates = [_dtanh(params[f"factor_{i}"]) for i in range(n - 1)]
  logits = lambda x: _factorized_logits_np(x, matrices, biases, gates)
  c = matrices[0].shape[0]
  # Bisection for the tail quantiles, where the cdf reaches tail / 2; 28
  # halvings of [-2^20, 2^20] leave an interval of 1/128.
  target = float(_dlog(TAIL_MASS / 2.0) - _dlog(1.0 - TAIL_MASS / 2.0))
  bounds = []
  for sign in (1.0, -1.0):
    a, b = np.full(c, -2.0 ** 20), np.full(c, 2.0 ** 20)
    for _ in range(28):
      mid = 0.5 * (a + b)
      below = sign * logits(mid[:, None, None])[:, 0, 0] < target
      if sign > 0:
        a, b = np.where(below, mid, a), np.where(below, b, mid)
      else:
        a, b = np.where(below, a, mid), np.where(below, mid, b)
    bounds.append(0.5 * (a + b))
  lo = np.floor(bounds[0] + 0.5).astype(np.int64)
  hi = np.maximum(np.ceil(bounds[1] - 0.5).astype(np.int64), lo)
  wide = hi - lo + 1 > MAX_HYPER_SUPPORT
  mid = (lo + hi) // 2
  lo = np.where(wide, mid - MAX_HYPER_SUPPORT // 2, lo)
  hi = np.where(wide, lo + MAX_HYPER_SUPPORT - 1, hi)
  models, pmfs = [], []
  for ch in range(c):
    v = np.arange(lo[ch], hi[ch] + 2, dtype=np.float64) - 0.5  # bin edges
    f = _factorized_logits_np(v[None, None, :], [m[ch:ch + 1] for m in matrices],
                              [b_[ch:ch + 1] for b_ in biases],
                              [g[ch:ch + 1] for g in gates])[0, 0]
    lower, upper = f[:-1], f[1:]
    flip = np.where(lower + upper > 0, -1.0, 1.0)  # difference in the tail
    pmf = np.abs(_dsigmoid(flip * upper) - _dsigmoid(flip * lower))
    escape = _dsigmoid(f[0]) + _dsigmoid(-f[-1])
    pmf = np.append(pmf, escape)
    models.append(_model.Categorical(pmf, perfect=False))
    pmfs.append(_coded_pmf(pmf))
  return FactorizedTables(lo, hi, tuple(models), tuple(pmfs))
