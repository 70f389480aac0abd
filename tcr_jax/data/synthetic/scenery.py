"""Scenery: buildings, parks, the background, trees, poles, clutter.

Each `_plan_*` function returns draw jobs `(depth, draw(cv))`; the scene
sorts them near to far so that hidden surfaces are mostly never shaded.
"""
from __future__ import annotations

import numpy as np

from tcr_jax.data.labels import (
    BUILDING, FENCE, IGNORE_INDEX, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
    VEGETATION, WALL)
from tcr_jax.data.synthetic.camera import NEAR_DEPTH_M, _Camera, _Random
from tcr_jax.data.synthetic.canvas import (
    Shader, _Canvas, _Pixels, _frontal, _side)
from tcr_jax.data.synthetic.shaders import (
    _BUILDING_COLOURS, _Lazy, _facade_shader, _fence_shader, _foliage_shader,
    _pick, _solid_shader, _tree_shader)
from tcr_jax.data.synthetic.street import _Street


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
