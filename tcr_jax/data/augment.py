"""Training augmentation on host numpy batches: flips and colour jitter.

The authors' augmentation: horizontal flips and torchvision's
ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5). Each factor is
drawn uniformly from [1 - s, 1 + s] per image; the order is fixed
(brightness, contrast, saturation).

The random numbers are drawn for the whole global batch (`draw`) and each
process applies the rows of its own share (`augment_batch(rows=...)`), so a
sample's augmentation depends on (seed, step, position in the batch) and not
on how many processes share the batch.

Detection batches (tcr_jax.data.detection) flip each image within its own
width, with its boxes; the authors' detection training flips only.
"""
from __future__ import annotations

import numpy as np
from tcr_jax.data import detection

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _grey(img: np.ndarray) -> np.ndarray:
  return (img @ _LUMA)[..., None]


def draw(rng: np.random.Generator, n: int, hflip: bool, jitter: float
         ) -> tuple[np.ndarray, np.ndarray | None]:
  """Flip flags (n,) and jitter factors (n, 3) (None without jitter)."""
  flips = rng.random(n) < 0.5 if hflip else np.zeros(n, bool)
  factors = rng.uniform(1 - jitter, 1 + jitter, size=(n, 3)) if jitter > 0 else None
  return flips, factors


def color_jitter(img: np.ndarray, factors) -> np.ndarray:
  """img (H, W, 3) float32 in [0, 1], factors (brightness, contrast,
  saturation) -> jittered, clipped to [0, 1]."""
  b, c, s = factors
  img = np.clip(img * b, 0, 1)
  img = np.clip((img - _grey(img).mean()) * c + _grey(img).mean(), 0, 1)
  g = _grey(img)
  return np.clip((img - g) * s + g, 0, 1).astype(np.float32)


def augment_batch(batch: dict, rng: np.random.Generator, hflip: bool = True,
                  jitter: float = 0.5, rows: tuple[int, int] | None = None,
                  global_size: int | None = None) -> dict:
  """Flips every per-pixel array of an image together; jitters the image.

  `batch` holds rows [rows[0], rows[1]) of a global batch of `global_size`
  images (default: the whole batch).
  """
  out = dict(batch)
  n = batch["image"].shape[0]
  lo, hi = rows if rows is not None else (0, n)
  flips, factors = draw(rng, global_size or n, hflip, jitter)
  flips = flips[lo:hi]
  if "boxes" in batch:  # detection: boxes, and images smaller than the canvas
    return _augment_detection(batch, flips,
                              None if factors is None else factors[lo:hi])
  images = []
  for i in range(n):
    img = batch["image"][i]
    if factors is not None:
      img = color_jitter(img, factors[lo + i])
    images.append(img[:, ::-1] if flips[i] else img)
  out["image"] = np.stack(images).astype(np.float32)
  for key in ("disparity", "valid", "labels"):
    if key in batch:
      arr = batch[key].copy()
      arr[flips] = arr[flips][:, :, ::-1]
      out[key] = arr
  return out


def _augment_detection(batch: dict, flips: np.ndarray, factors) -> dict:
  """Jitter within each image's own size, then flips with the boxes
  (tcr_jax.data.detection.flip_batch)."""
  out = dict(batch)
  if factors is not None:
    images = batch["image"].copy()
    for i, (h, w) in enumerate(batch["image_size"]):
      images[i, :h, :w] = color_jitter(images[i, :h, :w], factors[i])
    out["image"] = images
  return detection.flip_batch(out, flips)
