"""The canvas, the surfaces painted on it and the depth test.

  * `_value_noise` / `_fine_noise`: the smooth noise fields shaders read;
  * `_Surface`: where a surface projects (a pixel rectangle) and its
    per-pixel disparity and texture coordinates; `_frontal` (facing the
    camera) and `_side` (parallel to the street) build them;
  * `_Pixels`: a surface's pixels that passed the depth test, as handed to
    a `Shader`;
  * `_Canvas`: the colour, disparity (the z-buffer), class and instance
    buffers of one scene, reused per thread, and `paint`.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from typing import Callable

import numpy as np

from tcr_jax.data.labels import SKY
from tcr_jax.data.synthetic.camera import NEAR_DEPTH_M, _Camera, _Random


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
