"""Datasets: the embedded synthetic scenes and Cityscapes through tfds.

`scene_dataset(config, split)` returns an indexable dataset whose
`batch(indices)` gives host numpy batches in the scene layout (the depth
base task's, tcr_jax/bases/depth.py):

  image      (B, H, W, 3) float32 in [0, 1]
  disparity  (B, H, W) float32, pixels
  valid      (B, H, W) bool, pixels with ground-truth disparity
  labels     (B, H, W) int32, train ids, ignore mapped to config.task.ignore_index

`detection_dataset(config, split)` gives batches in the detection layout
of tcr_jax.data.detection (synthetic scenes or COCO 2017, tcr_jax.data.coco).
Each base task's `dataset(split)` picks one (tcr_jax/bases/).
"""
from __future__ import annotations

import numpy as np

from tcr_jax.data.coco import CocoDetection
from tcr_jax.data.detection import SyntheticDetection
from tcr_jax.data.pipeline import TfdsBatches
from tcr_jax.data.synthetic import SyntheticScenes
from tcr_jax.errors import UserError


class SceneBatches:
  """Adapts SyntheticScenes samples to the training layout."""

  def __init__(self, scenes, ignore_index: int):
    self.scenes = scenes
    self.ignore_index = ignore_index

  def __len__(self) -> int:
    return len(self.scenes)

  def batch(self, indices) -> dict[str, np.ndarray]:
    raw = self.scenes.batch(list(indices))
    labels = raw["segmentation"].astype(np.int32)
    labels[labels == 255] = self.ignore_index
    return {"image": raw["image"].astype(np.float32) / 255.0,
            "disparity": raw["disparity"].astype(np.float32),
            "valid": raw["disparity_valid"].astype(bool),
            "labels": labels}


def scene_dataset(config, split: str):
  """The dataset named by config.data.name for split "train" / "validation"
  (/ "test"), in the scene layout."""
  name = config.data.name
  if name == "synthetic":
    scenes = SyntheticScenes(split, config.data.height, config.data.width,
                             config.seed)
    return SceneBatches(scenes, config.task.ignore_index)
  if name == "cityscapes":
    return TfdsBatches(config, split)
  raise UserError(f"unknown dataset {name!r}; expected 'synthetic' or 'cityscapes'")


def detection_dataset(config, split: str):
  """config.data.name's dataset in the detection layout."""
  name = config.data.name
  if name == "synthetic":
    scenes = SyntheticScenes(split, config.data.height, config.data.width,
                             config.seed)
    return SyntheticDetection(scenes, config.data.max_boxes)
  if name == "coco":
    return CocoDetection(config, split)
  raise UserError(f"unknown detection dataset {name!r}; expected 'synthetic' "
                  "or 'coco'")
