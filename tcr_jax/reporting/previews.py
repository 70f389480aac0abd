"""The previews of trained models: previews/alphaA_METHOD.png of a sweep.

Each row is one validation (or report-split) image: the input, the ground
truth and the base's prediction, the reconstruction read off the base, and
the enhancement's output; matplotlib without pyplot, so no backend is
switched.
"""
from __future__ import annotations

import os

import numpy as np

from tcr_jax.data.labels import CITYSCAPES_PALETTE


def save_preview(path: str, base_out: dict, enh_out: dict, task: str) -> None:
  """Rows of: input, ground-truth disparity, predicted disparity (same colour
  scale), reconstruction read off the base, enhancement (the depth task's
  previews; the detection task's: save_detection_preview)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(path), exist_ok=True)
  n = len(base_out["image"])
  fig, axes = plt.subplots(n, 5, figsize=(15, 1.9 * n + 0.4), squeeze=False)
  titles = ("input", "disparity (ground truth)", "disparity (base task)",
            "reconstruction from base",
            "enhancement" + (" (segmentation)" if task == "segmentation" else ""))
  for i in range(n):
    enh = enh_out.get("x_hat", enh_out.get("segmentation"))[i]
    if task == "segmentation":
      palette = np.zeros((256, 3), np.uint8)  # the ignore class: black
      palette[:len(CITYSCAPES_PALETTE)] = CITYSCAPES_PALETTE
      enh = palette[np.asarray(enh).astype(np.int64)]
    gt = np.where(base_out["valid"][i], base_out["gt_disparity"][i], np.nan)
    vmax = float(np.nanmax(gt)) if np.isfinite(gt).any() else None
    panels = (base_out["image"][i], gt, base_out["disparity"][i],
              np.clip(base_out["x_rec"][i], 0, 1),
              np.clip(enh, 0, 1) if task != "segmentation" else enh)
    for j, img in enumerate(panels):
      ax = axes[i, j]
      if j in (1, 2):
        ax.imshow(img, cmap="magma", vmin=0, vmax=vmax)
      else:
        ax.imshow(img)
      ax.axis("off")
      if i == 0:
        ax.set_title(titles[j], fontsize=8)
  _save(fig, path)


def _draw_boxes(ax, boxes, labels, colour, scores=None) -> None:
  from matplotlib import patches
  for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, np.float64)):
    ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                                   fill=False, edgecolor=colour, linewidth=0.8))
    text = str(int(labels[k])) + ("" if scores is None else f" {scores[k]:.2f}")
    ax.text(x0 - 0.5, y0 - 1, text, color=colour, fontsize=5, va="bottom")


def save_detection_preview(path: str, base_out: dict, enh_out: dict,
                           min_score: float = 0.5) -> None:
  """Rows of: the input with its ground-truth boxes (green) and the base's
  detections scoring >= min_score (red, COCO id and score), the
  reconstruction read off the base with the same boxes, the enhancement's
  reconstruction; each image cropped to its own size on the canvas."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(path), exist_ok=True)
  n = len(base_out["image"])
  fig, axes = plt.subplots(n, 3, figsize=(10, 2.2 * n + 0.4), squeeze=False)
  titles = ("input: ground truth (green), detections (red)",
            "reconstruction from base", "enhancement")
  for i in range(n):
    h, w = (int(v) for v in base_out["image_size"][i])
    gt = base_out["gt_box_mask"][i]
    found = base_out["det_scores"][i] >= min_score
    panels = (base_out["image"][i], base_out["x_rec"][i], enh_out["x_hat"][i])
    for j, img in enumerate(panels):
      ax = axes[i, j]
      ax.imshow(np.clip(np.asarray(img)[:h, :w], 0, 1))
      if j < 2:
        _draw_boxes(ax, base_out["gt_boxes"][i][gt], base_out["gt_labels"][i][gt],
                    "#40ff40")
        _draw_boxes(ax, base_out["det_boxes"][i][found],
                    base_out["det_labels"][i][found], "#ff4040",
                    base_out["det_scores"][i][found])
      ax.axis("off")
      if i == 0:
        ax.set_title(titles[j], fontsize=8)
  _save(fig, path)


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
