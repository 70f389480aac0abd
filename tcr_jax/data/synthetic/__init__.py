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

The modules, in the order a scene uses them:

  camera     the stereo rig, `max_disparity`, the random numbers, `_Camera`
  canvas     noise fields, surfaces, the z-buffered canvas and `paint`
  shaders    colours, textures and the shaders of buildings, trees, cars...
  street     the street layout, the ground and the sky
  scenery    buildings, parks, the background, trees, poles, clutter
  instances  cars and pedestrians, and their boxes
  scene      `render_scene`
  dataset    `SyntheticScenes`

The label vocabularies (train ids, names, palette, COCO ids) live in
`tcr_jax.data.labels`; they are re-exported here under their old names.
"""
from tcr_jax.data.labels import (
    BUILDING, CAR, CITYSCAPES_PALETTE, COCO_CAR, COCO_PERSON, FENCE,
    IGNORE_INDEX, PERSON, POLE, ROAD, SIDEWALK, SKY, TERRAIN, TRAFFIC_LIGHT,
    TRAFFIC_SIGN, TRAIN_ID_NAMES, VEGETATION, WALL)
from tcr_jax.data.synthetic.camera import (
    BASELINE_M, FOCAL_PER_WIDTH, NEAR_DEPTH_M, max_disparity)
from tcr_jax.data.synthetic.canvas import Shader
from tcr_jax.data.synthetic.dataset import (
    TRAIN_SIZE, VALIDATION_SIZE, SyntheticScenes)
from tcr_jax.data.synthetic.instances import (
    MAX_BOXES, MIN_BOX_FILL, MIN_BOX_PIXELS)
from tcr_jax.data.synthetic.scene import render_scene

__all__ = [
    # The dataset and the renderer.
    "SyntheticScenes", "render_scene", "max_disparity", "Shader",
    "VALIDATION_SIZE", "TRAIN_SIZE", "MAX_BOXES", "MIN_BOX_PIXELS",
    "MIN_BOX_FILL", "BASELINE_M", "FOCAL_PER_WIDTH", "NEAR_DEPTH_M",
    # From tcr_jax.data.labels.
    "TRAIN_ID_NAMES", "CITYSCAPES_PALETTE", "IGNORE_INDEX", "COCO_PERSON",
    "COCO_CAR", "ROAD", "SIDEWALK", "BUILDING", "WALL", "FENCE", "POLE",
    "TRAFFIC_LIGHT", "TRAFFIC_SIGN", "VEGETATION", "TERRAIN", "SKY", "PERSON",
    "CAR",
]
