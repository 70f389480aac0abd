"""Latent coding: a latent y under a GaussianEntropyModel to streams and back.

  encode_latent(em, variables, y, side)              -> (streams, info)
  decode_latent(em, variables, streams, shape, side) -> y_hat
  latent_parameters(em, variables, y, side)          -> (scale, mean)

The parameter networks run jitted with "highest" matmul precision; the
serial-context decoder is one compiled lax.fori_loop over wavefronts
t = 3 i + j whose symbols are decoded on the host through an ordered
io_callback. docs/bitstream.md gives the order of symbols and the stream
layout.
"""
from __future__ import annotations

import functools
import itertools
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from tcr_jax.codec import entropy_models, ops
from tcr_jax.codec.bitstream import BitstreamError
from tcr_jax.codec.symbols import (_decode_hyper, _decode_positions,
                                   _decode_residuals, _encode_hyper,
                                   _encode_positions, _encode_residuals,
                                   _latent_checksum, _queue, _to_bytes,
                                   _to_words, table_bits)
from tcr_jax.codec.tables import (DEFAULT_TOL, MAX_ABS_VALUE, boundary_flags,
                                  centre, factorized_tables, scale_index)

ParamTransform = Callable[[np.ndarray, np.ndarray, np.ndarray],
                          tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------
# Parameter networks (jax), compiled once per entropy model.


def _m_h_a(m, y):
  return m.h_a(y)


def _m_static_features(m, z_hat, side, shape):
  """The features of em.parameters that do not depend on y_hat, in order."""
  return m.static_features(z_hat, side, shape)


class _Programs:
  """Jitted pieces of one entropy model (hashable flax module as the key)."""

  def __init__(self, em: entropy_models.GaussianEntropyModel):
    self.em = em
    self.hyper = jax.jit(self._hyper)
    self.params = jax.jit(self._params)
    self.features = jax.jit(self._features, static_argnums=3)
    self.serial = jax.jit(self._serial_fori, static_argnums=3)

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
    d = jnp.arange(5)
    patches = y_pad[:, rows[:, None, None] + d[None, :, None],
                    cols[:, None, None] + d[None, None, :], :]  # (B, M, 5, 5, C)
    feats = None if features is None else features[:, rows, cols, :]
    with jax.default_matmul_precision("highest"):
      return self.em.apply(v, patches, feats, method="parameters_at")

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
                  param_transform: ParamTransform | None = None) -> jax.Array:
  """Decodes the latent y_hat (float32, integer-valued) of `latent_shape`.

  Args mirror encode_latent.

  Raises:
    BitstreamError: missing or malformed streams.
  """
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
                                      shape))
  y_hat = np.zeros(shape, np.float32)
  passes = pass_ids(em, shape)
  for p in range(int(passes.max()) + 1):
    scale, mean = progs.params(em_variables, jnp.asarray(y_hat), z_hat, side)
    flat = np.flatnonzero(passes == p)
    values = host.decode(flat, np.asarray(scale).reshape(-1)[flat],
                         np.asarray(mean).reshape(-1)[flat])
    y_hat.reshape(-1)[flat] = values
  return host.verify(y_hat)


def _decode_serial(progs: _Programs, v, host: _YDecoder, z_hat, side, shape
                   ) -> jax.Array:
  """One compiled lax.fori_loop over wavefronts; the host decodes each
  wavefront's symbols through an ordered io_callback."""
  features = progs.features(v, z_hat, side, shape)
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
