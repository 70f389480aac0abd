"""Colours, textures and the shaders of the things in a scene.

Colour tables, the texture helpers (`_fade`, `_frac`, `_cells`, per-cell
values, colour mixing), `_Lazy` (a shader built on first use) and the
shader factories: building facades, foliage, solid colours, fences, trees,
cars and pedestrians. Each factory draws its random parameters from the
scene's `_Random` when it is built. (The ground's shader lives with the
street layout, the sign and traffic-light shaders with the poles.)
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from tcr_jax.data.synthetic.camera import _Random
from tcr_jax.data.synthetic.canvas import Shader, _Pixels

_BUILDING_COLOURS = np.array([
    (0.78, 0.72, 0.62), (0.62, 0.6, 0.58), (0.85, 0.83, 0.78),
    (0.55, 0.36, 0.28), (0.7, 0.55, 0.4), (0.45, 0.45, 0.48),
    (0.82, 0.74, 0.55), (0.66, 0.7, 0.72), (0.72, 0.5, 0.45)], np.float32)
_BRICK_COLOURS = np.array([
    (0.55, 0.25, 0.18), (0.62, 0.33, 0.22), (0.45, 0.22, 0.17),
    (0.7, 0.55, 0.4), (0.5, 0.42, 0.35)], np.float32)
_CAR_COLOURS = np.array([
    (0.92, 0.92, 0.92), (0.07, 0.07, 0.08), (0.65, 0.67, 0.7),
    (0.38, 0.39, 0.41), (0.62, 0.06, 0.06), (0.1, 0.2, 0.55),
    (0.07, 0.1, 0.25), (0.1, 0.33, 0.2), (0.85, 0.7, 0.1),
    (0.7, 0.62, 0.5), (0.85, 0.4, 0.1)], np.float32)
_SKIN_COLOURS = np.array([
    (0.96, 0.8, 0.69), (0.87, 0.67, 0.53), (0.72, 0.52, 0.38),
    (0.55, 0.38, 0.26), (0.36, 0.24, 0.16)], np.float32)
_HAIR_COLOURS = np.array([
    (0.08, 0.06, 0.05), (0.3, 0.2, 0.1), (0.6, 0.5, 0.3), (0.5, 0.5, 0.5)],
    np.float32)
_PAVING_COLOURS = np.array([
    (0.62, 0.6, 0.58), (0.7, 0.66, 0.6), (0.55, 0.55, 0.57),
    (0.6, 0.5, 0.45)], np.float32)


def _pick(rng: _Random, table: np.ndarray, jitter: float = 0.05) -> np.ndarray:
  """A colour from `table`, jittered."""
  return table[rng.integers(0, len(table))] + rng.uniform(-jitter, jitter, 3)


def _random_colour(rng: _Random, lo: float = 0.05,
                   hi: float = 0.95) -> np.ndarray:
  """Any colour, each channel uniform in [lo, hi]."""
  return rng.uniform(lo, hi, 3)


def _fade(px, size_m: float):
  """0 when a pattern of `size_m` projects below ~1.5 px, 1 from ~3 px."""
  return np.minimum(np.maximum(px * (size_m / 1.5) - 1.0, 0.0), 1.0)


def _frac(x: np.ndarray, period: float) -> np.ndarray:
  """Position of `x` within its period, in [0, 1) (a fast `mod / period`)."""
  t = x * np.float32(1.0 / period)
  return t - np.floor(t)


def _cells(x: np.ndarray, period: float) -> tuple:
  """(position within the period in [0, 1), period index as a float)."""
  t = x * np.float32(1.0 / period)
  index = np.floor(t)
  return t - index, index


# Per-cell pseudo-random values (window lights, brick tones), indexed by a
# hash of the cell's coordinates plus a per-surface salt.
_CELL_TABLE = np.random.default_rng(20240601).random(64).astype(np.float32)


def _cell_value(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
  """A value in [0, 1) per integer cell (a, b) (floats holding integers)."""
  return _CELL_TABLE[((a * 31 + b * 17).astype(np.int32) + salt) & 63]


class _Lazy:
  """A shader built on first use: hidden surfaces never pay for it."""

  def __init__(self, factory: Callable[..., Shader], *args):
    self._factory, self._args = factory, args
    self._shader = None

  def __call__(self, p):
    if self._shader is None:
      self._shader = self._factory(*self._args)
    return self._shader(p)


def _planes(colour: np.ndarray) -> np.ndarray:
  """A (3,) colour as (3, 1), broadcastable against (3, n) planes."""
  return colour[:, None] if colour.ndim == 1 else colour


def _tint(colour: np.ndarray, tone: np.ndarray) -> np.ndarray:
  """Colour (3,) or (3, n) times per-pixel brightness (n,): (3, n)."""
  return _planes(colour) * tone


def _mix(*pairs) -> np.ndarray:
  """Sum of colour * weight over (colour, weight) pairs, as (3, n)."""
  out = None
  for colour, weight in pairs:
    term = _tint(colour, weight)
    out = term if out is None else out + term
  return out


def _facade_shader(rng: _Random, top: float, shade: float = 1.0) -> Shader:
  """Building wall with a window grid; plaster, brick or glass curtain."""
  style = rng.choice(["plaster", "brick", "glass"], p=[0.5, 0.35, 0.15])
  if style == "brick":
    wall = _pick(rng, _BRICK_COLOURS, 0.06)
  elif style == "glass":
    wall = _pick(rng, _BUILDING_COLOURS, 0.05) * 0.7
  elif rng.random() < 0.3:
    wall = _random_colour(rng, 0.3, 0.9)
  else:
    wall = _pick(rng, _BUILDING_COLOURS, 0.07)
  wall = wall * shade
  floor_h = rng.uniform(2.9, 3.8)
  bay = rng.uniform(2.2, 4.0)
  win_w = rng.uniform(0.35, 0.7) if style != "glass" else 0.9
  win_h = rng.uniform(0.4, 0.62) if style != "glass" else 0.85
  glass = (np.array([0.12, 0.16, 0.22], np.float32)
           + rng.uniform(-0.05, 0.1, 3)) * shade
  shop = rng.random() < 0.5
  shop_colour = _random_colour(rng, 0.1, 0.8) * shade
  salt = rng.integers(0, 64)

  def shader(p: _Pixels):
    u, v = p.u, p.v
    fu, iu = _cells(u, bay)
    fv, iv = _cells(v, floor_h)
    fu = np.abs(fu - 0.5)
    window = (fu < 0.5 * win_w) & (np.abs(fv - 0.55) < 0.5 * win_h)
    window &= (v > floor_h) & (v < top - 0.7)
    if shop:
      window |= (fu < 0.45) & (v < 0.72 * floor_h)
    alpha = _fade(p.px, bay * win_w)   # windows blur into the wall far away
    if np.ndim(alpha) == 0 and alpha == 1.0:
      cover = window.astype(np.float32)
    else:
      cover = window * alpha + (1 - alpha) * (win_w * win_h)
    tone = 0.75 + 0.3 * p.lo + 0.12 * p.hi
    if style == "brick":
      fb, row = _cells(v, 0.3)
      fs, col = _cells(u + 0.3 * (row.astype(np.int32) & 1), 0.6)
      mortar = (fb < 0.15) | (fs < 0.08)
      brick = _cell_value(col, row, salt) * 0.35 - 0.2
      tone *= 1 + _fade(p.px, 0.3) * np.where(mortar, 0.35, brick)
    elif style == "glass":
      tone *= 1 - 0.25 * _fade(p.px, 0.2) * (fu > 0.44)
    pane = (0.5 + 1.1 * _cell_value(iu, iv, salt)) * (
        0.85 + 0.3 * p.mid) * cover
    if not shop:
      return _mix((wall, tone * (1 - cover)), (glass, pane)), None
    in_shop = (v < floor_h) & (fu >= 0.3)
    return _mix((wall, tone * (1 - cover)), (glass, pane * ~in_shop),
                (shop_colour, pane * in_shop)), None

  return shader


def _foliage_shader(rng: _Random, shade: float = 1.0) -> Shader:
  """Mottled green leaves."""
  base = (np.array([0.2, 0.38, 0.12], np.float32)
          + rng.uniform(-0.08, 0.08, 3))
  base = np.maximum(base, 0.02) * shade

  def shader(p: _Pixels):
    tone = (0.45 + 0.8 * p.mid) * (0.7 + 0.5 * p.hi) * (0.85 + 0.3 * p.lo)
    return _tint(base, tone), None

  return shader


def _solid_shader(colour: np.ndarray, texture: float = 0.1) -> Shader:
  """One colour with +-`texture` relative grain."""
  def shader(p: _Pixels):
    tone = (1 - texture) + (2 * texture) * (0.6 * p.mid + 0.4 * p.hi)
    return _tint(colour, tone), None
  return shader


def _fence_shader(rng: _Random, top: float) -> Shader:
  """Vertical bars between two rails, see-through; `top` its height."""
  colour = _pick(rng, np.array([(0.2, 0.2, 0.22), (0.5, 0.45, 0.4),
                                (0.35, 0.25, 0.15)], np.float32), 0.05)
  gap = rng.uniform(0.12, 0.3)

  def shader(p: _Pixels):
    bars = _frac(p.u, gap) < 0.35
    rails = (np.abs(p.v - 0.15) < 0.05) | (p.v > top - 0.08)
    solid = _fade(p.px, gap) < 0.5      # bars thinner than a pixel: a veil
    return _tint(colour, 0.85 + 0.3 * p.hi), bars | rails | solid

  return shader


def _tree_shader(rng: _Random, rx: float, ry: float, centre: float) -> Shader:
  """A ragged elliptic crown of radii (rx, ry) at height `centre`, a trunk."""
  trunk_w = rng.uniform(0.12, 0.22)
  bark = _pick(rng, np.array([(0.3, 0.22, 0.15), (0.4, 0.35, 0.3)],
                             np.float32), 0.04)
  foliage = _foliage_shader(rng)

  def shader(p: _Pixels):
    du, dv = p.u * (1.0 / rx), (p.v - centre) * (1.0 / ry)
    crown = du * du + dv * dv < 0.65 + 0.55 * p.mid
    trunk = (np.abs(p.u) < trunk_w) & (p.v < centre)
    leaves, _ = foliage(p)
    rgb = np.where(crown, leaves, _tint(bark, 0.8 + 0.4 * p.hi))
    return rgb, crown | trunk

  return shader


def _car_shader(rng: _Random, half_w: float, height: float,
                front: bool) -> Shader:
  """A car seen from behind (red lamps) or the front (white lamps)."""
  if rng.random() < 0.25:
    body = _random_colour(rng)
  else:
    body = _pick(rng, _CAR_COLOURS, 0.04)
  belt = height * rng.uniform(0.5, 0.62)
  lamp = (np.array([0.95, 0.92, 0.8], np.float32) if front
          else np.array([0.8, 0.05, 0.05], np.float32))
  # Parts: 0 body, 1 bumper, 2 lamps, 3 plate, 4 glass, 5 tyres.
  colours = np.stack([body, body * 0.55 + 0.05, lamp,
                      np.array([0.9, 0.9, 0.88], np.float32),
                      np.array([0.1, 0.13, 0.17], np.float32)
                      + rng.uniform(0, 0.12, 3),
                      np.array([0.04, 0.04, 0.04], np.float32)], axis=1)

  def shader(p: _Pixels):
    au, v = np.abs(p.u), p.v
    taper = half_w * (1 - 0.25 * np.clip((v - belt) / (height - belt), 0, 1))
    tyre = (v < 0.36) & (au > half_w - 0.4) & (au < half_w - 0.05)
    body_ = (v >= 0.24) & (v < belt)
    cabin = (v >= belt) & (au <= taper)
    part = ((v >= 0.24) & (v < 0.36)).astype(np.int8)
    part[(v > belt - 0.24) & (v < belt - 0.07) & (au > half_w - 0.34)
         & (au < half_w - 0.04)] = 2
    part[(au < 0.26) & (v > 0.38) & (v < 0.5)] = 3
    part[cabin & (v > belt + 0.06) & (v < height - 0.08)
         & (au < taper - 0.1)] = 4
    part[tyre & ~body_] = 5
    shade = (0.78 + (0.3 / height) * v) * (0.96 + 0.08 * p.mid)
    return np.take(colours, part, axis=1) * shade, tyre | body_ | cabin

  return shader


def _person_shader(rng: _Random, height: float, torso_hw: float,
                   arm_w: float, stride: float) -> Shader:
  """A standing or walking pedestrian (u lateral from the centre line)."""
  skin = _pick(rng, _SKIN_COLOURS, 0.03)
  shirt = _random_colour(rng, 0.05, 0.9)
  trousers = (_random_colour(rng, 0.05, 0.5) if rng.random() < 0.7
              else _random_colour(rng, 0.05, 0.9))
  hair = _pick(rng, _HAIR_COLOURS, 0.03)
  shoes = np.array([0.06, 0.06, 0.07], np.float32)
  coat = rng.random() < 0.3
  hip = 0.47 * height
  shoulder = 0.81 * height
  head_v = height - 0.065 * height
  head_ru, head_rv = 0.048 * height, 0.066 * height
  # Parts: 0 shirt, 1 trousers, 2 skin, 3 hair, 4 shoes, 5 sleeves.
  colours = np.stack([shirt, trousers, skin, hair, shoes,
                      shirt if rng.random() < 0.6 else skin], axis=1)

  def shader(p: _Pixels):
    u, v = p.u, p.v
    au = np.abs(u)
    leg_c = 0.055 + stride * np.clip(1 - v / hip, 0, 1)
    legs = (np.abs(au - leg_c) < 0.065) & (v < hip)
    if coat:
      torso = (v >= 0.28 * height) & (v < shoulder) & (
          au < torso_hw + 0.04 * np.maximum(hip - v, 0) / hip)
    else:
      torso = (v >= hip - 0.03) & (v < shoulder) & (au < torso_hw)
    arms = ((v >= 0.45 * height) & (v < shoulder - 0.02)
            & (au >= torso_hw) & (au < torso_hw + arm_w))
    dh = (v - head_v) * (1 / head_rv)
    head = (u * (1 / head_ru)) ** 2 + dh * dh < 1
    neck = (v >= shoulder) & (v < head_v) & (au < 0.04)
    part = legs.astype(np.int8)
    part[legs & (v < 0.035 * height)] = 4
    part[torso] = 0
    part[arms] = 5
    part[head | neck] = 2
    part[head & (dh > 0.25)] = 3
    shade = 0.85 + 0.2 * p.mid
    return (np.take(colours, part, axis=1) * shade,
            legs | torso | arms | head | neck)

  return shader
