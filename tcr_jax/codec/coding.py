"""Entropy coding of latents with constriction: real bitstreams.

The entropy models (`entropy_models.py`) give every latent element a
discretized Gaussian; this module turns those into range-coded bytes and
back, exactly, so that every rate tcr_jax reports can be a file size.

What is coded
-------------
y (all Gaussian models). The model's rate is that of the integer residual
r = round(y_hat - mean) under a ZERO-MEAN discretized Gaussian of scale
s >= 0.11. We code r = y_hat - c, where c is an integer centre (c = mean
rounded, see below) and decode y_hat = r + c. Away from mean = k + 1/2 this r
equals the model's; at those ties the model's round-half-toward-zero maps two
y_hat to one r, so an integer centre is what makes decoding exact.

Zero-mean tables indexed by scale alone: SCALE_LEVELS scales spaced evenly in
log from 0.11 to 256 (step 0.123 in log, 13% per level); an element uses the
nearest level in log (so the table scale is within 6.3% of the predicted
one; the mismatch costs about step^2 / 12 nats, ~0.002 bits per element).
Each level has one fixed constriction Categorical over r in [-K, K] plus an
escape symbol (K covers all but 1e-9 of the mass), built once per process.
Escaped residuals follow as sign and an Elias-gamma-like magnitude in
uniform (bypass) symbols, so any residual up to 2^31 decodes exactly. Within
a decoding pass the symbols are grouped by table level, so one constriction
call decodes a whole group (constriction: ~30 M symbols/s with a fixed model
against ~5 M/s with per-symbol quantized Gaussians; with the parameter
quantization, grouping and escapes the host decodes 11-14 M symbols/s on
two CPU cores).

z (hyperprior models). Under the FactorizedPrior: per channel, an integer
support [lo, hi] outside of which the prior has less than 1e-9 of its mass,
one Categorical over it plus an escape, built from the prior's parameters.

Tables identical on every machine
---------------------------------
Tables are computed on the host in numpy float64, never on the accelerator,
and only with IEEE basic operations (+ - * /, floor, ldexp), which are
correctly rounded everywhere: exp, log, tanh, erfc are evaluated by the
small series in this module (`_dexp`, `_dlog`, ...) instead of libm/SIMD
routines that may differ in the last bit between machines, and the
factorized prior's tiny matrix products are explicit loops (no BLAS, whose
summation order varies). So encoder and decoder build bit-identical tables.

Robust to the decoder's own float noise (GPU encode, CPU decode)
------------------------------------------------------------------
The decoder recomputes (scale, mean) with the parameter networks, possibly
on another backend, from the same integers y_hat / z_hat; the results differ
from the encoder's by float noise. Deviation model: a parameter p deviates
by less than tol max(1, |p|) (absolute below 1, relative above: the error of
a network output follows the size of its activations, so a small scale gets
an absolute, not a relative, error). Both sides quantize the parameters with
the same maps

  q_scale(s)  = nearest table level of max(s, 0.11) in log,
  q_centre(m) = floor(m + 1/2) for |m| < CENTRE_LIMIT = 512, else 0,

whose boundaries are the scales b_k between levels, the half-integers below
512 in magnitude, and +-512 (beyond it a relative tolerance would span
several half-integers, so the centre is 0 there; such means do not occur in
trained models). The encoder lists every element whose own parameter p lies
within 2 tol max(1, |p|) of a boundary b, transmitting their positions (two
sorted lists, gap-coded), and for a listed element both sides use a
canonical choice that each can compute from its own value: the level below
the nearest scale boundary; the integer below the nearest half-integer, or
floor(m + 1/2) next to +-512. Each side finds the same nearest boundary
because 3 tol max(1, |p|) is below a quarter of the boundary spacing
whenever tol <= MAX_TOL = 1e-4. Every element not listed has
|p - b| >= 2 tol max(1, |p|) for every b, while the decoder's p' has
|p' - p| < tol max(1, |p|), so |p' - b| > 0 on the same side: q(p') = q(p).
Hence the decoder derives exactly the encoder's (level, centre) for every
element, and decodes exactly, whenever the cross-backend deviation is below
tol. The decoder never uses tol (it is an encoder option, not part of the
format). A CRC-32 of the latent, checked after decoding, turns a deviation
beyond tol into a BitstreamError instead of a wrong image.

DEFAULT_TOL = 2e-5. Measured: float32 against float64 evaluation of the
parameter networks of trained models (hyperprior, context, checkerboard,
32 channels) deviates by at most 2.7e-6 max(1, |p|), so two float32 backends
by at most ~5e-6, a quarter of tol and an eighth of the listing window
(untrained networks fed 20x latents reach 2.3e-5). The cost: a fraction
4 tol max(1, s) / (0.123 s) of the elements of scale s, and 4 tol max(1, |m|)
of the means, are listed, at ~log2(1 / density) + 1.5 bits each: 0.4-0.7% of the
rate at tol = 2e-5 and 1.6-2.7% at 1e-4 on those models
(`info["side_bits"]`). The parameter networks run with "highest" matmul
precision so that a GPU does not use TF32 (1e-3 noise).

Order of symbols
----------------
constriction's RangeEncoder/RangeDecoder form a queue: symbols decode in the
order they were encoded, so the encoder, which knows y_hat and computes all
parameters in one pass, writes symbols in the order the decoder can produce
their parameters:

  hyperprior / "none"   one pass over all elements
  checkerboard          anchors ((i + j) even), then the rest: two passes
  serial context        wavefronts t = 3 i + j: with the 5x5 type-A mask,
                        (i, j) reads (i-2..i-1, j-2..j+2) and (i, j-2..j-1),
                        all with 3 i' + j' < t, so the ~3H + W wavefronts
                        decode one after another, each in one batch

Within a pass: raster order, stably grouped by table level. The serial
decoder is one compiled lax.fori_loop over wavefronts: each step gathers the
5x5 neighbourhoods of its positions, computes their parameters, and decodes
their symbols on the host through an ordered io_callback (a Python loop over
wavefronts calling jitted steps is kept as `schedule="python"` to compare).

Stream layout
-------------
"hyper": constriction words (little-endian uint32) of z, channel by channel.
"y": CRC-32 of the integer latent (4 bytes), then constriction words: the
two fix lists (counts in Elias gamma, gaps in a Rice code) and the residual
symbols pass by pass. Shapes are not stored: the container
(`bitstream.py`) stores the image size, from which the caller derives them.

API
---
  encode_latent(em, variables, y, side)           -> (streams, info)
  decode_latent(em, variables, streams, shape, side) -> y_hat
  latent_parameters(em, variables, y, side)       -> (scale, mean)
  encode_scalable / decode_scalable                "base" and "enhancement"
                                                  layers; base decodes alone
  compress(model, variables, image)               -> bytes (ImageCodec)
  decompress(model, variables, data)              -> (x_hat, info)
  encode_image(model, variables, image)           -> (bytes, info)
  compress_layers(base, vars, image, enh, vars)   -> bytes (DepthBase +
  decompress_layers(base, vars, data, enh, vars)  -> dict   Enhancement)

Malformed streams raise bitstream.BitstreamError (never anything else, never
a hang: every loop is bounded by the latent size).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
from typing import Any, Callable, Mapping

import constriction
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from tcr_jax.codec import bitstream, entropy, entropy_models, layers, ops
from tcr_jax.codec.bitstream import BitstreamError

SCALE_MIN = entropy.SCALE_LOWER_BOUND
SCALE_MAX = 256.0
SCALE_LEVELS = 64
TAIL_MASS = 1e-9
DEFAULT_TOL = 2e-5
MAX_TOL = 1e-4
CENTRE_LIMIT = 512  # means beyond +-512 use centre 0
MAX_ABS_VALUE = 1 << 31  # largest coded |latent|
MAX_HYPER_SUPPORT = 1 << 13  # symbols per hyper-latent channel table
SCHEDULES = ("fori", "python")

ParamTransform = Callable[[np.ndarray, np.ndarray, np.ndarray],
                          tuple[np.ndarray, np.ndarray]]

_queue = constriction.stream.queue
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
# Integers in bypass symbols, used for escapes and counts.

_UNIFORM = _model.Uniform()  # family: per-symbol sizes
_BIT = _model.Uniform(2)
_LENGTH_PMF = 0.5 ** np.arange(1, 65)  # bit length n costs n + 1 bits
_LENGTH = _model.Categorical(_LENGTH_PMF, perfect=False)
_MAX_UINT_BITS = 40


def _decode(dec, *args) -> np.ndarray:
  """dec.decode(*args); constriction's errors on invalid data (it asserts)
  become BitstreamError."""
  try:
    return np.asarray(dec.decode(*args))
  except Exception as e:  # AssertionError, ValueError, ... from the binding
    raise BitstreamError(f"corrupt stream (range decoder: {e})") from None


def _bit_length(v: np.ndarray) -> np.ndarray:
  """Exact bit lengths of non-negative int64 values."""
  v = np.asarray(v, np.int64)
  n = np.zeros(v.shape, np.int64)
  for shift in (32, 16, 8, 4, 2, 1):
    big = (v >> (n + shift)) > 0
    n = np.where(big, n + shift, n)
  return n + (v > 0)


def _encode_uints(enc, values) -> None:
  """Values >= 0 in Elias-gamma codes: the bit length n of v + 1 (n + 1
  bits, P(n) = 2^-(n+1)), then its n low bits in 16-bit uniform chunks."""
  w = np.asarray(values, np.int64) + 1
  if w.size == 0:
    return
  nbits = _bit_length(w) - 1
  enc.encode(nbits.astype(np.int32), _LENGTH)
  low = w - (np.int64(1) << nbits)
  for start in range(0, int(nbits.max()), 16):
    sel = nbits > start
    width = np.minimum(nbits[sel] - start, 16)
    chunk = (low[sel] >> start) & ((np.int64(1) << width) - 1)
    sizes = (np.int64(1) << width).astype(np.int32)
    enc.encode(chunk.astype(np.int32), _UNIFORM, sizes)


def _decode_uints(dec, count: int) -> np.ndarray:
  if count == 0:
    return np.zeros(0, np.int64)
  nbits = _decode(dec, _LENGTH, count).astype(np.int64)
  if nbits.max() > _MAX_UINT_BITS:
    raise BitstreamError("corrupt stream (integer too long)")
  low = np.zeros(count, np.int64)
  for start in range(0, int(nbits.max()), 16):
    sel = nbits > start
    width = np.minimum(nbits[sel] - start, 16)
    chunk = _decode(dec, _UNIFORM, (np.int64(1) << width).astype(np.int32))
    low[sel] |= chunk.astype(np.int64) << start
  return (np.int64(1) << nbits) + low - 1


def _uint_bits(values) -> float:
  """Ideal cost of _encode_uints(values) in bits."""
  w = np.asarray(values, np.int64) + 1
  return float(np.sum(2 * _bit_length(w) - 1))


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


def _encode_group(enc, values: np.ndarray, model, lo: int, hi: int) -> int:
  """Symbols value - lo for lo <= value <= hi, escape (hi - lo + 1) outside,
  then the escapes' side and overflow. Returns the number of escapes."""
  escape = hi - lo + 1
  out = (values < lo) | (values > hi)
  symbols = np.where(out, escape, values - lo).astype(np.int32)
  enc.encode(symbols, model)
  if out.any():
    v = values[out]
    below = v < lo
    enc.encode(below.astype(np.int32), _BIT)
    _encode_uints(enc, np.where(below, lo - 1 - v, v - hi - 1))
  return int(out.sum())


def _decode_group(dec, count: int, model, lo: int, hi: int) -> np.ndarray:
  symbols = _decode(dec, model, count).astype(np.int64)
  values = symbols + lo
  out = symbols == hi - lo + 1
  n_out = int(out.sum())
  if n_out:
    below = _decode(dec, _BIT, n_out).astype(bool)
    overflow = _decode_uints(dec, n_out)
    values[out] = np.where(below, lo - 1 - overflow, hi + 1 + overflow)
    if np.abs(values[out]).max() > MAX_ABS_VALUE:
      raise BitstreamError("corrupt stream (value out of range)")
  return values


def _groups(idx: np.ndarray):
  """(level, positions in `idx`) for each level present, levels ascending,
  positions ascending (a stable grouping of a raster-ordered pass)."""
  order = np.argsort(idx, kind="stable")
  sorted_idx = idx[order]
  starts = np.flatnonzero(np.diff(sorted_idx, prepend=-1))
  ends = np.append(starts[1:], len(order))
  for a, b in zip(starts, ends):
    yield int(sorted_idx[a]), order[a:b]


def _encode_residuals(enc, residuals: np.ndarray, idx: np.ndarray) -> int:
  tables = gaussian_tables()
  escapes = 0
  for level, where in _groups(idx):
    k = int(tables.half_widths[level])
    escapes += _encode_group(enc, residuals[where], tables.models[level], -k, k)
  return escapes


def _decode_residuals(dec, idx: np.ndarray) -> np.ndarray:
  tables = gaussian_tables()
  out = np.zeros(idx.shape, np.int64)
  for level, where in _groups(idx):
    k = int(tables.half_widths[level])
    out[where] = _decode_group(dec, len(where), tables.models[level], -k, k)
  return out


def table_bits(residuals: np.ndarray, idx: np.ndarray) -> float:
  """Ideal bits of residuals under the tables (escapes included)."""
  tables = gaussian_tables()
  total = 0.0
  for level, where in _groups(idx):
    k = int(tables.half_widths[level])
    r = residuals[where]
    out = np.abs(r) > k
    sym = np.where(out, 2 * k + 1, r + k)
    total -= float(np.sum(np.log2(tables.pmfs[level][sym])))
    total += out.sum() + _uint_bits(np.abs(r[out]) - k - 1)
  return total


# --------------------------------------------------------------------------
# Fix lists: sorted element positions, gap-coded (Rice code with the
# quotient under a geometric categorical), parameters derived from the count.


def _rice_model(count: int, total: int):
  """(k, quotient model) for `count` positions among `total`; integer and
  IEEE-basic arithmetic only, so both sides derive the same model."""
  mean_gap = max(1, (total - count) // max(count, 1))
  k = min(20, max(0, _bit_length(np.int64(mean_gap * 45426 >> 16)).item() - 1))
  survive = 1.0 - count / (total + 1.0)  # P(gap > g) ~ survive^g
  theta = survive
  for _ in range(k):
    theta = theta * theta  # survive ** (2 ** k)
  probs = np.empty(64)
  p = 1.0 - theta
  for q in range(63):
    probs[q] = max(p, 1e-12)
    p = p * theta
  probs[63] = max(p / (1.0 - theta) if theta < 1.0 else 1.0, 1e-12)  # escape
  return k, _model.Categorical(probs, perfect=False), _coded_pmf(probs)


def _encode_positions(enc, positions: np.ndarray, total: int) -> float:
  """Codes sorted unique positions in [0, total); returns their ideal bits."""
  count = len(positions)
  _encode_uints(enc, [count])
  bits = _uint_bits([count])
  if count == 0:
    return bits
  gaps = np.diff(positions, prepend=-1) - 1
  k, model, probs = _rice_model(count, total)
  quotients = gaps >> k
  bits -= float(np.sum(np.log2(probs[np.minimum(quotients, 63)])))
  _encode_group(enc, quotients, model, 0, 62)
  big = quotients > 62
  bits += big.sum() + _uint_bits(quotients[big] - 63) + k * count
  if k:
    rem = (gaps & ((1 << k) - 1)).astype(np.int32)
    enc.encode(rem, _UNIFORM, np.full(count, 1 << k, np.int32))
  return bits


def _decode_positions(dec, total: int) -> np.ndarray:
  (count,) = _decode_uints(dec, 1)
  if count > total:
    raise BitstreamError("corrupt stream (fix-list count)")
  count = int(count)
  if count == 0:
    return np.zeros(0, np.int64)
  k, model, _ = _rice_model(count, total)
  quotients = _decode_group(dec, count, model, 0, 62)
  if quotients.min() < 0 or quotients.max() > total:
    raise BitstreamError("corrupt stream (fix-list gap)")
  gaps = quotients << k
  if k:
    gaps = gaps + _decode(dec, _UNIFORM, np.full(count, 1 << k, np.int32))
  positions = np.cumsum(gaps + 1) - 1
  if positions[-1] >= total:
    raise BitstreamError("corrupt stream (fix-list position)")
  return positions


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


def _encode_hyper(z: np.ndarray, tables: FactorizedTables) -> tuple[bytes, float]:
  """z (B, h, w, C) integers, channel by channel; (bytes, ideal bits)."""
  enc = _queue.RangeEncoder()
  bits = 0.0
  for ch in range(z.shape[-1]):
    values = z[..., ch].reshape(-1)
    lo, hi = int(tables.lo[ch]), int(tables.hi[ch])
    _encode_group(enc, values, tables.models[ch], lo, hi)
    out = (values < lo) | (values > hi)
    sym = np.where(out, hi - lo + 1, values - lo)
    bits -= float(np.sum(np.log2(tables.pmfs[ch][sym])))
    over = np.where(values[out] < lo, lo - 1 - values[out], values[out] - hi - 1)
    bits += out.sum() + _uint_bits(over)
  return _to_bytes(enc), bits


def _decode_hyper(data: bytes, shape: tuple[int, ...],
                  tables: FactorizedTables) -> np.ndarray:
  dec = _queue.RangeDecoder(_to_words(data))
  count = int(np.prod(shape[:-1]))
  z = np.zeros(shape, np.int64)
  for ch in range(shape[-1]):
    z[..., ch] = _decode_group(dec, count, tables.models[ch], int(tables.lo[ch]),
                               int(tables.hi[ch])).reshape(shape[:-1])
  return z


def _latent_checksum(values: np.ndarray) -> int:
  return bitstream.crc32(np.asarray(values, "<i8").tobytes())


def _to_bytes(enc) -> bytes:
  return np.asarray(enc.get_compressed(), "<u4").tobytes()


def _to_words(data: bytes) -> np.ndarray:
  if len(data) % 4:
    raise BitstreamError("corrupt stream (length not a multiple of 4 bytes)")
  return np.frombuffer(data, "<u4").astype(np.uint32)


# --------------------------------------------------------------------------
# Parameter networks (jax), compiled once per entropy model.


def _m_h_a(m, y):
  return m.h_a(y)


def _m_static_features(m, z_hat, side, shape):
  """The features of em.parameters that do not depend on y_hat, in order."""
  return m.static_features(z_hat, side, shape)


def _m_entropy_parameters(m, x):
  return m.entropy_parameters(x)


class _Programs:
  """Jitted pieces of one entropy model (hashable flax module as the key)."""

  def __init__(self, em: entropy_models.GaussianEntropyModel):
    self.em = em
    self.hyper = jax.jit(self._hyper)
    self.params = jax.jit(self._params)
    self.features = jax.jit(self._features, static_argnums=3)
    self.serial = jax.jit(self._serial_fori, static_argnums=3)
    self.wavefront_params = jax.jit(self._wavefront_params, static_argnums=4)
    self.wavefront_scatter = jax.jit(self._wavefront_scatter, static_argnums=3)

  def _hyper(self, v, y):
    with jax.default_matmul_precision("highest"):
      return ops.round_toward_zero_ties(self.em.apply(v, y, method=_m_h_a))

  def _params(self, v, y_hat, z_hat, side):
    with jax.default_matmul_precision("highest"):
      return self.em.apply(v, y_hat, z_hat, side, method="parameters")

  def _features(self, v, z_hat, side, shape):
    with jax.default_matmul_precision("highest"):
      features = self.em.apply(v, z_hat, side, shape, method=_m_static_features)
    if not features:
      return None
    return jnp.concatenate(features, axis=-1)

  def _wavefront_params(self, v, features, y_pad, t, shape):
    """(scale, mean) (B, M, C) of wavefront t's slots, read from y_pad."""
    rows_t, cols_t, _, _ = _wavefront_arrays(shape[1], shape[2])
    rows, cols = jnp.asarray(rows_t)[t], jnp.asarray(cols_t)[t]
    p = v["params"]["context_conv"]
    mask = jnp.asarray(layers.causal_mask(5))[:, :, None, None]
    d = jnp.arange(5)
    with jax.default_matmul_precision("highest"):
      patch = y_pad[:, rows[:, None, None] + d[None, :, None],
                    cols[:, None, None] + d[None, None, :], :]  # (B, M, 5, 5, C)
      context = jnp.einsum("bmuvc,uvco->bmo", patch, p["kernel"] * mask,
                           precision=jax.lax.Precision.HIGHEST) + p["bias"]
      parts = [] if features is None else [features[:, rows, cols, :]]
      x = jnp.concatenate(parts + [context], axis=-1)[:, :, None, :]
      scale, mean = self.em.apply(v, x, method=_m_entropy_parameters)
    return scale[:, :, 0, :], mean[:, :, 0, :]

  def _wavefront_scatter(self, y_pad, t, values, shape):
    _, _, rows_t, cols_t = _wavefront_arrays(shape[1], shape[2])
    rows, cols = jnp.asarray(rows_t)[t], jnp.asarray(cols_t)[t]
    return y_pad.at[:, rows, cols, :].set(values)

  def _serial_fori(self, v, features, token, shape):
    b, h, w, c = shape
    steps, slots = _wavefront_arrays(h, w)[0].shape

    def body(t, y_pad):
      scale, mean = self._wavefront_params(v, features, y_pad, t, shape)
      values = io_callback(_host_wavefront, jax.ShapeDtypeStruct((b, slots, c),
                                                                  jnp.float32),
                           token, t, scale, mean, ordered=True)
      return self._wavefront_scatter(y_pad, t, values, shape)

    y_pad = jnp.zeros((b, h + 4, w + 4, c), jnp.float32)
    y_pad = jax.lax.fori_loop(0, steps, body, y_pad)
    return y_pad[:, 2:h + 2, 2:w + 2, :]


@functools.lru_cache(maxsize=16)
def _programs(em) -> _Programs:
  return _Programs(em)


@functools.lru_cache(maxsize=16)
def _wavefront_arrays(h: int, w: int):
  """Slots of the wavefronts t = 3 i + j, ordered by i within a wavefront.

  Returns (rows, cols) to gather from the 2-padded latent (i, j of the slot;
  0, 0 for empty slots) and (rows, cols) to scatter into it (i + 2, j + 2;
  the padding corner 0, 0 for empty slots, which receive zeros).
  """
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  t = (3 * i + j).reshape(-1)
  steps = 3 * (h - 1) + w
  order = np.lexsort((i.reshape(-1), t))
  counts = np.bincount(t, minlength=steps)
  slots = int(counts.max())
  slot = np.arange(h * w) - np.repeat(np.cumsum(counts) - counts, counts)
  rows = np.zeros((steps, slots), np.int32)
  cols = np.zeros((steps, slots), np.int32)
  valid = np.zeros((steps, slots), bool)
  rows[t[order], slot] = i.reshape(-1)[order]
  cols[t[order], slot] = j.reshape(-1)[order]
  valid[t[order], slot] = True
  return rows, cols, np.where(valid, rows + 2, 0), np.where(valid, cols + 2, 0)


def _wavefront_valid(h: int, w: int) -> np.ndarray:
  _, _, rows, _ = _wavefront_arrays(h, w)
  return rows > 0


# --------------------------------------------------------------------------
# Host-side decoder of a "y" stream.

_SESSIONS: dict[int, "_YDecoder"] = {}
_SESSION_IDS = itertools.count(1)
_SESSION_LOCK = threading.Lock()


def _host_wavefront(token, t, scale, mean):
  return _SESSIONS[int(token)].wavefront(int(t), np.asarray(scale),
                                         np.asarray(mean))


class _YDecoder:
  """Decodes residuals pass by pass from a "y" stream, given parameters."""

  def __init__(self, data: bytes, shape: tuple[int, ...],
               param_transform: ParamTransform | None):
    self.shape = shape
    self.total = int(np.prod(shape))
    if len(data) < 4:
      raise BitstreamError("truncated stream y")
    self.checksum = int.from_bytes(data[:4], "little")
    self.dec = _queue.RangeDecoder(_to_words(data[4:]))
    self.listed_scale = np.zeros(self.total, bool)
    self.listed_centre = np.zeros(self.total, bool)
    self.listed_scale[_decode_positions(self.dec, self.total)] = True
    self.listed_centre[_decode_positions(self.dec, self.total)] = True
    self.param_transform = param_transform
    self.error: BaseException | None = None

  def verify(self, y_hat) -> jax.Array:
    """Checks the decoded latent against the encoder's checksum."""
    if _latent_checksum(np.asarray(y_hat).astype(np.int64)) != self.checksum:
      raise BitstreamError(
          "decoded latent fails its checksum: the stream is corrupt, or this "
          "backend computed entropy parameters farther from the encoder's than "
          "its tolerance allows (re-encode with a larger tol)")
    return jnp.asarray(y_hat)

  def decode(self, flat: np.ndarray, scale: np.ndarray,
             mean: np.ndarray) -> np.ndarray:
    """Values of elements `flat` (raster indices, ascending) of one pass."""
    scale = scale.reshape(-1)
    mean = mean.reshape(-1)
    if self.param_transform is not None:
      scale, mean = self.param_transform(scale, mean, flat)
    if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(mean))):
      raise BitstreamError("corrupt stream (non-finite entropy parameters)")
    idx = scale_index(scale, self.listed_scale[flat])
    c = centre(mean, self.listed_centre[flat])
    values = _decode_residuals(self.dec, idx) + c
    if np.abs(values).max(initial=0) > MAX_ABS_VALUE:
      raise BitstreamError("corrupt stream (value out of range)")
    return values

  def wavefront(self, t: int, scale: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Serial-context step: values (B, M, C) of wavefront t's slots."""
    b, h, w, c = self.shape
    out = np.zeros(scale.shape, np.float32)
    if self.error is not None:
      return out
    try:
      rows, cols, _, _ = _wavefront_arrays(h, w)
      valid = _wavefront_valid(h, w)[t]
      pos = rows[t][valid].astype(np.int64) * w + cols[t][valid]
      flat = ((np.arange(b)[:, None, None] * (h * w) + pos[None, :, None]) * c
              + np.arange(c)[None, None, :]).reshape(-1)
      values = self.decode(flat, scale[:, valid], mean[:, valid])
      out[:, valid] = values.reshape(b, -1, c).astype(np.float32)
    except BaseException as e:  # re-raised after the loop
      self.error = e
    return out


# --------------------------------------------------------------------------
# Latent level.


def _to_int(x) -> np.ndarray:
  """Integer-valued floats (a rounded latent) to int64, range-checked."""
  x = np.asarray(x, np.float64)
  if not np.all(np.isfinite(x)):
    raise ValueError("cannot code a latent with non-finite values")
  if np.abs(x).max(initial=0) > MAX_ABS_VALUE:
    raise ValueError("latent values beyond +-2^31 cannot be coded")
  return x.astype(np.int64)


_HYPER_SHAPES: dict = {}  # (em, latent shape) -> z shape


def hyper_shape(em, em_variables, latent_shape) -> tuple[int, ...]:
  """Shape of z for a latent of `latent_shape` (hyperprior models)."""
  key = (em, tuple(int(s) for s in latent_shape))
  if key not in _HYPER_SHAPES:
    if len(_HYPER_SHAPES) > 256:
      _HYPER_SHAPES.clear()
    spec = jax.ShapeDtypeStruct(key[1], jnp.float32)
    _HYPER_SHAPES[key] = tuple(jax.eval_shape(
        lambda y: em.apply(em_variables, y, method=_m_h_a), spec).shape)
  return _HYPER_SHAPES[key]


def pass_ids(em, shape: tuple[int, ...]) -> np.ndarray:
  """Decoding pass of every element (raster order), as the decoder runs them."""
  b, h, w, c = shape
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  if em.context == "serial":
    per_position = 3 * i + j
  elif em.context == "checkerboard":
    per_position = (i + j) % 2
  else:
    per_position = np.zeros_like(i)
  return np.broadcast_to(per_position[None, :, :, None], shape).reshape(-1)


def latent_parameters(em, em_variables, y, side=None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(scale, mean) of every element of y as the encoder computes them
  (rounding y and, for hyperprior models, z first); host float32 arrays."""
  progs = _programs(em)
  y = jnp.asarray(y, jnp.float32)
  z_hat = None
  if em.hyperprior:
    z_hat = progs.hyper(em_variables, y)
  scale, mean = progs.params(em_variables, ops.round_toward_zero_ties(y),
                             z_hat, side)
  return np.asarray(scale, np.float32), np.asarray(mean, np.float32)


def encode_latent(em, em_variables, y, side=None, *, tol: float = DEFAULT_TOL,
                  param_transform: ParamTransform | None = None
                  ) -> tuple[dict[str, bytes], dict[str, Any]]:
  """Entropy-codes a latent y (B, H, W, C) under a GaussianEntropyModel.

  Args:
    em: the (unbound) GaussianEntropyModel.
    em_variables: its variables ({"params": ...}).
    y: the unquantized latent; it is rounded as the model rounds it.
    side: side information for conditional models (None = zeros).
    tol: bound on the decoder's parameter deviation, in units of
      max(1, |p|), that the fix lists cover (0..MAX_TOL); encoder-only.
    param_transform: testing hook applied to the host copies of (scale, mean)
      with their raster indices, as if another backend had computed them.

  Returns:
    streams {"hyper" (hyperprior models), "y"} and info: bits per stream,
    ideal bits ("ideal_bits"), side-information bits, list sizes, escapes,
    y_hat (the quantized latent the decoder will return).
  """
  progs = _programs(em)
  y = jnp.asarray(y, jnp.float32)
  shape = tuple(y.shape)
  y_hat = ops.round_toward_zero_ties(y)
  y_int = _to_int(y_hat).reshape(-1)
  streams, info = {}, {"ideal_bits": {}}
  z_hat = None
  if em.hyperprior:
    z_int = _to_int(progs.hyper(em_variables, y))
    tables = factorized_tables(em_variables["params"]["z_prior"])
    streams["hyper"], info["ideal_bits"]["hyper"] = _encode_hyper(z_int, tables)
    z_hat = jnp.asarray(z_int, jnp.float32)
  scale, mean = progs.params(em_variables, y_hat, z_hat, side)
  scale = np.asarray(scale, np.float32).reshape(-1)
  mean = np.asarray(mean, np.float32).reshape(-1)
  flat = np.arange(y_int.size)
  if param_transform is not None:
    scale, mean = param_transform(scale, mean, flat)
  if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(mean))):
    raise ValueError("the entropy model predicts non-finite parameters")
  listed_scale, listed_centre = boundary_flags(scale, mean, tol)
  idx = scale_index(scale, listed_scale)
  residuals = y_int - centre(mean, listed_centre)
  enc = _queue.RangeEncoder()
  side_bits = _encode_positions(enc, np.flatnonzero(listed_scale), y_int.size)
  side_bits += _encode_positions(enc, np.flatnonzero(listed_centre), y_int.size)
  passes = pass_ids(em, shape)
  order = np.argsort(passes, kind="stable")
  bounds = np.flatnonzero(np.diff(passes[order], prepend=-1, append=-2))
  escapes = 0
  for a, b in zip(bounds[:-1], bounds[1:]):
    sel = order[a:b]
    escapes += _encode_residuals(enc, residuals[sel], idx[sel])
  streams["y"] = _latent_checksum(y_int).to_bytes(4, "little") + _to_bytes(enc)
  info["ideal_bits"]["y"] = side_bits + table_bits(residuals, idx)
  info.update(
      bits={k: 8 * len(v) for k, v in streams.items()},
      side_bits=side_bits,
      listed={"scale": int(listed_scale.sum()), "centre": int(listed_centre.sum())},
      escapes=escapes, symbols=int(y_int.size), y_hat=y_hat, z_hat=z_hat)
  return streams, info


def decode_latent(em, em_variables, streams: Mapping[str, bytes],
                  latent_shape, side=None, *,
                  param_transform: ParamTransform | None = None,
                  schedule: str = "fori") -> jax.Array:
  """Decodes the latent y_hat (float32, integer-valued) of `latent_shape`.

  Args mirror encode_latent; `schedule` picks the serial-context loop:
  "fori" (one compiled lax.fori_loop with an io_callback per wavefront) or
  "python" (a Python loop over wavefronts calling jitted steps).

  Raises:
    BitstreamError: missing or malformed streams.
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
  shape = tuple(int(s) for s in latent_shape)
  if len(shape) != 4 or shape[-1] != em.channels or min(shape) < 1:
    raise ValueError(f"latent shape {shape} does not fit a model of "
                     f"{em.channels} channels")
  progs = _programs(em)
  needed = ("hyper", "y") if em.hyperprior else ("y",)
  missing = [n for n in needed if n not in streams]
  if missing:
    raise BitstreamError(f"missing stream(s) {', '.join(missing)}")
  z_hat = None
  if em.hyperprior:
    tables = factorized_tables(em_variables["params"]["z_prior"])
    z_shape = hyper_shape(em, em_variables, shape)
    z_hat = jnp.asarray(_decode_hyper(streams["hyper"], z_shape, tables),
                        jnp.float32)
  host = _YDecoder(streams["y"], shape, param_transform)
  if em.context == "serial":
    return host.verify(_decode_serial(progs, em_variables, host, z_hat, side,
                                      shape, schedule))
  y_hat = np.zeros(shape, np.float32)
  passes = pass_ids(em, shape)
  for p in range(int(passes.max()) + 1):
    scale, mean = progs.params(em_variables, jnp.asarray(y_hat), z_hat, side)
    flat = np.flatnonzero(passes == p)
    values = host.decode(flat, np.asarray(scale).reshape(-1)[flat],
                         np.asarray(mean).reshape(-1)[flat])
    y_hat.reshape(-1)[flat] = values
  return host.verify(y_hat)


def _decode_serial(progs: _Programs, v, host: _YDecoder, z_hat, side, shape,
                   schedule: str) -> jax.Array:
  features = progs.features(v, z_hat, side, shape)
  if schedule == "python":
    y_pad = jnp.zeros((shape[0], shape[1] + 4, shape[2] + 4, shape[3]))
    for t in range(3 * (shape[1] - 1) + shape[2]):
      scale, mean = progs.wavefront_params(v, features, y_pad, t, shape)
      values = host.wavefront(t, np.asarray(scale), np.asarray(mean))
      if host.error is not None:
        raise host.error
      y_pad = progs.wavefront_scatter(y_pad, t, values, shape)
    return y_pad[:, 2:shape[1] + 2, 2:shape[2] + 2, :]
  with _SESSION_LOCK:
    token = next(_SESSION_IDS)
    _SESSIONS[token] = host
  try:
    y_hat = progs.serial(v, features, jnp.int32(token), shape)
    y_hat.block_until_ready()
  finally:
    with _SESSION_LOCK:
      del _SESSIONS[token]
  if host.error is not None:
    raise host.error
  return y_hat


# --------------------------------------------------------------------------
# Scalable (layered) coding: "base" decodes alone, "enhancement" adds to it.


def encode_scalable(base_em, base_variables, y_base, enhancement_em=None,
                    enhancement_variables=None, y_enhancement=None, *,
                    tol: float = DEFAULT_TOL
                    ) -> tuple[dict[str, bytes], dict[str, Any]]:
  """Streams {"base", "enhancement"}: each the joined streams of one layer.

  The enhancement model is conditioned on the decoded base latent (its side
  information), so it needs the base to decode; the base needs nothing.
  """
  base, base_info = encode_latent(base_em, base_variables, y_base, tol=tol)
  streams = {"base": bitstream.join_streams(base)}
  info = {"base": base_info}
  if enhancement_em is not None:
    enh, enh_info = encode_latent(enhancement_em, enhancement_variables,
                                  y_enhancement, side=base_info["y_hat"],
                                  tol=tol)
    streams["enhancement"] = bitstream.join_streams(enh)
    info["enhancement"] = enh_info
  return streams, info


def decode_scalable(base_em, base_variables, streams: Mapping[str, bytes],
                    base_shape, enhancement_em=None, enhancement_variables=None,
                    enhancement_shape=None) -> tuple[jax.Array, jax.Array | None]:
  """(base y_hat, enhancement y_hat or None when absent or not asked for)."""
  if "base" not in streams:
    raise BitstreamError("missing stream base")
  y_base = decode_latent(base_em, base_variables,
                         bitstream.split_streams(streams["base"]), base_shape)
  if enhancement_em is None or "enhancement" not in streams:
    return y_base, None
  y_enh = decode_latent(enhancement_em, enhancement_variables,
                        bitstream.split_streams(streams["enhancement"]),
                        enhancement_shape, side=y_base)
  return y_base, y_enh


# --------------------------------------------------------------------------
# Image level: ImageCodec files.


def image_entropy_model(model
                        ) -> tuple[entropy_models.GaussianEntropyModel, Callable]:
  """ImageCodec's entropy model as a standalone module, and a function
  mapping the codec's variables to the entropy model's."""
  em = entropy_models.make_entropy_model(model.entropy_model,
                                         model.latent_channels, model.quantizer,
                                         model.hyper_channels)
  return em, lambda variables: {"params": variables["params"]["em"]}


def config_string(model) -> str:
  """The module's dataclass fields, for the fingerprint."""
  fields = [f"{f.name}={getattr(model, f.name)!r}"
            for f in dataclasses.fields(model) if f.name not in ("parent", "name")]
  return f"{type(model).__name__}({', '.join(fields)})"


def model_fingerprint(model, variables) -> bytes:
  return bitstream.fingerprint(variables, config_string(model))


def _m_g_a(m, x):
  return m.g_a(x)


def _m_g_s(m, y):
  return m.g_s(y)


@functools.lru_cache(maxsize=8)
def _image_programs(model):
  def analysis(v, x):
    padded, _ = ops.pad_to_multiple(x, 16)
    return model.apply(v, padded, method=_m_g_a)

  def synthesis(v, y_hat, size):
    return ops.crop(model.apply(v, y_hat, method=_m_g_s), size)

  return jax.jit(analysis), jax.jit(synthesis, static_argnums=2)


def _as_image(image) -> jax.Array:
  x = np.asarray(image)
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
    raise ValueError(f"expected one RGB image (H, W, 3) or (1, H, W, 3), "
                     f"got shape {x.shape}")
  if x.dtype == np.uint8:
    x = x.astype(np.float32) / 255.0
  return jnp.asarray(x, jnp.float32)


def latent_shape(model, height: int, width: int) -> tuple[int, int, int, int]:
  d = 16
  return (1, -(-height // d), -(-width // d), model.latent_channels)


# --------------------------------------------------------------------------
# The paper's layered files: DepthBase ("base") + Enhancement ("enhancement").


def _m_base_analysis(m, x):
  return m.g_a(m.down(ops.downsample_2x(x))).astype(jnp.float32)


def _m_half_analysis(m, x_half):
  return m.g_a(x_half).astype(jnp.float32)


def _m_base_outputs(m, y_hat):
  return m.task(y_hat), m.reconstruct(y_hat)


def _m_enhancement_outputs(m, y_hat, half_size, out_size):
  out = ops.crop(m.g_s(y_hat).astype(jnp.float32), half_size)
  if m.task_name == "reconstruction":
    return out
  logits = m.head(out)
  if out_size is not None:
    from tcr_jax.tasks.layers import resize_bilinear
    logits = {k: resize_bilinear(v, out_size) for k, v in logits.items()}
  return logits


def layer_entropy_model(model) -> entropy_models.GaussianEntropyModel:
  """The entropy model of a DepthBase or Enhancement layer, standalone."""
  if hasattr(model, "side_channels"):
    return entropy_models.make_conditional_model(
        model.latent_channels, model.side_channels, model.context,
        model.quantizer)
  return entropy_models.make_entropy_model(
      model.entropy_model, model.latent_channels, model.quantizer,
      model.hyper_channels)


@functools.lru_cache(maxsize=8)
def _layer_programs(model):
  """Jitted (analysis, outputs) of a DepthBase or an Enhancement."""
  if hasattr(model, "side_channels"):
    def analysis(v, x):
      padded, _ = ops.pad_to_multiple(ops.downsample_2x(x), model.multiple)
      return model.apply(v, padded, method=_m_half_analysis)

    def outputs(v, y_hat, half_size, out_size):
      return model.apply(v, y_hat, half_size, out_size,
                         method=_m_enhancement_outputs)

    return jax.jit(analysis), jax.jit(outputs, static_argnums=(2, 3))

  def analysis(v, x):
    padded, _ = ops.pad_to_multiple(x, model.multiple)
    return model.apply(v, padded, method=_m_base_analysis)

  def outputs(v, y_hat, size):
    disparity, x_rec = model.apply(v, y_hat, method=_m_base_outputs)
    return disparity[:, :size[0], :size[1]], ops.crop(x_rec, size)

  return jax.jit(analysis), jax.jit(outputs, static_argnums=2)


def _layer_latent_shape(model, height: int, width: int) -> tuple[int, ...]:
  """DepthBase: x padded to 32, then / 2 and / 16; Enhancement: the half-
  resolution image padded to 16, then / 16."""
  if hasattr(model, "side_channels"):
    height, width = -(-height // 2), -(-width // 2)
  d = model.multiple
  return (1, -(-height // d), -(-width // d), model.latent_channels)


def compress_layers(base_model, base_variables, image, enhancement_model=None,
                    enhancement_variables=None, *, tol: float = DEFAULT_TOL
                    ) -> bytes:
  """A layered file: stream "base" (DepthBase) and, optionally,
  "enhancement" (Enhancement conditioned on the decoded base latent).

  The container's fingerprint is the base model's, so a reader holding only
  the base model decodes the base; the enhancement stream starts with the
  enhancement model's own 8-byte fingerprint.
  """
  x = _as_image(image)
  em = layer_entropy_model(base_model)
  ev = {"params": base_variables["params"]["em"]}
  y_base = _layer_programs(base_model)[0](base_variables, x)
  base, info = encode_latent(em, ev, y_base, tol=tol)
  streams = {"base": bitstream.join_streams(base)}
  if enhancement_model is not None:
    y_enh = _layer_programs(enhancement_model)[0](enhancement_variables, x)
    enh, _ = encode_latent(layer_entropy_model(enhancement_model),
                           {"params": enhancement_variables["params"]["em"]},
                           y_enh, side=info["y_hat"], tol=tol)
    streams["enhancement"] = (model_fingerprint(enhancement_model,
                                                enhancement_variables)
                              + bitstream.join_streams(enh))
  return bitstream.pack(streams, model_fingerprint(base_model, base_variables),
                        x.shape[1:3])


def decompress_layers(base_model, base_variables, data: bytes,
                      enhancement_model=None, enhancement_variables=None
                      ) -> dict[str, Any]:
  """Decodes a `compress_layers` file.

  Always decodes the base: y_base, disparity (1, H, W), x_rec (1, H, W, 3).
  With an enhancement model and an "enhancement" stream, also y_enhancement
  and x_hat (half resolution) or logits (resized to H x W).

  Raises:
    BitstreamError: corrupt, foreign, or another model's file or stream.
  """
  header, streams = bitstream.unpack(
      data, model_fingerprint(base_model, base_variables), required=("base",))
  size = (header.height, header.width)
  em = layer_entropy_model(base_model)
  y_base = decode_latent(em, {"params": base_variables["params"]["em"]},
                         bitstream.split_streams(streams["base"]),
                         _layer_latent_shape(base_model, *size))
  disparity, x_rec = _layer_programs(base_model)[1](base_variables, y_base, size)
  out = {"height": size[0], "width": size[1], "bits": 8 * len(data),
         "stream_bytes": dict(header.stream_lengths), "y_base": y_base,
         "disparity": disparity, "x_rec": x_rec}
  if enhancement_model is None or "enhancement" not in streams:
    return out
  payload = streams["enhancement"]
  fp = model_fingerprint(enhancement_model, enhancement_variables)
  if payload[:len(fp)] != fp:
    raise BitstreamError("enhancement stream was written by a different "
                         "enhancement model or configuration")
  y_enh = decode_latent(
      layer_entropy_model(enhancement_model),
      {"params": enhancement_variables["params"]["em"]},
      bitstream.split_streams(payload[len(fp):]),
      _layer_latent_shape(enhancement_model, *size), side=y_base)
  half = (-(-size[0] // 2), -(-size[1] // 2))
  result = _layer_programs(enhancement_model)[1](
      enhancement_variables, y_enh, half,
      None if enhancement_model.task_name == "reconstruction" else size)
  out["y_enhancement"] = y_enh
  out["x_hat" if enhancement_model.task_name == "reconstruction"
      else "logits"] = result
  return out


def encode_image(model, variables, image, *, tol: float = DEFAULT_TOL
                 ) -> tuple[bytes, dict[str, Any]]:
  """compress, also returning encode_latent's info (plus the file's size)."""
  x = _as_image(image)
  analysis, _ = _image_programs(model)
  em, em_vars = image_entropy_model(model)
  streams, info = encode_latent(em, em_vars(variables), analysis(variables, x),
                                tol=tol)
  data = bitstream.pack(streams, model_fingerprint(model, variables),
                        x.shape[1:3])
  info["file_bits"] = 8 * len(data)
  info["header_bits"] = 8 * (len(data) - sum(len(s) for s in streams.values()))
  return data, info


def compress(model, variables, image, *, tol: float = DEFAULT_TOL) -> bytes:
  """One image (uint8 or float in [0, 1], (H, W, 3) or (1, H, W, 3)) to bytes.

  Deterministic: the same input, model and variables give the same bytes.
  """
  return encode_image(model, variables, image, tol=tol)[0]


def decompress(model, variables, data: bytes) -> tuple[jax.Array, dict[str, Any]]:
  """Decodes a `compress` file: (x_hat (1, H, W, 3) float, unclipped; info).

  Raises:
    BitstreamError: the file is corrupt, truncated, not ours, or was
      written by another model (checked before any model computation).
  """
  em, em_vars = image_entropy_model(model)
  needed = ("hyper", "y") if em.hyperprior else ("y",)
  header, streams = bitstream.unpack(data, model_fingerprint(model, variables),
                                     required=needed)
  shape = latent_shape(model, header.height, header.width)
  y_hat = decode_latent(em, em_vars(variables), streams, shape)
  _, synthesis = _image_programs(model)
  x_hat = synthesis(variables, y_hat, (header.height, header.width))
  bits = 8 * len(data)
  return x_hat, {"height": header.height, "width": header.width, "bits": bits,
                 "bpp": bits / (header.height * header.width),
                 "stream_bytes": dict(header.stream_lengths),
                 "header_bytes": header.header_bytes, "y_hat": y_hat}
