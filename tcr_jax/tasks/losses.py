"""Losses and metrics of the task heads, as pure jnp functions (jit-able).

Depth (the authors' LRASPP depth head): 128 * sqrt(masked MSE) of
disparity / 128, which is the RMSE in disparity pixels over valid pixels.

Segmentation (DeepLabV3 with the FCN aux head): num_classes * (CE(out) +
aux_weight * CE(aux)), CE averaged over pixels whose label is not the
ignore index; mIoU from a confusion matrix.

Layout: logits (B, H, W, C); labels, disparity and masks (B, H, W).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

DISPARITY_SCALE = 128.0


def _squeeze_channel(x: jax.Array) -> jax.Array:
  """(B, H, W, 1) -> (B, H, W); other shapes unchanged."""
  return x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt with sqrt(0) = 0 and a zero (not NaN) gradient there."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def depth_loss(pred: jax.Array, disparity: jax.Array,
               valid: jax.Array | None = None) -> jax.Array:
  """128 * sqrt(masked MSE of pred/128 vs disparity/128): RMSE in pixels.

  Args:
    pred: predicted disparity in pixels, (B, H, W) or (B, H, W, 1).
    disparity: ground truth in pixels, same shape as pred.
    valid: boolean mask of pixels with ground truth (None: all valid).
  Returns:
    A scalar; 0 (not NaN) when no pixel is valid.
  """
  pred = _squeeze_channel(pred)
  disparity = _squeeze_channel(disparity)
  if valid is None:
    valid = jnp.ones(pred.shape, bool)
  valid = _squeeze_channel(valid).astype(bool)
  diff = (pred - disparity) / DISPARITY_SCALE
  sq = jnp.where(valid, jnp.square(diff), 0.0)
  count = jnp.sum(valid)
  mse = jnp.sum(sq) / jnp.maximum(count, 1)
  return DISPARITY_SCALE * _safe_sqrt(mse)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  ignore_index: int) -> jax.Array:
  """Mean softmax cross entropy over pixels whose label != ignore_index.

  Like torch's F.cross_entropy(ignore_index=...), except that a batch with
  no labelled pixel gives 0 instead of NaN. Labels outside [0, C) other
  than the ignore index are an error in torch; here they are also ignored.
  """
  num_classes = logits.shape[-1]
  labels = labels.astype(jnp.int32)
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(keep, labels, 0)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, safe_labels[..., None], axis=-1)[..., 0]
  nll = jnp.where(keep, nll, 0.0)
  return jnp.sum(nll) / jnp.maximum(jnp.sum(keep), 1)


def segmentation_loss(outputs: Mapping[str, jax.Array], labels: jax.Array,
                      num_classes: int, ignore_index: int,
                      aux_weight: float = 0.5) -> jax.Array:
  """num_classes * (CE(out) + aux_weight * CE(aux)); aux only if present.

  Args:
    outputs: {"out": (B, H, W, C) logits, optional "aux": same shape}.
    labels: (B, H, W) integer class ids; ignore_index pixels are skipped.
  """
  loss = cross_entropy(outputs["out"], labels, ignore_index)
  if outputs.get("aux") is not None:
    loss = loss + aux_weight * cross_entropy(outputs["aux"], labels,
                                             ignore_index)
  return num_classes * loss


def confusion_matrix(pred_labels: jax.Array, labels: jax.Array,
                     num_classes: int, ignore_index: int) -> jax.Array:
  """(num_classes, num_classes) int32 counts; rows ground truth, columns
  prediction. Pixels labelled ignore_index (or outside [0, C)) are skipped."""
  labels = labels.astype(jnp.int32).reshape(-1)
  pred_labels = pred_labels.astype(jnp.int32).reshape(-1)
  keep = ((labels != ignore_index) & (labels >= 0) & (labels < num_classes)
          & (pred_labels >= 0) & (pred_labels < num_classes))
  index = jnp.where(keep, labels * num_classes + pred_labels, 0)
  counts = jax.ops.segment_sum(keep.astype(jnp.int32), index,
                               num_segments=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def per_class_iou(conf: jax.Array) -> tuple[jax.Array, jax.Array]:
  """IoU of each class and whether the class occurs (in GT or prediction)."""
  conf = conf.astype(jnp.float32)
  tp = jnp.diagonal(conf)
  union = jnp.sum(conf, 0) + jnp.sum(conf, 1) - tp
  present = union > 0
  return jnp.where(present, tp / jnp.where(present, union, 1.0), 0.0), present


def miou(conf: jax.Array, ignore_index: int | None = None) -> jax.Array:
  """Mean IoU over classes present in the ground truth or the prediction.

  Classes absent from both are left out of the mean. If the ignore index is
  itself a class of the model (the authors' 20th class), pass it to leave
  that class out of the mean too; pixels predicted as it still count as
  misses of their true class.
  """
  iou, present = per_class_iou(conf)
  if ignore_index is not None and 0 <= ignore_index < conf.shape[0]:
    present = present.at[ignore_index].set(False)
  return jnp.sum(jnp.where(present, iou, 0.0)) / jnp.maximum(jnp.sum(present), 1)
