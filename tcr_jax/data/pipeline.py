"""Random access to the prepared tfds Cityscapes set (ArrayRecord).

`TfdsBatches(config, split)`: `batch(indices)` returns exactly those examples
in the training layout of tcr_jax.data; the trainer reads by global sample
index (tcr_jax.data.sampler), so a run resumed at step k sees exactly the
batches of an uninterrupted run, and augments on the host
(tcr_jax.data.augment).

Stored disparity is the raw 16-bit PNG (see tcr_jax.data.cityscapes); it is
converted here: (p - 1) / 256 px where p > 0. If config.data.height/width
differ from the stored size, images are resized bilinearly (PIL,
antialiased when shrinking), labels/disparity/valid by nearest neighbour,
and disparity is scaled by new_width / stored_width (it is in pixels).

TensorFlow is imported lazily (and told not to touch the GPUs) so that
importing this module stays cheap and TF-free.
"""
from __future__ import annotations

import numpy as np

from tcr_jax.data import cityscapes
from tcr_jax.errors import UserError


def hidden_gpu_tf():
  """tensorflow, with every GPU hidden from it (JAX owns the accelerators)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised: nothing more to do
    pass
  return tf


def open_source(data_dir: str, split: str):
  """The ArrayRecord data source of a prepared split, or a UserError."""
  builder = cityscapes.make_builder(data_dir or None)
  if not builder.is_prepared():
    raise UserError(
        f"Cityscapes is not prepared under {builder.data_dir!r}; run "
        "`tcr-jax prepare-data --dataset cityscapes --manual-dir DIR "
        "--data-dir D` and set config.data.data_dir=D (or try the embedded "
        "data: --config=configs/<experiment>.py:synthetic)")
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # e.g. prepared as tfrecord
    raise UserError(f"cannot open Cityscapes {split!r} under "
                    f"{builder.data_dir!r} for random access ({e}); prepare "
                    "it again with `tcr-jax prepare-data` (array_record)") from e


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
  h, w = array.shape[:2]
  rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
  return array[rows[:, None], cols[None, :]]


def _bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  Image.Resampling.BILINEAR))


def decode_example(ex: dict, height: int, width: int) -> dict:
  """One stored example -> uint8 image, float32 disparity, bool valid,
  uint8 train ids (255 ignore), all at (height, width)."""
  image = np.asarray(ex["image"], np.uint8)
  labels = np.asarray(ex["segmentation"], np.uint8)[..., 0]
  raw = cityscapes.read_disparity_png(ex["disparity_png"])
  disparity, valid = cityscapes.decode_disparity(raw)
  h, w = image.shape[:2]
  if (h, w) != (height, width):
    image = _bilinear(image, height, width)
    labels = _nearest(labels, height, width)
    valid = _nearest(valid, height, width)
    disparity = _nearest(disparity, height, width) * np.float32(width / w)
  return {"image": image, "disparity": disparity, "valid": valid,
          "labels": labels}


class TfdsBatches:
  """Random-access batches of a prepared split in the training layout."""

  def __init__(self, config, split: str, source=None):
    self.height = int(config.data.height)
    self.width = int(config.data.width)
    self.ignore_index = int(config.task.ignore_index)
    self.source = source if source is not None else open_source(
        config.data.data_dir, split)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices) -> dict[str, np.ndarray]:
    """uint8 images and int32 labels (ignore_index applied) of `indices`."""
    exs = [decode_example(self.source[int(i)], self.height, self.width)
           for i in np.asarray(indices).reshape(-1)]
    if not exs:
      return self._empty()
    out = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    labels = out["labels"].astype(np.int32)
    labels[labels == cityscapes.IGNORE] = self.ignore_index
    out["labels"] = labels
    return out

  def batch(self, indices) -> dict[str, np.ndarray]:
    out = self.read(indices)
    out["image"] = out["image"].astype(np.float32) / np.float32(255.0)
    return out

  def _empty(self) -> dict[str, np.ndarray]:
    h, w = self.height, self.width
    return {"image": np.zeros((0, h, w, 3), np.uint8),
            "disparity": np.zeros((0, h, w), np.float32),
            "valid": np.zeros((0, h, w), bool),
            "labels": np.zeros((0, h, w), np.int32)}
