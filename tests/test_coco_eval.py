"""COCO mAP (tcr_jax.model.coco_eval): hand-made cases against pycocotools."""
import contextlib
import io

import numpy as np
import pytest

from tcr_jax.data import detection
from tcr_jax.model import coco_eval


def _batch(seed=0, n=3, canvas=(96, 160)):
  """Images of different original sizes letterboxed onto a canvas (boxes
  scaled), with their original boxes."""
  rng = np.random.default_rng(seed)
  examples, originals = [], []
  for i in range(n):
    h0, w0 = [(60, 100), (45, 80), (80, 120)][i % 3]
    k = 2 + i
    xy = rng.uniform(0, 0.5, (k, 2)) * [w0, h0]
    wh = rng.uniform(0.2, 0.45, (k, 2)) * [w0, h0]
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    labels = rng.integers(1, 4, k)
    image = np.zeros((h0, w0, 3), np.uint8)
    examples.append(detection.letterbox(image, boxes, labels, np.zeros(k, bool),
                                        canvas, 6, 90, 160, image_id=100 + i))
    originals.append((boxes, labels))
  return detection.stack(examples), originals


def _detections(batch, boxes, scores=None):
  b, g = batch["labels"].shape
  scores = batch["box_mask"].astype(np.float32) if scores is None else scores
  return {"boxes": boxes, "scores": scores,
          "labels": np.where(batch["box_mask"], batch["labels"], 0)}


def _pycocotools_ap(originals, dets_original, sizes):
  """AP from pycocotools directly, on original-coordinate boxes."""
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  images, anns, res = [], [], []
  for i, ((boxes, labels), dets, (h, w)) in enumerate(zip(originals,
                                                          dets_original, sizes)):
    images.append({"id": 100 + i, "height": h, "width": w})
    for b, l in zip(boxes, labels):
      anns.append({"id": len(anns) + 1, "image_id": 100 + i,
                   "category_id": int(l), "iscrowd": 0,
                   "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                            float(b[3] - b[1])],
                   "area": float((b[2] - b[0]) * (b[3] - b[1]))})
    for b, l in dets:
      res.append({"image_id": 100 + i, "category_id": int(l), "score": 1.0,
                  "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]),
                           float(b[3] - b[1])]})
  with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns,
                  "categories": [{"id": c} for c in (1, 2, 3)]}
    gt.createIndex()
    ev = COCOeval(gt, gt.loadRes(res), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats[0], ev.stats[1]


def test_boxes_map_back_to_the_original_image():
  batch, originals = _batch()
  for i, (boxes, _) in enumerate(originals):
    got = coco_eval.to_original(batch["boxes"][i][:len(boxes)],
                                batch["image_size"][i], batch["orig_size"][i])
    np.testing.assert_allclose(got, boxes, rtol=1e-5, atol=1e-4)
  # torchvision's resize: 60x100 with min 90 / max 160 -> scale 1.5 -> 90x150
  assert tuple(batch["image_size"][0]) == (90, 150)
  assert tuple(batch["orig_size"][0]) == (60, 100)


def test_predictions_equal_to_the_ground_truth_give_ap_one():
  batch, _ = _batch()
  acc = coco_eval.Accumulator()
  acc.add(batch, _detections(batch, batch["boxes"]))
  assert acc.result() == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}


def test_shifted_boxes_give_what_pycocotools_gives():
  batch, originals = _batch(seed=1)
  # Shift every box right by a fraction of its width, in canvas pixels.
  b = batch["boxes"].copy()
  shift = 0.12 * (b[..., 2] - b[..., 0])
  b[..., 0] += shift
  b[..., 2] += shift
  acc = coco_eval.Accumulator()
  acc.add(batch, _detections(batch, b))
  got = acc.result()
  dets_original, sizes = [], []
  for i, (boxes, labels) in enumerate(originals):
    shifted = boxes.copy()
    s = 0.12 * (shifted[:, 2] - shifted[:, 0])
    shifted[:, 0] += s
    shifted[:, 2] += s
    dets_original.append(list(zip(shifted, labels)))
    sizes.append(tuple(batch["orig_size"][i]))
  ap, ap50 = _pycocotools_ap(originals, dets_original, sizes)
  assert got["map"] == pytest.approx(ap, abs=1e-6)
  assert got["map50"] == pytest.approx(ap50, abs=1e-6)
  # A horizontal shift by 0.12 of the width keeps IoU = 0.88 / 1.12 = 0.786:
  # matched at IoU thresholds .50 ... .75 (6 of 10), missed above.
  assert got["map"] == pytest.approx(0.6, abs=1e-6) and got["map50"] == 1.0


def test_crowd_boxes_dropped_or_ignored():
  canvas = (64, 64)
  image = np.zeros((64, 64, 3), np.uint8)
  boxes = np.array([[4, 4, 30, 30], [34, 34, 60, 60]], np.float32)
  ex = detection.letterbox(image, boxes, [1, 1], [False, True], canvas, 4,
                           image_id=7)
  batch = detection.stack([ex])
  assert batch["box_mask"][0].tolist() == [True, False, False, False]
  # A detection on the ground truth and one on the crowd region.
  dets = {"boxes": np.array([[[4, 4, 30, 30], [34, 34, 60, 60]]], np.float32),
          "scores": np.array([[0.9, 0.95]], np.float32),
          "labels": np.array([[1, 1]], np.int32)}
  drop = coco_eval.Accumulator("drop")
  drop.add(batch, dets)
  ignore = coco_eval.Accumulator("ignore")
  ignore.add(batch, dets)
  # "drop" (the authors'): the crowd detection is a false positive ranked
  # first; "ignore" (COCO's): it matches the crowd region and is ignored.
  assert drop.result()["map50"] < 0.6
  assert ignore.result()["map50"] == pytest.approx(1.0)


def test_padding_rows_and_empty_detections():
  batch, _ = _batch()
  acc = coco_eval.Accumulator()
  none = {"boxes": np.zeros_like(batch["boxes"]),
          "scores": np.zeros(batch["labels"].shape, np.float32),
          "labels": np.zeros_like(batch["labels"])}
  acc.add(batch, none)
  assert acc.result() == {"map": 0.0, "map50": 0.0}
  acc = coco_eval.Accumulator()
  acc.add(dict(batch, weight=np.array([1.0, 0.0, 0.0])),
          _detections(batch, batch["boxes"]))
  assert {im["id"] for im in acc.images} == {100}
  with pytest.raises(ValueError, match="crowd"):
    coco_eval.Accumulator("keep")
