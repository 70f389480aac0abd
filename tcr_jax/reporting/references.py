"""Trivial references: what a model must beat to have learned anything.

Computed from the training split and measured on the validation images:

  constant_disparity_rmse   predicting one number, the training split's mean
                            disparity over valid pixels
  mean_disparity_rmse       predicting the per-pixel mean disparity map of
                            the training split (disparity mostly follows the
                            row in street scenes: the strongest trivial prior)
  mean_disparity_rmse_objects  the same map on the valid pixels of people and
                            vehicles only (labels.OBJECT_TRAIN_IDS): a depth
                            model that sees objects beats it there by far
  mean_image_psnr           PSNR of the training split's mean image

All in the units results.json uses (disparity pixels; dB on [0, 1] images,
per image, then averaged).
"""
from __future__ import annotations

import numpy as np

from tcr_jax.data import labels as label_ids


def _batches(dataset, count: int, batch: int):
  for start in range(0, count, batch):
    yield dataset.batch(range(start, min(start + batch, count)))


def trivial_references(train_data, val_data, train_images: int,
                       val_images: int, batch: int = 32) -> dict[str, float]:
  n_train = min(train_images, len(train_data))
  n_val = min(val_images, len(val_data))
  disp_sum = disp_count = image_sum = None
  for b in _batches(train_data, n_train, batch):
    d = np.where(b["valid"], b["disparity"], 0.0).astype(np.float64)
    disp_sum = d.sum(0) if disp_sum is None else disp_sum + d.sum(0)
    c = b["valid"].sum(0).astype(np.float64)
    disp_count = c if disp_count is None else disp_count + c
    im = b["image"].astype(np.float64).sum(0)
    image_sum = im if image_sum is None else image_sum + im
  constant = disp_sum.sum() / max(disp_count.sum(), 1.0)
  per_pixel = np.where(disp_count > 0, disp_sum / np.maximum(disp_count, 1), constant)
  mean_image = image_sum / n_train
  sq_const = sq_pixel = valid = sq_objects = objects = 0.0
  psnrs = []
  for b in _batches(val_data, n_val, batch):
    v = b["valid"]
    sq_const += float(np.sum(np.where(v, (b["disparity"] - constant) ** 2, 0)))
    sq_pixel += float(np.sum(np.where(v, (b["disparity"] - per_pixel) ** 2, 0)))
    valid += float(v.sum())
    o = v & label_ids.object_mask(b["labels"])
    sq_objects += float(np.sum(np.where(o, (b["disparity"] - per_pixel) ** 2, 0)))
    objects += float(o.sum())
    mse = np.mean((b["image"] - mean_image) ** 2, axis=(1, 2, 3))
    psnrs.extend(-10 * np.log10(np.maximum(mse, 1e-10)))
  return {"constant_disparity_rmse": float(np.sqrt(sq_const / max(valid, 1))),
          "mean_disparity_rmse": float(np.sqrt(sq_pixel / max(valid, 1))),
          "mean_disparity_rmse_objects": (float(np.sqrt(sq_objects / objects))
                                          if objects else None),
          "mean_image_psnr": float(np.mean(psnrs))}
