"""Instances: the cars and pedestrians of a scene, and their boxes.

`_place_instances` picks cars and pedestrians that do not intersect;
`_car_shadow` darkens the ground under a car; `_boxes` measures each
drawn instance's visible extent, the scene's `boxes` (at most MAX_BOXES).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tcr_jax.data.labels import CAR, COCO_CAR, COCO_PERSON, PERSON
from tcr_jax.data.synthetic.camera import _Camera, _Random
from tcr_jax.data.synthetic.canvas import Shader, _Canvas, _Surface, _frontal
from tcr_jax.data.synthetic.shaders import _Lazy, _car_shader, _person_shader
from tcr_jax.data.synthetic.street import _Street

MAX_BOXES = 32
MIN_BOX_PIXELS = 16
# An instance whose visible pixels fill less of its box than this is left
# out of `boxes` (its pixels keep their class in `segmentation`).
MIN_BOX_FILL = 0.3


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
