"""RoI heads of Faster R-CNN v2 (torchvision's RoIHeads with
FastRCNNConvFCHead and FastRCNNPredictor), with static shapes.

  RoIHeads                   MultiScaleRoIAlign (P2..P5, 7x7, sampling 2)
                             -> four 3x3 conv + BN + ReLU -> Linear 12544 ->
                             1024 + ReLU -> class logits and per-class deltas
  select_training_samples    ground truth appended to the proposals, matcher
                             0.5 / 0.5 (match_proposals), balanced sample
                             of 512 (1/4 positive), gather_sample
  fastrcnn_loss              cross entropy and smooth-L1 over the sample
  postprocess_detections     softmax, per-class decode and clip, score and
                             size filters, NMS per class, top detections

The box head's BatchNorm sees a fixed number of RoI slots of which some
may be padding; in train mode it takes its statistics over the valid ones
only (MaskedBatchNorm), so they equal torchvision's over its sampled RoIs.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.tasks import detection_ops as ops
from tcr_jax.tasks.layers import conv2d, kaiming_fan_out
from tcr_jax.tasks.resnet import scaled

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
RESOLUTION = 7
SAMPLING_RATIO = 2
CONV_CHANNELS = (256, 256, 256, 256)
REPRESENTATION = 1024
MIN_SIZE = 1e-2
SMOOTH_L1_BETA = 1.0 / 9.0

# torch.nn.Linear's default init: kaiming_uniform_(a=sqrt(5)) for the
# weight, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias.
_linear_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _linear_bias(fan_in: int):
  bound = 1.0 / fan_in ** 0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _dense(features: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=_linear_kernel,
                  bias_init=_linear_bias(fan_in), name=name)


class MaskedBatchNorm(nn.Module):
  """BatchNorm2d over (K, H, W, C) whose train-mode statistics use only the
  rows where mask (K,) is True (torch's semantics otherwise: biased batch
  variance for the output, unbiased for the running variance). Variables
  are named like layers.BatchNorm; momentum in Flax's convention."""
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      if mask is None:
        mask = jnp.ones(x.shape[:1], bool)
      w = mask.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
      n = jnp.sum(mask) * (x.size // (x.shape[0] * c))
      nf = jnp.maximum(n, 1).astype(x.dtype)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.sum(x * w, axes) / nf
      var = jnp.sum(jnp.square(x - mean) * w, axes) / nf
      if not self.is_initializing():
        unbiased = var * (nf / jnp.maximum(nf - 1.0, 1.0))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
    return (x - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias


class BoxConv(nn.Module):
  """3x3 conv (no bias) + masked BatchNorm + ReLU."""
  channels: int

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None,
               train: bool = False) -> jax.Array:
    x = conv2d(self.channels, 3, kernel_init=kaiming_fan_out, name="conv")(x)
    x = MaskedBatchNorm(use_running_average=not train, name="bn")(x, mask)
    return nn.relu(x)


class BoxHead(nn.Module):
  """FastRCNNConvFCHead((256, 7, 7), [256] * 4, [1024], BatchNorm2d);
  `width` scales its channels (1: torchvision's)."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None,
               train: bool = False) -> jax.Array:
    for i, channels in enumerate(CONV_CHANNELS):
      x = BoxConv(scaled(channels, self.width), name=f"block{i}")(x, mask, train)
    x = x.reshape(x.shape[0], -1)  # (H, W, C) order; the import permutes fc6
    return nn.relu(_dense(scaled(REPRESENTATION, self.width), x.shape[-1],
                          "fc6")(x))


class BoxPredictor(nn.Module):
  """FastRCNNPredictor: class logits and per-class box deltas."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    fan_in = x.shape[-1]
    return (_dense(self.num_classes, fan_in, "cls_score")(x),
            _dense(4 * self.num_classes, fan_in, "bbox_pred")(x))


class RoIHeads(nn.Module):
  """Pooling, box head and predictor: (class logits (K, num_classes),
  box deltas (K, 4 * num_classes)) of RoIs (K, 4) in image pixels."""
  num_classes: int
  strides: tuple[int, ...] = (4, 8, 16, 32)
  width: float = 1.0  # the box head's channels (BoxHead)

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], boxes: jax.Array,
               batch_index: jax.Array, mask: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    pooled = ops.multiscale_roi_align(
        features[:len(self.strides)], boxes, batch_index, self.strides,
        RESOLUTION, SAMPLING_RATIO)
    x = BoxHead(self.width, name="box_head")(pooled, mask, train)
    return BoxPredictor(self.num_classes, name="box_predictor")(x)


def match_proposals(proposals: jax.Array, proposal_valid: jax.Array,
                    gt_boxes: jax.Array, gt_labels: jax.Array, gt_mask: jax.Array,
                    *, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Appends the ground truth (B, G) to the proposals (B, P) and matches
  them (no low-quality matches).

  Returns candidates (B, P + G, 4), their validity (B, P + G), class labels
  (B, P + G) int32 (0 background, -1 ignored or invalid) and the matched
  ground-truth row (B, P + G) (negative where unmatched).
  """
  def one(props, props_valid, boxes, labels, mask):
    cand = jnp.concatenate([props, boxes.astype(props.dtype)], 0)
    cand_valid = jnp.concatenate([props_valid, mask], 0)
    matches = ops.match(ops.box_iou(boxes, cand), mask, fg_iou_thresh,
                        bg_iou_thresh, allow_low_quality_matches=False)
    cls = jnp.where(matches >= 0, labels[jnp.maximum(matches, 0)],
                    jnp.where(matches == ops.BELOW_LOW_THRESHOLD, 0, -1))
    cls = jnp.where(cand_valid, cls, -1).astype(jnp.int32)
    return cand, cand_valid, cls, matches

  return jax.vmap(one)(proposals, proposal_valid, gt_boxes, gt_labels, gt_mask)


def gather_sample(candidates: jax.Array, labels: jax.Array, matches: jax.Array,
                  gt_boxes: jax.Array, index: jax.Array, valid: jax.Array
                  ) -> dict[str, jax.Array]:
  """The RoI sample from sampled candidate indices (B, S): {"boxes" (B, S,
  4), "labels" (B, S) int32, "targets" (B, S, 4) box-coder targets (0 where
  not positive), "valid" (B, S)}; invalid slots are zero."""
  def one(cand, labels, matches, boxes, index, valid):
    rois = cand[index]
    sampled = jnp.where(valid, labels[index], 0)
    matched = boxes[jnp.maximum(matches[index], 0)].astype(cand.dtype)
    targets = ops.encode_boxes(matched, rois, BOX_WEIGHTS)
    return {"boxes": jnp.where(valid[:, None], rois, 0.0), "labels": sampled,
            "targets": jnp.where((sampled > 0)[:, None], targets, 0.0),
            "valid": valid}

  return jax.vmap(one)(candidates, labels, matches, gt_boxes, index, valid)


def select_training_samples(
    key: jax.Array, proposals: jax.Array, proposal_valid: jax.Array,
    gt_boxes: jax.Array, gt_labels: jax.Array, gt_mask: jax.Array, *,
    fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
    batch_size_per_image: int = 512, positive_fraction: float = 0.25
) -> dict[str, jax.Array]:
  """match_proposals, the balanced sample of every image, gather_sample."""
  cand, _, labels, matches = match_proposals(
      proposals, proposal_valid, gt_boxes, gt_labels, gt_mask,
      fg_iou_thresh=fg_iou_thresh, bg_iou_thresh=bg_iou_thresh)
  keys = jax.random.split(key, proposals.shape[0])
  index, valid = jax.vmap(lambda k, l: ops.sample_balanced(
      k, l, batch_size_per_image, positive_fraction))(keys, labels)
  return gather_sample(cand, labels, matches, gt_boxes, index, valid)


def fastrcnn_loss(class_logits: jax.Array, box_regression: jax.Array,
                  labels: jax.Array, targets: jax.Array, valid: jax.Array
                  ) -> dict[str, jax.Array]:
  """loss_classifier (cross entropy, mean over the valid samples of the
  batch) and loss_box_reg (smooth-L1, beta 1/9, of the labelled class's
  deltas summed over positives, divided by the number of samples).
  Arguments are flat over the batch: (N, C), (N, 4C), (N,), (N, 4), (N,)."""
  n, c = class_logits.shape
  count = jnp.maximum(jnp.sum(valid), 1).astype(class_logits.dtype)
  logp = jax.nn.log_softmax(class_logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=1)[:, 0]
  pred = jnp.take_along_axis(box_regression.reshape(n, c, 4),
                             labels[:, None, None], axis=1)[:, 0]
  box = jnp.sum(ops.smooth_l1(pred - targets, SMOOTH_L1_BETA), axis=-1)
  positive = valid & (labels > 0)
  return {"loss_classifier": jnp.sum(jnp.where(valid, nll, 0.0)) / count,
          "loss_box_reg": jnp.sum(jnp.where(positive, box, 0.0)) / count}


def postprocess_detections(class_logits: jax.Array, box_regression: jax.Array,
                           proposals: jax.Array, proposal_valid: jax.Array,
                           image_sizes: jax.Array, *, score_thresh: float = 0.05,
                           nms_thresh: float = 0.5, detections_per_img: int = 100
                           ) -> dict[str, jax.Array]:
  """torchvision's postprocess_detections, static shapes.

  class_logits (B, P, C), box_regression (B, P, 4C), proposals (B, P, 4)
  with proposal_valid (B, P), image_sizes (B, 2). Every (proposal, class
  >= 1) pair is a candidate: decoded, clipped, kept if its softmax score
  exceeds score_thresh and its sides reach 1e-2, then NMS per class and
  the best detections_per_img. Rows without a detection are zero.
  """
  b, p, c = class_logits.shape
  boxes = ops.decode_boxes(box_regression.reshape(b, p, c, 4), proposals,
                           BOX_WEIGHTS)
  boxes = ops.clip_boxes(boxes, image_sizes[:, None, None, :])[:, :, 1:]
  scores = jax.nn.softmax(class_logits, axis=-1)[:, :, 1:]
  labels = jnp.broadcast_to(jnp.arange(1, c, dtype=jnp.int32), (b, p, c - 1))
  valid = (proposal_valid[:, :, None] & (scores > score_thresh)
           & ops.large_enough(boxes, MIN_SIZE))
  boxes, scores = boxes.reshape(b, -1, 4), scores.reshape(b, -1)
  labels, valid = labels.reshape(b, -1), valid.reshape(b, -1)

  def one(boxes, scores, labels, valid):
    keep = ops.batched_nms(boxes, scores, labels, nms_thresh,
                           detections_per_img, valid)
    ok = keep >= 0
    safe = jnp.maximum(keep, 0)
    return {"boxes": jnp.where(ok[:, None], boxes[safe], 0.0),
            "scores": jnp.where(ok, scores[safe], 0.0),
            "labels": jnp.where(ok, labels[safe], 0)}

  return jax.vmap(one)(boxes, scores, labels, valid)


def torch_leaves() -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) of roi_heads."""
  head, thead = ("roi_heads", "box_head"), "roi_heads.box_head"
  leaves = []
  for i in range(len(CONV_CHANNELS)):
    leaves.append((head + (f"block{i}", "conv"), f"{thead}.{i}.0", "conv"))
    leaves.append((head + (f"block{i}", "bn"), f"{thead}.{i}.1", "bn"))
  leaves.append((head + ("fc6",), f"{thead}.{len(CONV_CHANNELS) + 1}",
                 f"dense_chw{RESOLUTION}"))
  for name in ("cls_score", "bbox_pred"):
    leaves.append((("roi_heads", "box_predictor", name),
                   f"roi_heads.box_predictor.{name}", "dense"))
  return leaves
