"""COCO mAP with pycocotools, from detection batches and detections.

  to_original(boxes, image_size, orig_size)   canvas pixels -> the original
                                              image's (torchvision's
                                              postprocess: per-axis ratios)
  Accumulator.add(batch, detections)          host arrays of one batch
  Accumulator.result()                        {"map", "map50"}: COCOeval
                                              bbox AP@[.5:.95] and AP@.5

Ground truth is built from the batches, in original image coordinates,
with area = box area (as torchmetrics' MeanAveragePrecision builds it for
the authors). crowd: "drop" (the authors': crowd boxes are left out of the
ground truth, so detections on them are false positives) or "ignore"
(COCO's official evaluation: crowd boxes are iscrowd ignore regions).
Rows of weight 0 (the padding of a last batch) are skipped.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np

CROWD_MODES = ("drop", "ignore")


def to_original(boxes, image_size, orig_size) -> np.ndarray:
  """Boxes (..., 4) x1 y1 x2 y2 on the resized image -> original pixels."""
  h, w = (float(v) for v in image_size)
  oh, ow = (float(v) for v in orig_size)
  return np.asarray(boxes, np.float64) * np.array([ow / w, oh / h] * 2)


def _xywh(boxes: np.ndarray) -> np.ndarray:
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)


class Accumulator:
  """Ground truth and detections of the validation images seen so far."""

  def __init__(self, crowd: str = "drop"):
    if crowd not in CROWD_MODES:
      raise ValueError(f"crowd must be one of {CROWD_MODES}, not {crowd!r}")
    self.crowd = crowd
    self.images: list[dict] = []
    self.gt: list[dict] = []
    self.dt: list[dict] = []

  def add(self, batch: dict, detections: dict) -> None:
    """batch: the detection layout (+ optional "weight"); detections:
    {"boxes" (B, D, 4) canvas pixels, "scores", "labels"}; numpy."""
    n = len(batch["image_id"])
    weight = batch.get("weight", np.ones(n))
    for i in range(n):
      if weight[i] <= 0:
        continue
      image_id = int(batch["image_id"][i])
      size, orig = batch["image_size"][i], batch["orig_size"][i]
      self.images.append({"id": image_id, "height": int(orig[0]),
                          "width": int(orig[1])})
      keep = batch["box_mask"][i].copy()
      crowd = batch["crowd"][i] if self.crowd == "ignore" else np.zeros_like(keep)
      boxes = _xywh(to_original(batch["boxes"][i], size, orig))
      for j in np.flatnonzero(keep | crowd):
        self.gt.append({"id": len(self.gt) + 1, "image_id": image_id,
                        "category_id": int(batch["labels"][i][j]),
                        "bbox": boxes[j].tolist(),
                        "area": float(boxes[j, 2] * boxes[j, 3]),
                        "iscrowd": int(bool(crowd[j]))})
      found = np.asarray(detections["scores"][i]) > 0
      dboxes = _xywh(to_original(np.asarray(detections["boxes"][i])[found],
                                 size, orig))
      for box, score, label in zip(dboxes, np.asarray(detections["scores"][i])[found],
                                   np.asarray(detections["labels"][i])[found]):
        self.dt.append({"image_id": image_id, "category_id": int(label),
                        "bbox": box.tolist(), "score": float(score)})

  def result(self) -> dict[str, float]:
    """{"map": AP@[.5:.95], "map50": AP@.5}; 0 without ground truth or
    without detections."""
    if not self.gt or not self.dt:
      return {"map": 0.0, "map50": 0.0}
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    labels = sorted({a["category_id"] for a in self.gt + self.dt})
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
      gt = COCO()
      gt.dataset = {"images": self.images, "annotations": self.gt,
                    "categories": [{"id": c} for c in labels]}
      gt.createIndex()
      dt = gt.loadRes(self.dt)
      ev = COCOeval(gt, dt, "bbox")
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    return {"map": max(float(ev.stats[0]), 0.0),
            "map50": max(float(ev.stats[1]), 0.0)}
