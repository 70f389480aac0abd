"""`render_scene`: one street scene, from the random generator to the arrays.

It draws the camera, the street and the canvas's noise, plans the scenery,
places the instances, paints everything near to far, then the ground and
the sky, and finishes the image (exposure, sensor noise, uint8).
"""
from __future__ import annotations

import numpy as np

from tcr_jax.data.labels import CAR, SKY
from tcr_jax.data.synthetic.camera import _Random, _random_camera
from tcr_jax.data.synthetic.canvas import _Canvas
from tcr_jax.data.synthetic.instances import (
    _boxes, _car_shadow, _place_instances)
from tcr_jax.data.synthetic.scenery import (
    _plan_background, _plan_building_row, _plan_clutter, _plan_park,
    _plan_pole, _plan_tree)
from tcr_jax.data.synthetic.street import (
    _draw_ground, _draw_sky, _random_street)


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


def render_scene(rng: np.random.Generator, height: int, width: int) -> dict:
  """Renders one random street scene; see the package docstring."""
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
