"""The street layout and the two surfaces drawn last: the ground and the sky.

`_Street` holds the lanes, sidewalks, how far the view reaches and maybe a
zebra crossing; `_GroundShader` paints road, markings, sidewalks and the
strips beyond on the ground plane; `_draw_sky` fills what nothing covers.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from tcr_jax.data.labels import ROAD, SIDEWALK, SKY, TERRAIN
from tcr_jax.data.synthetic.camera import BASELINE_M, _Camera, _Random
from tcr_jax.data.synthetic.canvas import _Canvas, _Pixels, _Surface
from tcr_jax.data.synthetic.shaders import (
    _PAVING_COLOURS, _fade, _frac, _mix, _pick)


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
