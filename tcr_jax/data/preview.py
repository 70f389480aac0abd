"""Contact sheets of the synthetic street scenes (`tcr-jax preview-data`)."""
from __future__ import annotations

import numbers
import os

import numpy as np

from tcr_jax.data import synthetic
from tcr_jax.errors import UserError

MAX_NUM = 64
_BOX_NAMES = {synthetic.COCO_PERSON: "person", synthetic.COCO_CAR: "car"}
_BOX_COLOURS = {synthetic.COCO_PERSON: "#ff4040", synthetic.COCO_CAR: "#40c0ff"}


def colourize_segmentation(segmentation: np.ndarray) -> np.ndarray:
  """(H, W) train ids to (H, W, 3) uint8, Cityscapes palette; 255 black."""
  palette = np.zeros((256, 3), np.uint8)
  palette[:len(synthetic.CITYSCAPES_PALETTE)] = synthetic.CITYSCAPES_PALETTE
  return palette[segmentation]


def colourize_disparity(disparity: np.ndarray, valid: np.ndarray,
                        vmax: float) -> np.ndarray:
  """(H, W) disparity to (H, W, 3) uint8 with a colour map; invalid black."""
  from matplotlib import colormaps
  scaled = np.clip(disparity / max(vmax, 1e-6), 0.0, 1.0)
  rgb = colormaps["viridis"](scaled)[..., :3]
  rgb[~valid] = 0.0
  return (rgb * 255 + 0.5).astype(np.uint8)


def write_contact_sheet(output: str, split: str = "train", num: int = 8,
                        height: int = 128, width: int = 256,
                        seed: int = 0) -> None:
  """Writes a PNG: one row per sample with image, disparity, segmentation.

  Boxes (person/car) are drawn over the segmentation.
  """
  if (isinstance(num, bool) or not isinstance(num, numbers.Integral)
      or not 1 <= num <= MAX_NUM):
    raise UserError(f"num must be an integer in 1..{MAX_NUM}, got {num!r}")
  dataset = synthetic.SyntheticScenes(split, height=height, width=width,
                                      seed=seed)
  num = min(int(num), len(dataset))

  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import patches
  from matplotlib import pyplot as plt

  parent = os.path.dirname(os.path.abspath(output))
  os.makedirs(parent, exist_ok=True)

  panel_w = 4.0
  panel_h = panel_w * height / width
  fig, axes = plt.subplots(num, 3, squeeze=False,
                           figsize=(3 * panel_w, num * panel_h + 0.6))
  vmax = synthetic.max_disparity(height, width)
  for row in range(num):
    sample = dataset[row]
    disp_max = float(sample["disparity"].max()) or vmax
    panels = (
        (sample["image"], f"{split} {row}: image"),
        (colourize_disparity(sample["disparity"], sample["disparity_valid"],
                             disp_max),
         f"disparity (0..{disp_max:.0f} px, sky black)"),
        (colourize_segmentation(sample["segmentation"]),
         f"segmentation, {int(sample['num_boxes'])} boxes"),
    )
    for col, (picture, title) in enumerate(panels):
      ax = axes[row, col]
      ax.imshow(picture, interpolation="nearest")
      ax.set_title(title, fontsize=8)
      ax.set_axis_off()
    ax = axes[row, 2]
    for box, label in zip(sample["boxes"][:sample["num_boxes"]],
                          sample["box_labels"][:sample["num_boxes"]]):
      x0, y0, x1, y1 = (float(c) for c in box)
      colour = _BOX_COLOURS.get(int(label), "white")
      ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                                     fill=False, edgecolor=colour,
                                     linewidth=0.8))
      ax.text(x0 - 0.5, y0 - 1, _BOX_NAMES.get(int(label), str(label)),
              color=colour, fontsize=5, va="bottom")
  fig.tight_layout()
  fig.savefig(output, dpi=min(200.0, max(100.0, width / panel_w)))
  plt.close(fig)
