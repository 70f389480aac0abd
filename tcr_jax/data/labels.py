"""Label vocabularies shared by the datasets, the renderer and the previews.

  * Cityscapes' 19 evaluated classes: their train ids (0..18, as constants
    and as `TRAIN_ID_NAMES` in train-id order), the official colour palette,
    the labelId -> trainId table of cityscapesScripts' labels.py, and
    `IGNORE_INDEX` (255) for every pixel of no evaluated class;
  * the COCO category ids of the boxes the synthetic scenes carry (person,
    car).

Numpy only: cheap to import from anywhere, TensorFlow-free.
"""
from __future__ import annotations

import numpy as np

TRAIN_ID_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle")

# Cityscapes train ids, in the order of TRAIN_ID_NAMES.
(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, TRAFFIC_LIGHT, TRAFFIC_SIGN,
 VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE,
 BICYCLE) = range(len(TRAIN_ID_NAMES))

# (19, 3) uint8: the colour of each train id.
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100),
    (0, 0, 230), (119, 11, 32)], dtype=np.uint8)

# The label of pixels of no evaluated class.
IGNORE_INDEX = 255

# cityscapesScripts labels.py: labelId -> trainId for the 19 evaluated
# classes; every other labelId (incl. unlabeled 0 .. static 4, ground 6,
# parking 9, rail track 10, guard rail 14, bridge 15, tunnel 16,
# polegroup 18, caravan 29, trailer 30) is ignored (IGNORE_INDEX).
LABEL_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7,
                     21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
                     28: 15, 31: 16, 32: 17, 33: 18}

# Cityscapes' "things" (objects: people and vehicles), as train ids. The
# depth metrics on their pixels ask whether a depth model sees objects, or
# only the street's layout that the per-pixel mean disparity map already has.
OBJECT_TRAIN_IDS = (PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE)


def object_mask(labels) -> np.ndarray:
  """Pixels whose train id is a thing (OBJECT_TRAIN_IDS); works on numpy
  and jax arrays alike."""
  return (labels >= PERSON) & (labels <= BICYCLE)


# COCO category ids of the synthetic scenes' boxes.
COCO_PERSON = 1
COCO_CAR = 3
