"""Procedurally generated street scenes: the embedded, offline default dataset.

Every scene is rendered from a small 3-D world seen by a pinhole stereo camera
standing on a flat street:

  * the ground (road with lane markings, sidewalks, terrain) is the plane
    `elevation = 0`; a ground point at image row `y` (below the horizon row
    `y_h`) lies at depth `f * h / (y - y_h)`, so its disparity
    `f * B / depth = B * (y - y_h) / h` grows linearly towards the bottom;
  * buildings are boxes along both sides of the street: their facades are
    vertical planes parallel to the street (disparity linear in the column),
    their near end walls and the buildings closing the street face the camera;
  * cars, pedestrians, trees, poles and signs are upright billboards standing
    on the ground at one depth each (constant disparity `f * B / depth`).

Occlusion is a z-buffer over disparity: a surface is drawn where it is nearer
(larger disparity) than what is already there. Surfaces are drawn roughly
front to back and each one is shaded only on the pixels that passed the
depth test, so every pixel is textured about once. Textures (windows, bricks,
paving, foliage, asphalt) and colours are random and carry the detail that
image reconstruction needs and depth estimation does not.

The camera mimics Cityscapes (focal length 2262 px at 2048 px width, 0.209 m
baseline) with the focal length proportional to the image width, so disparity
scales with the width: nearby road is ~100 px at 1024x2048 and distant objects
a few px. Everything is numpy; a 128x256 sample takes a few milliseconds.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import threading
from typing import Callable, Sequence

import numpy as np

from tcr_jax.data.labels import (
    BUILDING, CAR, CITYSCAPES_PALETTE, COCO_CAR, COCO_PERSON, FENCE,
    IGNORE_INDEX, PERSON, POLE, ROAD, SIDEWALK, SKY, TERRAIN, TRAFFIC_LIGHT,
    TRAFFIC_SIGN, TRAIN_ID_NAMES, VEGETATION, WALL)
from tcr_jax.errors import UserError

MAX_BOXES = 32
VALIDATION_SIZE = 500
TRAIN_SIZE = 2**31 - 1
MIN_BOX_PIXELS = 16
# An instance whose visible pixels fill less of its box than this is left
# out of `boxes` (its pixels keep their class in `segmentation`).
MIN_BOX_FILL = 0.3

BASELINE_M = 0.209
FOCAL_PER_WIDTH = 2262.0 / 2048.0
NEAR_DEPTH_M = 1.5
_HORIZON_RANGE = (0.36, 0.5)       # horizon row, as a fraction of the height
_CAM_HEIGHT_RANGE = (1.15, 1.5)    # metres above the street

_SPLIT_IDS = {"train": 0, "validation": 1}
_MIN_SIZE = 16


def max_disparity(height: int, width: int) -> float:
  """Upper bound of `disparity` (px) at this image size.

  Everything but the ground is at least NEAR_DEPTH_M away, f * B / near; the
  ground's disparity peaks at the bottom row, B * (rows below horizon) / h.
  """
  ground = (BASELINE_M * height * (1 - _HORIZON_RANGE[0])
            / _CAM_HEIGHT_RANGE[0])
  return max(FOCAL_PER_WIDTH * width * BASELINE_M / NEAR_DEPTH_M, ground)


# ----------------------------------------------------------------------------
# Random numbers, camera, noise.
# ----------------------------------------------------------------------------


class _Random:
  """The subset of `np.random.Generator` used here, fast for scalars.

  Scalar draws come from a prefetched block of uniforms (one numpy call per
  scalar would dominate the rendering time); array draws go to the generator.
  """

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self._block: list = []

  def random(self, size=None, dtype=np.float64):
    if size is not None:
      return self.rng.random(size, dtype=dtype)
    if not self._block:
      self._block = self.rng.random(256).tolist()
    return self._block.pop()

  def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
    if size is None:
      return low + (high - low) * self.random()
    return (low + (high - low) * self.rng.random(size)).astype(np.float32)

  def integers(self, low: int, high: int) -> int:
    """An int in [low, high)."""
    return low + min(int(self.random() * (high - low)), high - low - 1)

  def choice(self, options: Sequence, p: Sequence[float] | None = None):
    if p is None:
      return options[self.integers(0, len(options))]
    x, acc = self.random(), 0.0
    for option, prob in zip(options, p):
      acc += prob
      if x < acc:
        return option
    return options[-1]


@dataclasses.dataclass(frozen=True)
class _Camera:
  """Pinhole camera `cam_height` metres above the street, looking along +Z."""
  height: int
  width: int
  focal: float
  cx: float
  horizon: float
  cam_height: float

  def col(self, lateral, depth):
    return self.cx + self.focal * lateral / depth

  def row(self, elevation, depth):
    return self.horizon + self.focal * (self.cam_height - elevation) / depth

  def disparity(self, depth):
    return self.focal * BASELINE_M / depth

  def min_object_depth(self) -> float:
    """Nearest depth at which a thing standing on the ground is in view."""
    bottom = self.focal * self.cam_height / (self.height - self.horizon)
    return max(NEAR_DEPTH_M, 1.02 * bottom)


def _random_camera(rng: _Random, height: int, width: int) -> _Camera:
  """Cityscapes-like focal length; random yaw, horizon and height."""
  return _Camera(height=height, width=width,
                 focal=FOCAL_PER_WIDTH * width,
                 cx=width * (0.5 + rng.uniform(-0.06, 0.06)),
                 horizon=height * rng.uniform(*_HORIZON_RANGE),
                 cam_height=rng.uniform(*_CAM_HEIGHT_RANGE))


def _value_noise(rng: _Random, height: int, width: int, cell: float,
                 out: np.ndarray) -> None:
  """Smooth noise in [0, 1] into the (height, width) array `out`: a random
  grid of `cell` px, upsampled by smoothstep interpolation."""
  cell = max(cell, 1.0)
  gh, gw = int(height / cell) + 2, int(width / cell) + 2
  grid = rng.random((gh, gw), dtype=np.float32)
  ry = (np.arange(height, dtype=np.float32) + 0.5) / cell
  rx = (np.arange(width, dtype=np.float32) + 0.5) / cell
  iy, ix = ry.astype(np.intp), rx.astype(np.intp)
  ty, tx = ry - iy, rx - ix
  ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
  rows = grid[iy]
  rows += (grid[iy + 1] - rows) * ty[:, None]
  np.take(rows, ix, axis=1, out=out, mode="clip")
  right = np.take(rows, ix + 1, axis=1, mode="clip")
  right -= out
  right *= tx
  out += right


def _fine_noise(rng: _Random, height: int, width: int, cell: float,
                out: np.ndarray) -> None:
  """Like `_value_noise` for small cells: computed at half resolution and
  repeated 2x2 (a fine grid makes the interpolation costly)."""
  hh, hw = (height + 1) // 2, (width + 1) // 2
  half = np.empty((hh, hw), np.float32)
  _value_noise(rng, hh, hw, cell / 2, half)
  out[0::2, 0::2] = half
  out[1::2, 0::2] = half[:height // 2]
  out[0::2, 1::2] = half[:, :width // 2]
  out[1::2, 1::2] = half[:height // 2, :width // 2]


# ----------------------------------------------------------------------------
# Surfaces, the canvas and the depth test.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Surface:
  """Where a surface projects: a pixel rectangle and per-pixel attributes.

  `disp`, `u`, `v` and `px` are scalars or arrays broadcastable to the
  rectangle's (rows, cols). `u` and `v` are the surface coordinates shaders
  texture with (metres, see each constructor), `px` the pixels per metre.
  """
  ys: slice
  xs: slice
  disp: np.ndarray | float
  u: np.ndarray | float
  v: np.ndarray | float
  px: np.ndarray | float
  inside: np.ndarray | None = None   # (rows, cols) bool, or None for all

  def rows(self, a: int, b: int) -> "_Surface":
    """The band of rows [a, b) of this surface."""
    def cut(x):
      return x[a:b] if np.ndim(x) == 2 and x.shape[0] > 1 else x
    return _Surface(slice(self.ys.start + a, self.ys.start + b), self.xs,
                    cut(self.disp), cut(self.u), cut(self.v), cut(self.px),
                    None if self.inside is None else self.inside[a:b])


def _gather(a, k: np.ndarray, rr: np.ndarray, cc: np.ndarray):
  """Values of a broadcastable (rows, cols) array at pixels (rr, cc).

  `k` is the same pixels' flat index into the (rows, cols) rectangle.
  """
  if not isinstance(a, np.ndarray) or not a.ndim:
    return a
  rows, cols = a.shape
  if rows == 1:
    return a[0, cc] if cols > 1 else np.full(k.shape, a[0, 0])
  return a[rr, 0] if cols == 1 else a.reshape(-1)[k]


class _Pixels:
  """The pixels of a surface that passed the depth test, as flat arrays.

  Shaders read `u`, `v`, `px` and the noise fields `lo` (large blobs),
  `mid` (a few px) and `hi` (per pixel); each is an (n,) array or a scalar.
  """

  def __init__(self, cv: "_Canvas", surf: _Surface, k: np.ndarray):
    self._cv = cv
    self._lo = self._mid = self._hi = None
    self.n = k.size
    cols = surf.xs.stop - surf.xs.start
    self.k = k
    self.rr = k // cols
    self.cc = k - self.rr * cols
    self.flat = k + (self.rr * (cv.width - cols)
                     + (surf.ys.start * cv.width + surf.xs.start))
    self.u = self.gather(surf.u)
    self.v = self.gather(surf.v)
    self.px = self.gather(surf.px)

  def gather(self, a):
    """Values of a surface attribute at these pixels."""
    return _gather(a, self.k, self.rr, self.cc)

  # The noise fields, gathered on first use.
  @property
  def lo(self) -> np.ndarray:
    if self._lo is None:
      self._lo = self._cv.lo[self.flat]
    return self._lo

  @property
  def mid(self) -> np.ndarray:
    if self._mid is None:
      self._mid = self._cv.mid[self.flat]
    return self._mid

  @property
  def hi(self) -> np.ndarray:
    if self._hi is None:
      self._hi = self._cv.hi[self.flat]
    return self._hi


# A shader maps pixels to (rgb, mask) or (rgb, mask, labels): rgb (3, n) or
# (3,) in [0, 1] (colour planes first: numpy is slow on a trailing axis of
# 3), mask an (n,) bool array of the pixels the surface covers or None for
# all of them, labels per-pixel classes overriding the painted label.
Shader = Callable[[_Pixels], tuple]

# Surfaces are painted in bands of at most this many pixels: it bounds the
# size of numpy temporaries (large ones are slow to allocate).
_CHUNK_PIXELS = 32768

_WORKSPACE = threading.local()


def _workspace(height: int, width: int) -> dict:
  """Per-thread buffers reused from scene to scene (fresh ones are slow)."""
  ws = getattr(_WORKSPACE, "buffers", None)
  if ws is None or ws["shape"] != (height, width):
    # glibc hands freed memory back to the OS once more than its trim
    # threshold (128 KiB at start) is free, and every numpy temporary then
    # page-faults afresh, which costs a quarter of the rendering time in VMs.
    # Freeing one large (mmap-ed) block raises that threshold for good.
    np.empty(1 << 22, np.uint8)    # allocated and freed at once
    n = height * width
    ws = {"shape": (height, width),
          "rgb": np.empty((3, n), np.float32),
          "disp": np.empty(n, np.float32),
          "seg": np.empty(n, np.uint8),
          "inst": np.empty(n, np.int16),
          "lo": np.empty(n, np.float32),
          "mid": np.empty(n, np.float32),
          "hi": np.empty(n, np.float32),
          "scratch": np.empty(n, np.float32)}
    _WORKSPACE.buffers = ws
  return ws


class _Canvas:
  """Colour, disparity (the z-buffer), class and instance buffers.

  The buffers belong to the thread's workspace: copy what outlives the scene.
  """

  def __init__(self, rng: _Random, height: int, width: int):
    self.height, self.width = height, width
    ws = _workspace(height, width)
    self.rgb, self.scratch = ws["rgb"], ws["scratch"]
    self.disp, self.seg, self.inst = ws["disp"], ws["seg"], ws["inst"]
    self.lo, self.mid, self.hi = ws["lo"], ws["mid"], ws["hi"]
    self.disp2d = self.view("disp")
    self.disp.fill(0)
    self.seg.fill(SKY)
    self.inst.fill(0)
    _value_noise(rng, height, width, width / 10, self.view("lo"))
    _fine_noise(rng, height, width, max(width / 90, 2.0), self.view("mid"))
    rng.rng.random(dtype=np.float32, out=self.hi)

  def view(self, name: str) -> np.ndarray:
    """A buffer as a (height, width) view; rgb as (3, height, width)."""
    a = getattr(self, name)
    return a.reshape(a.shape[:-1] + (self.height, self.width))

  def paint(self, surf: _Surface, shader: Shader, label: int, inst: int = 0,
            shade: float = 1.0) -> bool:
    """Draws `surf` where it is nearer than the z-buffer.

    Returns whether any pixel was drawn.
    """
    rows = surf.ys.stop - surf.ys.start
    step = max(1, _CHUNK_PIXELS // (surf.xs.stop - surf.xs.start))
    if rows <= step:
      return self._paint(surf, shader, label, inst, shade)
    drawn = False
    for a in range(0, rows, step):
      drawn |= self._paint(surf.rows(a, min(a + step, rows)), shader, label,
                           inst, shade)
    return drawn

  def _paint(self, surf: _Surface, shader: Shader, label: int, inst: int,
             shade: float) -> bool:
    cur = self.disp2d[surf.ys, surf.xs]
    near = surf.disp > cur
    if surf.inside is not None:
      near &= surf.inside
    k = np.flatnonzero(near)
    if not k.size:
      return False
    pixels = _Pixels(self, surf, k)
    rgb, mask, *labels = shader(pixels)
    label = labels[0] if labels else label
    flat = pixels.flat
    disp = pixels.gather(surf.disp)
    if mask is not None:
      flat = flat[mask]
      if not flat.size:
        return False
      if np.ndim(rgb) == 2:
        rgb = np.compress(mask, rgb, axis=1)
      if np.ndim(disp):
        disp = disp[mask]
      if np.ndim(label):
        label = label[mask]
    if shade != 1.0:
      rgb = rgb * np.float32(shade)
    self.disp[flat] = disp
    for plane, values in zip(self.rgb, rgb):
      plane[flat] = values
    self.seg[flat] = label
    if inst:
      self.inst[flat] = inst
    return True


def _pixel_range(a: float, b: float, limit: int, min_px: bool = False):
  """Pixels whose centres lie in [a, b), clipped to [0, limit)."""
  lo, hi = min(a, b), max(a, b)
  start = max(0, math.ceil(lo - 0.5))
  stop = min(limit, math.ceil(hi - 0.5))
  if stop <= start and min_px:
    centre = int(math.floor(0.5 * (lo + hi)))
    if 0 <= centre < limit:
      start, stop = centre, centre + 1
  return start, stop


def _frontal(cam: _Camera, x0: float, x1: float, depth: float, v0: float,
             v1: float, centre: float = 0.0,
             min_px: bool = False) -> _Surface | None:
  """Upright rectangle facing the camera: lateral [x0, x1], height [v0, v1].

  `u` is the lateral position relative to `centre`, `v` the height (metres).
  `min_px` keeps things thinner than a pixel one pixel wide.
  """
  if depth < NEAR_DEPTH_M:
    return None
  c0, c1 = _pixel_range(cam.col(x0, depth), cam.col(x1, depth), cam.width,
                        min_px)
  r0, r1 = _pixel_range(cam.row(v1, depth), cam.row(v0, depth), cam.height,
                        min_px)
  if c1 <= c0 or r1 <= r0:
    return None
  scale = depth / cam.focal
  u = (np.arange(c0, c1, dtype=np.float32) + (0.5 - cam.cx)) * scale - centre
  v = cam.cam_height - (
      np.arange(r0, r1, dtype=np.float32) + (0.5 - cam.horizon)) * scale
  return _Surface(slice(r0, r1), slice(c0, c1),
                  disp=np.float32(cam.disparity(depth)), u=u[None, :],
                  v=v[:, None], px=cam.focal / depth)


def _side(cam: _Camera, lateral: float, z0: float, z1: float, v0: float,
          v1: float) -> _Surface | None:
  """Vertical plane parallel to the street at `lateral`, depths [z0, z1].

  `u` is the depth (metres along the street), `v` the height above ground.
  """
  z0 = max(z0, NEAR_DEPTH_M)
  if z1 <= z0 or abs(lateral) < 1e-3:
    return None
  c0, c1 = _pixel_range(cam.col(lateral, z0), cam.col(lateral, z1), cam.width)
  if c1 <= c0:
    return None
  dx = np.arange(c0, c1, dtype=np.float32) + (0.5 - cam.cx)
  with np.errstate(divide="ignore"):
    depth = cam.focal * lateral / dx
  ok = (depth >= z0) & (depth <= z1)   # guards the column at the vanishing x
  if not ok.all():
    if not ok.any():
      return None
    depth = np.where(ok, depth, z1)
  top = cam.row(v1, depth)
  bottom = cam.row(v0, depth)
  r0, r1 = _pixel_range(float(top.min()), float(bottom.max()), cam.height)
  if r1 <= r0:
    return None
  rows = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5
  inside = (rows >= top) & (rows < bottom)
  if not ok.all():
    inside &= ok
  scale = depth / cam.focal
  v = cam.cam_height - (rows - cam.horizon) * scale
  return _Surface(slice(r0, r1), slice(c0, c1),
                  disp=cam.disparity(depth).astype(np.float32)[None, :],
                  u=depth[None, :], v=v, px=(cam.focal / depth)[None, :],
                  inside=inside)


# ----------------------------------------------------------------------------
# Colours and textures.
# ----------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------
# The street layout, ground and sky.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Street:
  road_left: float      # lateral X of the left road edge (< 0)
  road_right: float     # lateral X of the right road edge (> 0)
  walk_left: float      # outer edge of the left sidewalk (< road_left)
  walk_right: float
  dividers: tuple       # lateral X of the dashed lane dividers
  end: float            # depth where the view along the street ends
  crossing: tuple       # (z0, z1) of a zebra crossing, or ()

  def lanes(self) -> list:
    """Lateral centres of the lanes."""
    edges = (self.road_left,) + self.dividers + (self.road_right,)
    return [0.5 * (a + b) for a, b in zip(edges[:-1], edges[1:])]


def _random_street(rng: _Random) -> _Street:
  """Lanes, sidewalks, maybe a zebra crossing; the camera in a lane."""
  lane = rng.uniform(2.9, 3.6)
  extra_left, extra_right = rng.integers(0, 3), rng.integers(0, 2)
  road_left = -lane * (0.5 + extra_left) - rng.uniform(0, 1.0)
  road_right = lane * (0.5 + extra_right) + rng.uniform(0, 1.0)
  dividers = tuple(lane * (k + 0.5) for k in range(-extra_left, extra_right))
  crossing = ()
  if rng.random() < 0.25:
    z0 = rng.uniform(8, 30)
    crossing = (z0, z0 + rng.uniform(3, 5))
  return _Street(road_left=road_left, road_right=road_right,
                 walk_left=road_left - rng.uniform(2.0, 5.0),
                 walk_right=road_right + rng.uniform(2.0, 5.0),
                 dividers=dividers, end=rng.uniform(60, 220),
                 crossing=crossing)


class _GroundShader:
  """Road, sidewalks and the strips beyond them, on the ground plane.

  Expects `u` = (column - cx) / focal and `v` = depth, so that the lateral
  position is `u * v`. Bands across the street, left to right: 0 beyond the
  left sidewalk, 1 left sidewalk, 2 road, 3 right sidewalk, 4 beyond the
  right sidewalk. The shader returns the pixels' classes as labels.
  """

  def __init__(self, street: _Street, rng: _Random):
    self.street = street
    outer = [TERRAIN if rng.random() < 0.45 else SIDEWALK for _ in range(2)]
    asphalt = rng.uniform(0.22, 0.42)
    road = (np.array([asphalt, asphalt, asphalt * 1.04], np.float32)
            + rng.uniform(-0.02, 0.02, 3))
    walk = _pick(rng, _PAVING_COLOURS, 0.05)
    grass = np.array([0.3, 0.42, 0.18], np.float32) + rng.uniform(
        -0.06, 0.06, 3)
    beyond = [grass if o == TERRAIN else walk * 0.95 for o in outer]
    self.edges = np.array([street.walk_left, street.road_left,
                           street.road_right, street.walk_right], np.float32)
    self.labels = np.array([outer[0], SIDEWALK, ROAD, SIDEWALK, outer[1]],
                           np.uint8)
    self.colours = np.stack([beyond[0], walk, road, walk, beyond[1]],
                            axis=1).astype(np.float32)        # (3, band)
    self.textures = np.array([0.6 if o == TERRAIN else 0.2 for o in outer],
                             np.float32)[[0, 0, 0, 1, 1]]
    self.textures[2] = 0.25
    self.marking = rng.uniform(0.6, 0.9)
    self.lines = list(street.dividers)
    self.solid = ([street.road_left + 0.35, street.road_right - 0.35]
                  if rng.random() < 0.6 else [])

  def __call__(self, p: _Pixels):
    street = self.street
    depth, px = p.v, p.px
    lateral = p.u * depth
    bands = np.searchsorted(self.edges, lateral)
    tone = self.textures[bands] * (0.6 * p.lo + 0.5 * p.hi - 0.55)
    tone += 1
    # Paving joints, fading out where they get thinner than a pixel.
    walk = (bands == 1) | (bands == 3)
    joints = (_frac(lateral, 0.6) < 0.08) | (_frac(depth, 0.6) < 0.08)
    tone -= (joints & walk) * (0.25 * _fade(px, 0.4))
    rgb = np.take(self.colours, bands, axis=1)
    rgb *= tone
    # Lane markings: dashed dividers, solid edge lines, a zebra crossing;
    # at least a pixel wide, fading as they get thinner than that.
    half = np.maximum(0.07, 0.5 / px)
    lines = None
    if self.lines:
      dashed = _frac(depth, 9.0) < 0.4
      for x in self.lines:
        hit = (np.abs(lateral - x) < half) & dashed
        lines = hit if lines is None else lines | hit
    for x in self.solid:
      hit = np.abs(lateral - x) < half
      lines = hit if lines is None else lines | hit
    paint = None
    if lines is not None:
      paint = lines * np.minimum(1.0, 0.14 * px)
    if street.crossing:
      z0, z1 = street.crossing
      stripes = (depth > z0) & (depth < z1) & (_frac(lateral, 1.0) < 0.5)
      stripes = stripes * np.minimum(1.0, 0.5 * px)
      paint = stripes if paint is None else np.maximum(paint, stripes)
    if paint is not None:
      paint *= (bands == 2) * self.marking
      rgb *= 1 - paint
      paint *= 0.88
      rgb += paint
    return rgb, None, self.labels[bands]


def _draw_ground(cv: _Canvas, cam: _Camera, street: _Street, rng: _Random):
  """Road, sidewalks and the strips beyond, wherever nothing stands."""
  shader = _GroundShader(street, rng)
  r0 = int(math.floor(cam.horizon - 0.5)) + 1
  if r0 >= cam.height:
    return
  dy = np.arange(r0, cam.height, dtype=np.float32) + (0.5 - cam.horizon)
  depth = cam.focal * cam.cam_height / dy
  dx = (np.arange(cam.width, dtype=np.float32) + (0.5 - cam.cx)) / cam.focal
  surf = _Surface(slice(r0, cam.height), slice(0, cam.width),
                  disp=(BASELINE_M / cam.cam_height * dy)[:, None],
                  u=dx[None, :], v=depth[:, None],
                  px=(cam.focal / depth)[:, None])
  cv.paint(surf, shader, ROAD)


def _draw_sky(cv: _Canvas, cam: _Camera, rng: _Random):
  """Colours the pixels nothing was drawn on: a gradient, maybe clouds."""
  kind = rng.choice(["clear", "overcast", "hazy"], p=[0.5, 0.3, 0.2])
  if kind == "clear":
    top = np.array([0.22, 0.42, 0.78], np.float32)
    low = np.array([0.68, 0.8, 0.93], np.float32)
  elif kind == "overcast":
    g = rng.uniform(0.62, 0.85)
    top = np.array([g - 0.08, g - 0.06, g - 0.02], np.float32)
    low = np.array([g + 0.06, g + 0.06, g + 0.07], np.float32)
  else:
    top = np.array([0.45, 0.55, 0.72], np.float32)
    low = np.array([0.92, 0.8, 0.62], np.float32)
  top = top + rng.uniform(-0.05, 0.05, 3)
  cloudiness = rng.uniform(0.0, 0.5)
  flat = np.flatnonzero(cv.seg == SKY)
  if not flat.size:
    return
  rows = (flat // cam.width).astype(np.float32) + 0.5
  t = np.minimum(rows * (1.0 / max(cam.horizon, 1.0)), 1.0)
  rgb = _mix((top, 1 - t), (low, t))
  if cloudiness > 0.1:
    cloud = np.clip((0.7 * cv.lo[flat] + 0.3 * cv.mid[flat]
                     - (1 - cloudiness)) * 3, 0, 1) * 0.8
    rgb += (0.95 - rgb) * cloud
  for plane, values in zip(cv.rgb, rgb):
    plane[flat] = values


# ----------------------------------------------------------------------------
# Scenery: buildings, vegetation, street furniture.
#
# Each `_plan_*` function returns draw jobs `(depth, draw(cv))`; the scene
# sorts them near to far so that hidden surfaces are mostly never shaded.
# ----------------------------------------------------------------------------


def _plan_building_row(cam: _Camera, street: _Street, rng: _Random,
                       side: int) -> list:
  """Buildings along one side of the street (side -1 left, +1 right)."""
  edge = street.walk_left if side < 0 else street.walk_right
  shade = rng.uniform(0.7, 1.0)
  jobs = []
  z = rng.uniform(0.0, 12.0)
  previous = None                   # (lateral, top) of the building just before
  while z < street.end and len(jobs) < 16:
    if rng.random() < 0.15:         # an alley, a gap between buildings
      z += rng.uniform(3.0, 10.0)
      previous = None
      continue
    length = rng.uniform(8.0, 30.0) * (1 + z / 30)
    lateral = edge + side * (rng.uniform(0.0, 3.0) if rng.random() < 0.4
                             else 0.0)
    top = rng.uniform(6.0, 28.0)
    shader = _Lazy(_facade_shader, rng, top, shade)
    jobs.append(_side_job(cam, lateral, z, min(z + length, street.end + 10),
                          0.0, top, shader, BUILDING))
    # The end wall facing the camera, in the shadow, unless the building
    # just before, as tall and not set back further, hides it.
    hidden = (previous is not None and previous[1] >= top
              and abs(previous[0]) <= abs(lateral))
    if not hidden:
      far = lateral + side * 15.0
      jobs.append(_frontal_job(cam, min(lateral, far), max(lateral, far), z,
                               0.0, top, shader, BUILDING, shade=0.7))
    previous = (lateral, top)
    z += length
  return jobs


def _side_job(cam: _Camera, lateral: float, z0: float, z1: float, v0: float,
              v1: float, shader: Shader, label: int) -> tuple:
  """A draw job for `_side(...)` painted with `shader`."""
  def draw(cv: _Canvas):
    surf = _side(cam, lateral, z0, z1, v0, v1)
    if surf is not None:
      cv.paint(surf, shader, label)
  return z0, draw


def _frontal_job(cam: _Camera, x0: float, x1: float, depth: float,
                 v0: float, v1: float, shader: Shader, label: int,
                 shade: float = 1.0, **kwargs) -> tuple:
  """A draw job for `_frontal(...)` painted with `shader`."""
  def draw(cv: _Canvas):
    surf = _frontal(cam, x0, x1, max(depth, NEAR_DEPTH_M), v0, v1, **kwargs)
    if surf is not None:
      cv.paint(surf, shader, label, shade=shade)
  return depth, draw


def _plan_park(cam: _Camera, street: _Street, rng: _Random,
               side: int) -> list:
  """A hedge, fence or wall along the side instead of buildings, and trees."""
  edge = street.walk_left if side < 0 else street.walk_right
  z0 = rng.uniform(0.0, 20.0)
  z1 = street.end + 10
  kind = rng.choice(["hedge", "fence", "wall"])
  top = rng.uniform(0.8, 2.0)
  if kind == "hedge":
    shader, label = _foliage_shader(rng), VEGETATION
  elif kind == "fence":
    shader, label = _fence_shader(rng, top), FENCE
  else:
    colour = _pick(rng, _BUILDING_COLOURS, 0.05) * 0.85
    shader, label = _solid_shader(colour, 0.15), WALL
  jobs = [_side_job(cam, edge, z0, z1, 0.0, top, shader, label)]
  for _ in range(rng.integers(2, 7)):   # a row of trees behind
    jobs += _plan_tree(cam, rng, edge + side * rng.uniform(1.0, 8.0),
                       rng.uniform(5.0, street.end))
  return jobs


def _plan_background(cam: _Camera, street: _Street, rng: _Random) -> list:
  """What closes the street: a row of buildings, a tree line, or nothing."""
  kind = rng.choice(["buildings", "trees", "open"], p=[0.55, 0.3, 0.15])
  depth = street.end
  left = (0 - cam.cx) * depth / cam.focal - 5.0
  right = (cam.width - cam.cx) * depth / cam.focal + 5.0
  jobs = []
  if kind == "buildings":
    x = left
    while x < right:
      w = rng.uniform(8.0, 30.0)
      top = rng.uniform(8.0, 35.0)
      d = depth + rng.uniform(0.0, 20.0)
      shader = _Lazy(_facade_shader, rng, top, rng.uniform(0.75, 1.0))
      jobs.append(_frontal_job(cam, x, x + w, d, 0.0, top, shader, BUILDING))
      x += w
  elif kind == "trees":
    top = rng.uniform(6.0, 16.0)
    foliage = _foliage_shader(rng, 0.8)

    def ragged(p: _Pixels):
      rgb, _ = foliage(p)
      return rgb, p.v < top * (0.6 + 0.5 * p.lo)

    jobs.append(_frontal_job(cam, left, right, depth, 0.0, top * 1.1, ragged,
                             VEGETATION))
  return jobs


def _plan_tree(cam: _Camera, rng: _Random, lateral: float,
               depth: float) -> list:
  trunk_h = rng.uniform(1.8, 3.5)
  rx, ry = rng.uniform(1.2, 2.8), rng.uniform(1.4, 3.2)
  centre = trunk_h + 0.7 * ry
  if depth < cam.min_object_depth():
    return []
  shader = _Lazy(_tree_shader, rng, rx, ry, centre)
  return [_frontal_job(cam, lateral - 1.3 * rx, lateral + 1.3 * rx, depth,
                       0.0, centre + 1.3 * ry, shader, VEGETATION,
                       centre=lateral, min_px=True)]


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


def _plan_pole(cam: _Camera, rng: _Random, lateral: float, depth: float,
               side: int) -> list:
  """A pole topped by a traffic sign or a traffic light, or a lamp post."""
  height = rng.uniform(3.0, 7.0)
  grey = rng.uniform(0.25, 0.6)
  colour = np.array([grey, grey, grey * 1.03], np.float32)
  kind = rng.choice(["sign", "light", "none"], p=[0.45, 0.35, 0.2])
  if depth < cam.min_object_depth():
    return []
  jobs = [_frontal_job(cam, lateral - 0.07, lateral + 0.07, depth, 0.0,
                       height, _solid_shader(colour, 0.08), POLE,
                       min_px=True)]
  front = depth - 0.05
  if kind == "sign":
    r = rng.uniform(0.3, 0.45)
    vc = height - r
    rect = rng.random() < 0.5
    ring = _pick(rng, np.array([(0.75, 0.1, 0.1), (0.1, 0.3, 0.7),
                                (0.9, 0.75, 0.1)], np.float32), 0.05)
    inner = (np.full(3, 0.93, np.float32) if rng.random() < 0.6
             else ring * 0.6 + 0.35)

    def sign(p: _Pixels):
      du, dv = np.abs(p.u) * (1 / r), np.abs(p.v - vc) * (1 / r)
      dist = np.maximum(du, dv) if rect else np.sqrt(du * du + dv * dv)
      return np.where(dist > 0.72, ring[:, None], inner[:, None]), dist < 1.0

    jobs.append(_frontal_job(cam, lateral - r, lateral + r, front, vc - r,
                             vc + r, sign, TRAFFIC_SIGN, centre=lateral,
                             min_px=True))
  elif kind == "light":
    hw, hh = 0.17, 0.5
    vc = height - hh
    lit = rng.integers(0, 3)
    lamps = np.array([(1.0, 0.15, 0.1), (1.0, 0.7, 0.1), (0.2, 1.0, 0.4)],
                     np.float32)

    def light(p: _Pixels):
      rgb = np.full((3, p.n), 0.08, np.float32)
      for k in range(3):
        dv = p.v - (vc + (1 - k) * 0.32)
        on = p.u * p.u + dv * dv < 0.11 ** 2
        rgb[:, on] = (lamps[k] * (1.0 if k == lit else 0.25))[:, None]
      return rgb, None

    x = lateral - side * 0.25    # hangs towards the road
    jobs.append(_frontal_job(cam, x - hw, x + hw, front, vc - hh, vc + hh,
                             light, TRAFFIC_LIGHT, centre=x, min_px=True))
  return jobs


def _plan_clutter(cam: _Camera, rng: _Random, lateral: float,
                  depth: float) -> list:
  """A bin or box on the sidewalk, labelled IGNORE_INDEX (no class)."""
  if depth < cam.min_object_depth():
    return []
  half_w, height = rng.uniform(0.25, 0.6), rng.uniform(0.5, 1.3)
  colour = _pick(rng, np.array([(0.15, 0.3, 0.2), (0.3, 0.3, 0.32),
                                (0.55, 0.4, 0.25), (0.2, 0.25, 0.45)],
                               np.float32), 0.05)
  return [_frontal_job(cam, lateral - half_w, lateral + half_w, depth, 0.0,
                       height, _solid_shader(colour, 0.12), IGNORE_INDEX,
                       min_px=True)]


# ----------------------------------------------------------------------------
# Instances: cars and pedestrians.
# ----------------------------------------------------------------------------


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


@dataclasses.dataclass
class _Instance:
  """A car or pedestrian: a billboard with a COCO label."""
  depth: float
  lateral: float
  half_w: float
  height: float
  label: int          # Cityscapes train id
  coco_label: int
  shader: Shader

  def surface(self, cam: _Camera) -> _Surface | None:
    return _frontal(cam, self.lateral - self.half_w,
                    self.lateral + self.half_w, self.depth, 0.0,
                    self.height, centre=self.lateral)


def _object_depth(rng: _Random, zmin: float, zmax: float) -> float:
  """Between zmin and zmax, log-uniform but with fewer very near ones."""
  return zmin * (zmax / zmin) ** (rng.random() ** 0.7)


def _car(rng: _Random, street: _Street, zmin: float,
         zmax: float) -> _Instance:
  half_w = rng.uniform(0.8, 1.0)
  height = (rng.uniform(1.35, 1.9) if rng.random() < 0.8
            else rng.uniform(1.9, 2.4))
  lanes = street.lanes() + [street.road_left + 1.3, street.road_right - 1.3]
  lateral = lanes[rng.integers(0, len(lanes))] + rng.uniform(-0.4, 0.4)
  depth = _object_depth(rng, zmin, zmax)
  oncoming = lateral < 0.5 * (street.road_left + street.road_right) - 1.0
  front = oncoming and rng.random() < 0.7
  return _Instance(depth, lateral, half_w, height, CAR, COCO_CAR,
                   _Lazy(_car_shader, rng, half_w, height, front))


def _person(rng: _Random, street: _Street, zmin: float,
            zmax: float) -> _Instance:
  height = rng.uniform(1.5, 1.95)
  if rng.random() < 0.8:       # on a sidewalk
    if rng.random() < 0.5:
      lateral = rng.uniform(street.walk_left + 0.4, street.road_left - 0.4)
    else:
      lateral = rng.uniform(street.road_right + 0.4, street.walk_right - 0.4)
  else:                        # crossing the road
    lateral = rng.uniform(street.road_left, street.road_right)
  depth = _object_depth(rng, zmin, zmax)
  if street.crossing and rng.random() < 0.5:
    depth = max(zmin, rng.uniform(*street.crossing))
    lateral = rng.uniform(street.road_left, street.road_right)
  torso_hw = rng.uniform(0.15, 0.21)
  arm_w = rng.uniform(0.06, 0.09)
  stride = rng.uniform(0.0, 0.16)
  half_w = max(torso_hw + arm_w, 0.055 + stride + 0.065) + 0.02
  return _Instance(depth, lateral, half_w, height, PERSON, COCO_PERSON,
                   _Lazy(_person_shader, rng, height, torso_hw, arm_w,
                         stride))


def _place_instances(rng: _Random, cam: _Camera, street: _Street) -> list:
  """Random cars and pedestrians that do not intersect each other."""
  zmin = cam.min_object_depth()
  zmax = max(zmin * 1.5, min(street.end - 3.0, 80.0))
  placed: list[_Instance] = []
  for make, count in ((_car, rng.integers(0, 9)),
                      (_person, rng.integers(0, 10))):
    for _ in range(count):
      for _attempt in range(4):
        cand = make(rng, street, zmin, zmax)
        if all(abs(cand.depth - o.depth) > 5.0
               or abs(cand.lateral - o.lateral) > 2.0 for o in placed):
          placed.append(cand)
          break
  return placed[:MAX_BOXES]


def _car_shadow(cv: _Canvas, surf: _Surface, obj: _Instance, inst: int):
  """Darkens what is seen under a car, between its tyres."""
  disp = cv.view("disp")[surf.ys, surf.xs]
  under = ((surf.v < 0.3) & (np.abs(surf.u) < obj.half_w - 0.1)
           & (disp < surf.disp) & (cv.view("inst")[surf.ys, surf.xs] != inst))
  cv.view("rgb")[:, surf.ys, surf.xs][:, under] *= 0.35


# ----------------------------------------------------------------------------
# Finishing: lighting, sensor noise, boxes.
# ----------------------------------------------------------------------------


def _finish_image(cv: _Canvas, rng: _Random) -> np.ndarray:
  """Global exposure, colour cast and contrast, sensor noise, to uint8."""
  gain = rng.uniform(0.65, 1.25) * rng.uniform(0.9, 1.1, 3)
  contrast = rng.uniform(0.85, 1.15)
  img = cv.rgb
  img *= (255 * gain * contrast).astype(np.float32)[:, None]
  img += (255 * gain * 0.5 * (1 - contrast) + 0.5).astype(np.float32)[:, None]
  noise = cv.scratch         # luminance noise, uniform
  rng.rng.random(dtype=np.float32, out=noise)
  amplitude = rng.uniform(2.0, 12.0)
  noise *= amplitude
  noise -= 0.5 * amplitude
  img += noise
  np.clip(img, 0.0, 255.0, out=img)
  image = np.empty((cv.height, cv.width, 3), np.uint8)
  for c, plane in enumerate(cv.view("rgb")):
    image[..., c] = plane     # truncates: +0.5 above rounds
  return image


def _boxes(cv: _Canvas, drawn: list) -> tuple:
  """Visible extent of each instance (xyxy px), padded to MAX_BOXES."""
  boxes = np.zeros((MAX_BOXES, 4), np.float32)
  labels = np.zeros((MAX_BOXES,), np.int32)
  inst_map = cv.view("inst")
  n = 0
  for inst, coco_label, surf in drawn:
    own = inst_map[surf.ys, surf.xs] == inst
    count = int(own.sum())
    if count < MIN_BOX_PIXELS:
      continue
    rows = np.flatnonzero(own.any(axis=1))
    cols = np.flatnonzero(own.any(axis=0))
    y0, y1 = surf.ys.start + rows[0], surf.ys.start + rows[-1] + 1
    x0, x1 = surf.xs.start + cols[0], surf.xs.start + cols[-1] + 1
    if count < MIN_BOX_FILL * (y1 - y0) * (x1 - x0):
      continue
    boxes[n] = (x0, y0, x1, y1)
    labels[n] = coco_label
    n += 1
  return boxes, labels, np.int32(n)


def render_scene(rng: np.random.Generator, height: int, width: int) -> dict:
  """Renders one random street scene; see the module docstring."""
  rng = _Random(rng)
  cam = _random_camera(rng, height, width)
  street = _random_street(rng)
  cv = _Canvas(rng, height, width)

  jobs = _plan_background(cam, street, rng)
  for side in (-1, 1):
    if rng.random() < 0.8:
      jobs += _plan_building_row(cam, street, rng, side)
    else:
      jobs += _plan_park(cam, street, rng, side)
  for _ in range(rng.integers(0, 7)):       # street trees on the sidewalks
    side = -1 if rng.random() < 0.5 else 1
    edge = street.walk_left if side < 0 else street.walk_right
    jobs += _plan_tree(cam, rng, edge - side * rng.uniform(0.5, 1.2),
                       rng.uniform(4.0, street.end))
  for _ in range(rng.integers(0, 6)):       # poles by the curb
    side = -1 if rng.random() < 0.5 else 1
    curb = street.road_left if side < 0 else street.road_right
    jobs += _plan_pole(cam, rng, curb + side * rng.uniform(0.3, 0.7),
                       rng.uniform(4.0, min(street.end, 60.0)), side)
  for _ in range(rng.integers(0, 3)):       # bins, boxes: unlabeled clutter
    side = -1 if rng.random() < 0.5 else 1
    walk = ((street.walk_left, street.road_left) if side < 0
            else (street.road_right, street.walk_right))
    jobs += _plan_clutter(cam, rng, rng.uniform(*walk),
                          rng.uniform(4.0, min(street.end, 40.0)))

  instances = _place_instances(rng, cam, street)
  instances.sort(key=lambda o: o.depth)     # near to far
  drawn = []
  for k, obj in enumerate(instances, start=1):
    surf = obj.surface(cam)
    if surf is not None and cv.paint(surf, obj.shader, obj.label, k):
      drawn.append((k, obj, surf))
  jobs.sort(key=lambda job: job[0])
  for _, draw in jobs:
    draw(cv)
  _draw_ground(cv, cam, street, rng)
  _draw_sky(cv, cam, rng)
  for k, obj, surf in drawn:
    if obj.label == CAR:
      _car_shadow(cv, surf, obj, k)

  image = _finish_image(cv, rng)
  boxes, box_labels, num_boxes = _boxes(
      cv, [(k, obj.coco_label, surf) for k, obj, surf in drawn])
  disparity = cv.view("disp").copy()
  segmentation = cv.view("seg").copy()
  return {
      "image": image,
      "disparity": disparity,
      "disparity_valid": segmentation != SKY,
      "segmentation": segmentation,
      "boxes": boxes,
      "box_labels": box_labels,
      "num_boxes": num_boxes,
  }


# ----------------------------------------------------------------------------
# The dataset.
# ----------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


class SyntheticScenes:
  """Indexable dataset of procedural street scenes, deterministic per index.

  Sample `i` of split `split` is rendered from
  `np.random.default_rng([seed, split_id, i])`, so the splits never share a
  scene. `len()` is VALIDATION_SIZE for "validation" and TRAIN_SIZE (in effect
  unbounded) for "train".
  """

  def __init__(self, split: str = "train", height: int = 128,
               width: int = 256, seed: int = 0):
    if split not in _SPLIT_IDS:
      raise UserError(f"unknown split {split!r}; expected one of "
                      f"{', '.join(_SPLIT_IDS)}")
    self.split = split
    self.height = _check_int("height", height, _MIN_SIZE)
    self.width = _check_int("width", width, _MIN_SIZE)
    self.seed = _check_int("seed", seed, 0)
    self._size = VALIDATION_SIZE if split == "validation" else TRAIN_SIZE

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, i: int) -> dict:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
      raise UserError(f"index must be an integer, got {i!r}")
    if i < 0:
      raise UserError(f"index must be >= 0, got {i}")
    if i >= self._size:
      raise IndexError(f"index {i} out of range for the {self.split} split "
                       f"of {self._size} scenes")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])
    return render_scene(rng, self.height, self.width)

  def batch(self, indices: Sequence[int]) -> dict:
    """Samples `indices` stacked along a leading batch axis."""
    samples = [self[i] for i in indices]
    if not samples:
      raise UserError("batch needs at least one index")
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
