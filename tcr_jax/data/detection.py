"""Detection batches: images resized as torchvision's detector does and
padded to a fixed canvas, with their boxes.

A detection batch (host numpy, what the detection base's steps read):

  image       (B, H, W, 3) float32 in [0, 1], the resized image at the
              top left of the canvas, zeros elsewhere
  image_size  (B, 2) int32, the resized (unpadded) (h, w) on the canvas
  orig_size   (B, 2) int32, the (h, w) of the image before resizing
  boxes       (B, G, 4) float32, x1 y1 x2 y2 in canvas pixels
  labels      (B, G) int32, COCO category ids (1..90)
  box_mask    (B, G) bool, the boxes the detector trains on: not crowd, not
              degenerate (zero width or height after clipping to the image)
  crowd       (B, G) bool, COCO's iscrowd boxes (never in box_mask)
  image_id    (B,) int64

Resizing follows torchvision's GeneralizedRCNNTransform: scale =
min(min_size / short side, max_size / long side), output floor(side *
scale), bilinear; boxes are scaled by the per-axis ratio of the sizes.
Canvases: COCO images go to a landscape canvas (ceil32(min_size),
ceil32(max_size)) when h <= w and to its transpose otherwise (the
dataset's `groups`, one compiled step per canvas); the synthetic scenes are
rendered at the canvas size and need no resizing.
"""
from __future__ import annotations

import math

import numpy as np

from tcr_jax.errors import UserError

KEYS = ("image", "image_size", "orig_size", "boxes", "labels", "box_mask",
        "crowd", "image_id")


def resized_size(height: int, width: int, min_size: int, max_size: int
                 ) -> tuple[int, int]:
  """torchvision's detection resize: (floor(h * s), floor(w * s)) with
  s = min(min_size / min(h, w), max_size / max(h, w))."""
  scale = min(min_size / min(height, width), max_size / max(height, width))
  return int(math.floor(height * scale)), int(math.floor(width * scale))


def _ceil32(n: int) -> int:
  return -(-n // 32) * 32


def canvases(min_size: int, max_size: int) -> tuple[tuple[int, int], ...]:
  """(landscape, portrait) canvases holding every resized image."""
  land = (_ceil32(min_size), _ceil32(max_size))
  return land, land[::-1]


def orientation(height, width) -> np.ndarray:
  """The canvas group of images: 0 landscape or square, 1 portrait."""
  return (np.asarray(height) > np.asarray(width)).astype(np.int64)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == tuple(size):
    return image
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize(
      (size[1], size[0]), Image.Resampling.BILINEAR))


def letterbox(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray,
              crowd: np.ndarray, canvas: tuple[int, int], max_boxes: int,
              min_size: int | None = None, max_size: int | None = None,
              image_id: int = 0) -> dict[str, np.ndarray]:
  """One example in the batch layout (no batch axis).

  image (h, w, 3) uint8; boxes (n, 4) x1 y1 x2 y2 in its pixels. Without
  min_size / max_size the image is not resized. Boxes beyond max_boxes are
  dropped (non-crowd boxes first).
  """
  h0, w0 = image.shape[:2]
  size = (h0, w0) if min_size is None else resized_size(h0, w0, min_size,
                                                        max_size)
  if size[0] > canvas[0] or size[1] > canvas[1]:
    raise UserError(f"a {h0}x{w0} image resized to {size[0]}x{size[1]} does "
                    f"not fit the {canvas[0]}x{canvas[1]} canvas")
  out_image = np.zeros(canvas + (3,), np.float32)
  out_image[:size[0], :size[1]] = _resize(image, size).astype(np.float32) / 255.0
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  ratio = np.array([size[1] / w0, size[0] / h0] * 2, np.float32)
  boxes = np.clip(boxes * ratio, 0, np.array([size[1], size[0]] * 2, np.float32))
  crowd = np.asarray(crowd, bool).reshape(-1)
  labels = np.asarray(labels, np.int32).reshape(-1)
  order = np.argsort(crowd, kind="stable")[:max_boxes]
  n = len(order)
  out = {"boxes": np.zeros((max_boxes, 4), np.float32),
         "labels": np.zeros((max_boxes,), np.int32),
         "crowd": np.zeros((max_boxes,), bool)}
  out["boxes"][:n], out["labels"][:n] = boxes[order], labels[order]
  out["crowd"][:n] = crowd[order]
  b = out["boxes"]
  valid = np.arange(max_boxes) < n
  out["box_mask"] = (valid & ~out["crowd"] & (b[:, 2] > b[:, 0])
                     & (b[:, 3] > b[:, 1]))
  out.update(image=out_image, image_size=np.array(size, np.int32),
             orig_size=np.array((h0, w0), np.int32),
             image_id=np.int64(image_id))
  return out


def stack(examples: list[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in KEYS}


def flip_batch(batch: dict, flips: np.ndarray) -> dict:
  """Horizontal flips of the rows `flips`, within each image's own width
  (the canvas padding stays at the right), boxes mirrored with them."""
  out = dict(batch)
  image, boxes = batch["image"].copy(), batch["boxes"].copy()
  for i in np.flatnonzero(flips):
    h, w = (int(v) for v in batch["image_size"][i])
    image[i, :h, :w] = image[i, :h, :w][:, ::-1]
    x1 = boxes[i, :, 0].copy()
    boxes[i, :, 0] = np.where(batch["box_mask"][i] | batch["crowd"][i],
                              w - boxes[i, :, 2], boxes[i, :, 0])
    boxes[i, :, 2] = np.where(batch["box_mask"][i] | batch["crowd"][i],
                              w - x1, boxes[i, :, 2])
  out["image"], out["boxes"] = image, boxes
  return out


class SyntheticDetection:
  """The embedded street scenes in the detection layout: rendered at the
  canvas size (no resizing), their car and person boxes (COCO ids)."""

  def __init__(self, scenes, max_boxes: int):
    self.scenes = scenes
    self.max_boxes = max_boxes
    self.canvas = (scenes.height, scenes.width)
    if scenes.height % 32 or scenes.width % 32:
      raise UserError(f"detection needs a canvas of multiples of 32, not "
                      f"{scenes.height}x{scenes.width} (config.data.height/width)")

  def __len__(self) -> int:
    return len(self.scenes)

  def batch(self, indices) -> dict[str, np.ndarray]:
    examples = []
    for i in indices:
      s = self.scenes[int(i)]
      n = int(s["num_boxes"])
      examples.append(letterbox(s["image"], s["boxes"][:n], s["box_labels"][:n],
                                np.zeros(n, bool), self.canvas, self.max_boxes,
                                image_id=int(i)))
    return stack(examples)


def random_batch(batch: int, height: int, width: int, num_boxes: int = 8,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, boxes x1 y1 x2 y2, COCO labels) of random content: the
  benchmarks' detection batches (python -m tcr_jax.bench)."""
  rng = np.random.RandomState(seed)
  images = rng.rand(batch, height, width, 3).astype(np.float32)
  xy = rng.uniform(0, 0.7, (batch, num_boxes, 2)) * [width, height]
  wh = rng.uniform(0.05, 0.3, (batch, num_boxes, 2)) * [width, height]
  boxes = np.concatenate([xy, np.minimum(xy + wh, [width, height])], -1)
  labels = rng.randint(1, 91, (batch, num_boxes))
  return images, boxes.astype(np.float32), labels.astype(np.int32)
