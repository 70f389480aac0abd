"""Region proposal network of Faster R-CNN v2 (torchvision's RPNHead with
conv_depth=2 and RegionProposalNetwork), with static shapes.

  RPN                  the head: two shared 3x3 convs + ReLU (with bias),
                       1x1 objectness (A) and box deltas (4A) per level
  anchors              the anchors of a canvas, numpy constants
  filter_proposals     per-level top-k, decode, clip, size filter, NMS by
                       level, fixed number of proposals with a valid mask
  match_anchors        matcher (0.7 / 0.3, low-quality matches)
  sample_anchors       ... and the balanced sampler (256 per image, half
                       positive), gather_sample building the loss's input
  rpn_loss             BCE-with-logits and smooth-L1 over the sample

Per-anchor outputs are flattened in (level, y, x, anchor) order, as
torchvision's concat_box_prediction_layers does.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax.tasks import detection_ops as ops
from tcr_jax.tasks.layers import conv2d

ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
MIN_SIZE = 1e-3
SMOOTH_L1_BETA = 1.0 / 9.0

_normal_001 = nn.initializers.normal(0.01)


class RPNHead(nn.Module):
  """Shared convs, then objectness logits (B, H*W*A) and deltas
  (B, H*W*A, 4) for every level."""
  num_anchors: int = len(ASPECT_RATIOS)
  conv_depth: int = 2

  @nn.compact
  def __call__(self, features: Sequence[jax.Array]
               ) -> tuple[list[jax.Array], list[jax.Array]]:
    c = features[0].shape[-1]
    convs = [conv2d(c, 3, use_bias=True, kernel_init=_normal_001, name=f"conv{i}")
             for i in range(self.conv_depth)]
    cls = conv2d(self.num_anchors, 1, use_bias=True, kernel_init=_normal_001,
                 name="cls_logits")
    box = conv2d(4 * self.num_anchors, 1, use_bias=True,
                 kernel_init=_normal_001, name="bbox_pred")
    objectness, deltas = [], []
    for x in features:
      for conv in convs:
        x = nn.relu(conv(x))
      b, h, w, _ = x.shape
      objectness.append(cls(x).reshape(b, h * w * self.num_anchors))
      deltas.append(box(x).reshape(b, h * w * self.num_anchors, 4))
    return objectness, deltas


class RPN(nn.Module):
  """Holds the head under the name torchvision uses (rpn.head)."""

  @nn.compact
  def __call__(self, features):
    return RPNHead(name="head")(features)


def anchors(canvas_hw: tuple[int, int], grid_sizes: Sequence[tuple[int, int]]
            ) -> np.ndarray:
  """All anchors of a canvas, (sum of H*W*A, 4) float32, level by level."""
  return np.concatenate(ops.level_anchors(canvas_hw, grid_sizes, ANCHOR_SIZES,
                                          ASPECT_RATIOS))


def filter_proposals(objectness: Sequence[jax.Array], deltas: Sequence[jax.Array],
                     anchors_: np.ndarray, image_sizes: jax.Array, *,
                     pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
                     score_thresh: float = 0.0, min_size: float = MIN_SIZE
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """torchvision's RegionProposalNetwork.filter_proposals, static shapes.

  objectness / deltas: per level (B, n_l) and (B, n_l, 4) (no gradient is
  taken through them). Takes the top min(pre_nms_top_n, n_l) logits per
  level, decodes their deltas, clips to image_sizes (B, 2), drops boxes
  smaller than min_size and scores below score_thresh, runs NMS per level
  and keeps the best post_nms_top_n by score.

  Returns boxes (B, post_nms_top_n, 4), probabilities (B, post) and a
  valid mask (B, post); invalid rows are zero.
  """
  objectness = [jax.lax.stop_gradient(o) for o in objectness]
  deltas = [jax.lax.stop_gradient(d) for d in deltas]
  idx, levels, offset = [], [], 0
  for level, o in enumerate(objectness):
    k = min(pre_nms_top_n, o.shape[1])
    idx.append(jax.lax.top_k(o, k)[1] + offset)
    levels.append(np.full((k,), level, np.int32))
    offset += o.shape[1]
  idx = jnp.concatenate(idx, axis=1)                      # (B, K)
  levels = jnp.asarray(np.concatenate(levels))            # (K,)
  logits = jnp.take_along_axis(jnp.concatenate(objectness, 1), idx, axis=1)
  codes = jnp.take_along_axis(jnp.concatenate(deltas, 1), idx[..., None], axis=1)
  boxes = ops.decode_boxes(codes[:, :, None, :], jnp.asarray(anchors_)[idx],
                           BOX_WEIGHTS)[:, :, 0]
  boxes = ops.clip_boxes(boxes, image_sizes[:, None, :])
  probs = jax.nn.sigmoid(logits)
  valid = ops.large_enough(boxes, min_size) & (probs >= score_thresh)

  def one(boxes, probs, valid):
    keep = ops.batched_nms(boxes, probs, levels, nms_thresh, post_nms_top_n,
                           valid)
    ok = keep >= 0
    safe = jnp.maximum(keep, 0)
    return (jnp.where(ok[:, None], boxes[safe], 0.0),
            jnp.where(ok, probs[safe], 0.0), ok)

  return jax.vmap(one)(boxes, probs, valid)


def match_anchors(anchors_: np.ndarray, gt_boxes: jax.Array, gt_mask: jax.Array,
                  *, fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3
                  ) -> tuple[jax.Array, jax.Array]:
  """Anchor labels (B, A) int32: 1 foreground, 0 background, -1 ignored
  (torchvision's Matcher with low-quality matches), and the matched
  ground-truth row (B, A) (-1 / -2 where unmatched). Ground truth is
  padded: boxes (B, G, 4), mask (B, G)."""
  anchors_ = jnp.asarray(anchors_)

  def one(boxes, mask):
    matches = ops.match(ops.box_iou(boxes, anchors_), mask, fg_iou_thresh,
                        bg_iou_thresh, allow_low_quality_matches=True)
    labels = jnp.where(matches >= 0, 1, jnp.where(
        matches == ops.BELOW_LOW_THRESHOLD, 0, -1))
    return labels.astype(jnp.int32), matches

  return jax.vmap(one)(gt_boxes, gt_mask)


def gather_sample(anchors_: np.ndarray, gt_boxes: jax.Array, labels: jax.Array,
                  matches: jax.Array, index: jax.Array, valid: jax.Array
                  ) -> dict[str, jax.Array]:
  """The sample dict of rpn_loss from sampled anchor indices (B, S) and
  their validity: labels as float 1 / 0 and box-coder targets (0 where not
  positive)."""
  anchors_ = jnp.asarray(anchors_)

  def one(boxes, labels, matches, index, valid):
    positive = valid & (labels[index] == 1)
    matched = boxes[jnp.maximum(matches[index], 0)]
    targets = ops.encode_boxes(matched, anchors_[index], BOX_WEIGHTS)
    return {"index": index, "valid": valid,
            "labels": positive.astype(jnp.float32),
            "targets": jnp.where(positive[:, None], targets, 0.0)}

  return jax.vmap(one)(gt_boxes, labels, matches, index, valid)


def sample_anchors(key: jax.Array, anchors_: np.ndarray, gt_boxes: jax.Array,
                   gt_mask: jax.Array, *, fg_iou_thresh: float = 0.7,
                   bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256,
                   positive_fraction: float = 0.5) -> dict[str, jax.Array]:
  """Matches anchors to the padded ground truth and draws the balanced
  sample of every image: {"index" (B, S) anchor indices, "valid" (B, S),
  "labels" (B, S) float 1 / 0, "targets" (B, S, 4)}, S =
  batch_size_per_image."""
  labels, matches = match_anchors(anchors_, gt_boxes, gt_mask,
                                  fg_iou_thresh=fg_iou_thresh,
                                  bg_iou_thresh=bg_iou_thresh)
  keys = jax.random.split(key, gt_boxes.shape[0])
  index, valid = jax.vmap(lambda k, l: ops.sample_balanced(
      k, l, batch_size_per_image, positive_fraction))(keys, labels)
  return gather_sample(anchors_, gt_boxes, labels, matches, index, valid)


def rpn_loss(objectness: Sequence[jax.Array], deltas: Sequence[jax.Array],
             sample: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """loss_objectness (BCE-with-logits mean over the sampled anchors of the
  whole batch) and loss_rpn_box_reg (smooth-L1, beta 1/9, summed over the
  sampled positives, divided by the number of sampled anchors)."""
  index, valid = sample["index"], sample["valid"]
  labels, targets = sample["labels"], sample["targets"]
  logits = jnp.take_along_axis(jnp.concatenate(objectness, 1), index, axis=1)
  codes = jnp.take_along_axis(jnp.concatenate(deltas, 1), index[..., None], axis=1)
  count = jnp.maximum(jnp.sum(valid), 1).astype(logits.dtype)
  bce = (jnp.maximum(logits, 0.0) - logits * labels
         + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  positive = valid & (labels > 0)
  box = jnp.sum(ops.smooth_l1(codes - targets, SMOOTH_L1_BETA), axis=-1)
  return {"loss_objectness": jnp.sum(jnp.where(valid, bce, 0.0)) / count,
          "loss_rpn_box_reg": jnp.sum(jnp.where(positive, box, 0.0)) / count}


def torch_leaves() -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) of rpn.head."""
  head, thead = ("rpn", "head"), "rpn.head"
  leaves = [(head + (f"conv{i}",), f"{thead}.conv.{i}.0", "conv_bias")
            for i in range(2)]
  leaves.append((head + ("cls_logits",), f"{thead}.cls_logits", "conv_bias"))
  leaves.append((head + ("bbox_pred",), f"{thead}.bbox_pred", "conv_bias"))
  return leaves
