"""Training augmentation on host numpy batches: flips and colour jitter.

The authors' augmentation: horizontal flips and torchvision's
ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5). Each factor is
drawn uniformly from [1 - s, 1 + s] per image; the order is fixed
(brightness, contrast, saturation). Everything is a function of the rng
passed in, so a resumed run sees the same augmented batches.
"""
from __future__ import annotations

import numpy as np

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _grey(img: np.ndarray) -> np.ndarray:
  return (img @ _LUMA)[..., None]


def color_jitter(img: np.ndarray, strength: float,
                 rng: np.random.Generator) -> np.ndarray:
  """img (H, W, 3) float32 in [0, 1] -> jittered, clipped to [0, 1]."""
  if strength <= 0:
    return img
  b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
  img = np.clip(img * b, 0, 1)
  img = np.clip((img - _grey(img).mean()) * c + _grey(img).mean(), 0, 1)
  g = _grey(img)
  return np.clip((img - g) * s + g, 0, 1).astype(np.float32)


def augment_batch(batch: dict, rng: np.random.Generator, hflip: bool = True,
                  jitter: float = 0.5) -> dict:
  """Flips every per-pixel array of an image together; jitters the image."""
  out = dict(batch)
  n = batch["image"].shape[0]
  flips = rng.random(n) < 0.5 if hflip else np.zeros(n, bool)
  images = []
  for i in range(n):
    img = batch["image"][i]
    img = color_jitter(img, jitter, rng)
    images.append(img[:, ::-1] if flips[i] else img)
  out["image"] = np.stack(images).astype(np.float32)
  for key in ("disparity", "valid", "labels"):
    if key in batch:
      arr = batch[key].copy()
      arr[flips] = arr[flips][:, :, ::-1]
      out[key] = arr
  return out
