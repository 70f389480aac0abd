"""Symbol coding with constriction: integers, residual groups, fix lists,
hyper-latents, and the byte layout of a stream.

  _encode_uints / _decode_uints      Elias-gamma-like integers in bypass symbols
  _encode_group / _decode_group      symbols under one table, with escapes
  _encode_residuals / ...            a pass of residuals, grouped by table level
  _encode_positions / ...            sorted positions (the fix lists), gap-coded
  _encode_hyper / _decode_hyper      z, channel by channel (FactorizedTables)

Every decoder raises bitstream.BitstreamError on malformed input, never
anything else.
"""
from __future__ import annotations

import constriction
import numpy as np

from tcr_jax.codec import bitstream
from tcr_jax.codec.bitstream import BitstreamError
from tcr_jax.codec.tables import (MAX_ABS_VALUE, FactorizedTables, _coded_pmf,
                                  gaussian_tables)

_queue = constriction.stream.queue
_model = constriction.stream.model


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
