"""Detection operators as pure, jit-compatible JAX functions with static
shapes: box arithmetic (IoU, clipping, the R-CNN box coding), anchors,
the IoU matcher and the balanced sampler, greedy NMS with a fixed output
size, and RoIAlign (single- and multi-scale).

Each follows torchvision 0.29's semantics (torchvision.ops and
torchvision.models.detection), with the float operations in the same order
where that matters for exact agreement; docs/detection.md lists the rules.
Boxes are (x1, y1, x2, y2) in pixels. Nothing here loops over boxes in
Python: NMS runs tiles of candidates in a lax.while_loop, RoIAlign gathers
the bilinear taps and contracts them with small weight matrices.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

BBOX_XFORM_CLIP = math.log(1000.0 / 16)
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


# ------------------------------------------------------------------ boxes


def box_area(boxes: jax.Array) -> jax.Array:
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: jax.Array, boxes2: jax.Array) -> jax.Array:
  """(N, M) IoU, inter / (area1 + area2 - inter) with no epsilon (0/0 gives
  NaN, which never passes a threshold, as in torchvision)."""
  area1, area2 = box_area(boxes1), box_area(boxes2)
  lt = jnp.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
  rb = jnp.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
  wh = jnp.maximum(rb - lt, 0.0)
  inter = wh[..., 0] * wh[..., 1]
  return inter / (area1[:, None] + area2[None, :] - inter)


def clip_boxes(boxes: jax.Array, size_hw: jax.Array) -> jax.Array:
  """Clamps x to [0, w] and y to [0, h]; size_hw (..., 2) broadcasts
  against boxes (..., 4) without its last axis."""
  size_hw = jnp.asarray(size_hw, boxes.dtype)
  h, w = size_hw[..., 0:1], size_hw[..., 1:2]
  x = jnp.clip(boxes[..., 0::2], 0.0, w)
  y = jnp.clip(boxes[..., 1::2], 0.0, h)
  return jnp.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], axis=-1)


def large_enough(boxes: jax.Array, min_size: float) -> jax.Array:
  """torchvision's remove_small_boxes as a mask: width and height >= min."""
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return (w >= min_size) & (h >= min_size)


def encode_boxes(reference: jax.Array, proposals: jax.Array,
                 weights: Sequence[float]) -> jax.Array:
  """Regression targets (dx, dy, dw, dh) of `reference` (ground truth)
  relative to `proposals`; both (..., 4)."""
  wx, wy, ww, wh = weights
  ex_w = proposals[..., 2] - proposals[..., 0]
  ex_h = proposals[..., 3] - proposals[..., 1]
  ex_x = proposals[..., 0] + 0.5 * ex_w
  ex_y = proposals[..., 1] + 0.5 * ex_h
  gt_w = reference[..., 2] - reference[..., 0]
  gt_h = reference[..., 3] - reference[..., 1]
  gt_x = reference[..., 0] + 0.5 * gt_w
  gt_y = reference[..., 1] + 0.5 * gt_h
  return jnp.stack([wx * (gt_x - ex_x) / ex_w, wy * (gt_y - ex_y) / ex_h,
                    ww * jnp.log(gt_w / ex_w), wh * jnp.log(gt_h / ex_h)], -1)


def decode_boxes(codes: jax.Array, boxes: jax.Array, weights: Sequence[float],
                 clip: float = BBOX_XFORM_CLIP) -> jax.Array:
  """Inverse of encode_boxes; dw, dh are clamped at `clip` (log(1000/16)).

  codes (..., K, 4) and boxes (..., 4): K codes per box (K = classes in the
  box predictor, 1 in the RPN); returns (..., K, 4).
  """
  wx, wy, ww, wh = weights
  widths = (boxes[..., 2] - boxes[..., 0])[..., None]
  heights = (boxes[..., 3] - boxes[..., 1])[..., None]
  ctr_x = boxes[..., 0][..., None] + 0.5 * widths
  ctr_y = boxes[..., 1][..., None] + 0.5 * heights
  dx, dy = codes[..., 0] / wx, codes[..., 1] / wy
  dw = jnp.minimum(codes[..., 2] / ww, clip)
  dh = jnp.minimum(codes[..., 3] / wh, clip)
  pred_x = dx * widths + ctr_x
  pred_y = dy * heights + ctr_y
  half_w = 0.5 * (jnp.exp(dw) * widths)
  half_h = 0.5 * (jnp.exp(dh) * heights)
  return jnp.stack([pred_x - half_w, pred_y - half_h,
                    pred_x + half_w, pred_y + half_h], axis=-1)


def smooth_l1(x: jax.Array, beta: float) -> jax.Array:
  """Elementwise smooth-L1 (Huber / beta) of a difference x."""
  ax = jnp.abs(x)
  return jnp.where(ax < beta, 0.5 * ax * ax / beta, ax - 0.5 * beta)


# ---------------------------------------------------------------- anchors


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> np.ndarray:
  """(R, 4) anchors centred on 0: round([-w, -h, w, h] / 2), h = s*sqrt(r),
  w = s/sqrt(r), in float32 and rounded half to even."""
  ratios = np.asarray(aspect_ratios, np.float32)
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = w_ratios * np.float32(size)
  hs = h_ratios * np.float32(size)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2))


def grid_anchors(canvas_hw: tuple[int, int], grid_hw: tuple[int, int],
                 cell: np.ndarray) -> np.ndarray:
  """(gh * gw * R, 4) anchors of one level, ordered (y, x, ratio); the
  stride is canvas // grid per axis (61, not 64, for an odd pooled level)."""
  gh, gw = grid_hw
  sy, sx = canvas_hw[0] // gh, canvas_hw[1] // gw
  shift_y, shift_x = np.meshgrid(np.arange(gh) * sy, np.arange(gw) * sx,
                                 indexing="ij")
  shifts = np.stack([shift_x, shift_y, shift_x, shift_y], -1).reshape(-1, 1, 4)
  return (shifts.astype(np.float32) + cell[None]).reshape(-1, 4)


def level_anchors(canvas_hw: tuple[int, int], grid_sizes: Sequence[tuple[int, int]],
                  sizes: Sequence[float], aspect_ratios: Sequence[float]
                  ) -> list[np.ndarray]:
  """Anchors of every level (one size per level), as numpy constants."""
  return [grid_anchors(canvas_hw, tuple(g), cell_anchors(s, aspect_ratios))
          for g, s in zip(grid_sizes, sizes)]


# ------------------------------------------------------ matcher, sampler


def match(iou: jax.Array, gt_valid: jax.Array, high: float, low: float,
          allow_low_quality_matches: bool) -> jax.Array:
  """torchvision's Matcher on a (G, N) IoU matrix with padded ground truth.

  Returns (N,) int32: the matched ground-truth row, or BELOW_LOW_THRESHOLD
  (-1) / BETWEEN_THRESHOLDS (-2). Invalid rows never match; with no valid
  row every element is below the low threshold (torchvision's empty case).
  With allow_low_quality_matches, the elements of highest IoU with each
  valid row (ties included) keep their best match whatever its IoU.
  """
  quality = jnp.where(gt_valid[:, None], iou, -1.0)
  matched_vals = jnp.max(quality, axis=0)
  matches = jnp.argmax(quality, axis=0).astype(jnp.int32)
  result = jnp.where(matched_vals < low, BELOW_LOW_THRESHOLD,
                     jnp.where(matched_vals < high, BETWEEN_THRESHOLDS, matches))
  if allow_low_quality_matches:
    best = jnp.max(quality, axis=1, keepdims=True)
    is_best = jnp.any((quality == best) & gt_valid[:, None], axis=0)
    result = jnp.where(is_best, matches, result)
  return result


def sample_balanced(key: jax.Array, labels: jax.Array, num_samples: int,
                    positive_fraction: float) -> tuple[jax.Array, jax.Array]:
  """Static-shape BalancedPositiveNegativeSampler for one image.

  labels (N,): >= 1 positive, 0 negative, < 0 ignored. Takes
  min(#pos, num_samples * fraction) positives and fills up to num_samples
  with negatives, each a uniformly random subset (the top keys of random
  uniforms), as torchvision's randperm does in distribution.

  Returns (indices (num_samples,) int32, valid (num_samples,) bool):
  positives first, then negatives, then invalid slots.
  """
  max_pos = int(num_samples * positive_fraction)
  n = labels.shape[0]
  pos, neg = labels >= 1, labels == 0
  num_pos = jnp.minimum(jnp.sum(pos), max_pos)
  num_neg = jnp.minimum(jnp.sum(neg), num_samples - num_pos)
  key_pos, key_neg = jax.random.split(key)
  _, pos_idx = jax.lax.top_k(
      jnp.where(pos, jax.random.uniform(key_pos, (n,)), -1.0), min(max_pos, n))
  _, neg_idx = jax.lax.top_k(
      jnp.where(neg, jax.random.uniform(key_neg, (n,)), -1.0), min(num_samples, n))
  slots = jnp.arange(num_samples)
  from_pos = pos_idx[jnp.clip(slots, 0, pos_idx.shape[0] - 1)]
  from_neg = neg_idx[jnp.clip(slots - num_pos, 0, neg_idx.shape[0] - 1)]
  indices = jnp.where(slots < num_pos, from_pos, from_neg).astype(jnp.int32)
  return indices, slots < num_pos + num_neg


# -------------------------------------------------------------------- NMS


def _sort_desc(scores: jax.Array, valid: jax.Array) -> jax.Array:
  """Permutation putting valid entries first, by descending score (stable)."""
  n = scores.shape[0]
  _, _, order = jax.lax.sort(
      ((~valid).astype(jnp.int32), -scores, jnp.arange(n, dtype=jnp.int32)),
      num_keys=2)
  return order


def _resolve_tile(candidates: jax.Array, suppresses: jax.Array) -> jax.Array:
  """Greedy NMS inside one tile: the fixed point of keep[i] = candidate[i]
  and no kept j < i suppresses i. Iterating from the candidates converges
  to it (position i is final after i rounds; usually a few suffice)."""
  def body(state):
    keep, _ = state
    new = candidates & ~jnp.any(suppresses & keep[:, None], axis=0)
    return new, jnp.any(new != keep)

  keep, _ = jax.lax.while_loop(lambda s: s[1], body, (candidates, jnp.array(True)))
  return keep


def _nms_sorted(boxes, valid, categories, iou_threshold, max_output_size, tile):
  """Greedy NMS over boxes sorted by descending score, valid ones first.

  Tiles of `tile` boxes are processed in order while fewer than
  max_output_size are kept: each tile is suppressed by the boxes kept so
  far (held in a buffer of max_output_size), then resolved within itself.
  Exact greedy NMS (torchvision's order of decisions) whatever the number
  of candidates; only boxes of equal category suppress each other.
  Returns the sorted positions of the kept boxes, padded with -1.
  """
  n = boxes.shape[0]
  num_tiles = -(-n // tile)
  pad = num_tiles * tile - n
  boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
  valid = jnp.pad(valid, (0, pad))
  categories = jnp.pad(categories, (0, pad))
  lower = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]  # j < i

  def cond(state):
    t, count = state[0], state[1]
    return (t < num_tiles) & (count < max_output_size) & valid[
        jnp.minimum(t * tile, num_tiles * tile - 1)]

  def body(state):
    t, count, kept_boxes, kept_cats, kept_valid, kept_pos = state
    start = t * tile
    b = jax.lax.dynamic_slice_in_dim(boxes, start, tile)
    v = jax.lax.dynamic_slice_in_dim(valid, start, tile)
    c = jax.lax.dynamic_slice_in_dim(categories, start, tile)
    by_kept = ((box_iou(b, kept_boxes) > iou_threshold) & kept_valid[None, :]
               & (c[:, None] == kept_cats[None, :]))
    candidates = v & ~jnp.any(by_kept, axis=1)
    within = ((box_iou(b, b) > iou_threshold) & lower
              & (c[:, None] == c[None, :]))
    keep = _resolve_tile(candidates, within)
    slot = count + jnp.cumsum(keep) - 1
    slot = jnp.where(keep, slot, max_output_size)  # out of range: dropped
    kept_boxes = kept_boxes.at[slot].set(b, mode="drop")
    kept_cats = kept_cats.at[slot].set(c, mode="drop")
    kept_valid = kept_valid.at[slot].set(True, mode="drop")
    kept_pos = kept_pos.at[slot].set(start + jnp.arange(tile, dtype=jnp.int32),
                                     mode="drop")
    return (t + 1, count + jnp.sum(keep, dtype=jnp.int32), kept_boxes, kept_cats,
            kept_valid, kept_pos)

  state = (jnp.int32(0), jnp.int32(0),
           jnp.zeros((max_output_size, 4), boxes.dtype),
           jnp.zeros((max_output_size,), categories.dtype),
           jnp.zeros((max_output_size,), bool),
           jnp.full((max_output_size,), -1, jnp.int32))
  return jax.lax.while_loop(cond, body, state)[5]


def batched_nms(boxes: jax.Array, scores: jax.Array, categories: jax.Array,
                iou_threshold: float, max_output_size: int,
                valid: jax.Array | None = None, tile: int = 256) -> jax.Array:
  """torchvision.ops.batched_nms with a fixed output size: indices of the
  kept boxes by descending score, only boxes of equal category suppressing
  each other, padded with -1 to max_output_size. Invalid boxes (valid
  False) are never kept. One image: boxes (N, 4); vmap for a batch."""
  n = boxes.shape[0]
  if n == 0:
    return jnp.full((max_output_size,), -1, jnp.int32)
  if valid is None:
    valid = jnp.ones((n,), bool)
  order = _sort_desc(scores, valid)
  pos = _nms_sorted(boxes[order], valid[order], categories[order],
                    iou_threshold, max_output_size, min(tile, n))
  return jnp.where(pos >= 0, order[jnp.maximum(pos, 0)], -1)


def nms(boxes: jax.Array, scores: jax.Array, iou_threshold: float,
        max_output_size: int) -> jax.Array:
  """torchvision.ops.nms with a fixed output size: indices of the kept
  boxes (N, 4) in decreasing score order, padded with -1. Suppresses a box
  when its IoU with a kept box exceeds iou_threshold."""
  return batched_nms(boxes, scores, jnp.zeros(boxes.shape[:1], jnp.int32),
                     iou_threshold, max_output_size)


# --------------------------------------------------------------- RoIAlign


def _taps(start, length, bins, ratio, extent, aligned):
  """Bilinear taps along one axis for RoIs (K,): indices and weights of
  shape (K, bins, ratio * 2), torchvision's CPU kernel rules (samples
  outside [-1, extent] weigh 0; the last row/column is clamped)."""
  if not aligned:
    length = jnp.maximum(length, 1.0)
  bin_size = length / bins
  p = jnp.arange(bins, dtype=start.dtype)[None, :, None]
  i = jnp.arange(ratio, dtype=start.dtype)[None, None, :] + 0.5
  bs = bin_size[:, None, None]
  coord = start[:, None, None] + p * bs + i * bs / ratio  # (K, bins, ratio)
  ext = extent[:, None, None]
  inside = (coord >= -1.0) & (coord <= ext.astype(coord.dtype))
  coord = jnp.maximum(coord, 0.0)
  low = coord.astype(jnp.int32)
  at_edge = low >= ext - 1
  low = jnp.where(at_edge, ext - 1, low)
  high = jnp.where(at_edge, ext - 1, low + 1)
  coord = jnp.where(at_edge, low.astype(coord.dtype), coord)
  frac = coord - low
  scale = jnp.where(inside, 1.0 / ratio, 0.0).astype(coord.dtype)
  index = jnp.stack([low, high], -1).reshape(low.shape[0], bins, ratio * 2)
  weight = jnp.stack([(1.0 - frac) * scale, frac * scale], -1).reshape(
      low.shape[0], bins, ratio * 2)
  return index, weight


def _roi_align_flat(flat, base, height, width, scale, boxes, output_size,
                    sampling_ratio, aligned):
  """RoIAlign from features flattened to (N, C): RoI k reads the (height[k],
  width[k]) map starting at row base[k]. boxes (K, 4) in image pixels,
  scale (K,) the map's spatial scale. Returns (K, out_h, out_w, C)."""
  if sampling_ratio <= 0:
    raise ValueError("roi_align needs a fixed sampling_ratio > 0 (static "
                     "shapes); torchvision's adaptive count is data-dependent")
  out_h, out_w = output_size
  offset = 0.5 if aligned else 0.0
  x0 = boxes[:, 0] * scale - offset
  y0 = boxes[:, 1] * scale - offset
  x1 = boxes[:, 2] * scale - offset
  y1 = boxes[:, 3] * scale - offset
  yi, yw = _taps(y0, y1 - y0, out_h, sampling_ratio, height, aligned)
  xi, xw = _taps(x0, x1 - x0, out_w, sampling_ratio, width, aligned)
  k, t = boxes.shape[0], sampling_ratio * 2
  rows = base[:, None] + yi.reshape(k, out_h * t) * width[:, None]
  index = rows[:, :, None] + xi.reshape(k, 1, out_w * t)  # (K, out_h*t, out_w*t)
  taps = flat[index].reshape(k, out_h, t, out_w, t, flat.shape[-1])
  taps = jnp.einsum("kqb,kpaqbc->kpaqc", xw.astype(flat.dtype), taps)
  return jnp.einsum("kpa,kpaqc->kpqc", yw.astype(flat.dtype), taps)


def roi_align(features: jax.Array, rois: jax.Array, output_size,
              spatial_scale: float = 1.0, sampling_ratio: int = 2,
              aligned: bool = False) -> jax.Array:
  """torchvision.ops.roi_align on NHWC features (B, H, W, C).

  rois (K, 5): (batch index, x1, y1, x2, y2) in image pixels. Returns
  (K, out_h, out_w, C). sampling_ratio must be > 0 (a static grid).
  """
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  b, h, w, c = features.shape
  k = rois.shape[0]
  batch = jnp.clip(rois[:, 0].astype(jnp.int32), 0, b - 1)
  full = lambda v: jnp.full((k,), v, jnp.int32)
  return _roi_align_flat(
      features.reshape(b * h * w, c), batch * (h * w), full(h), full(w),
      jnp.full((k,), spatial_scale, rois.dtype), rois[:, 1:],
      tuple(output_size), sampling_ratio, aligned)


def map_levels(boxes: jax.Array, k_min: int = 2, k_max: int = 5,
               canonical_scale: float = 224.0, canonical_level: int = 4,
               eps: float = 1e-6) -> jax.Array:
  """FPN level (0-based from k_min) of each box: clamp(floor(k0 +
  log2(sqrt(area) / 224) + eps), k_min, k_max) - k_min."""
  s = jnp.sqrt(box_area(boxes))
  level = jnp.floor(canonical_level + jnp.log2(s / canonical_scale) + eps)
  level = jnp.clip(jnp.nan_to_num(level, nan=k_min), k_min, k_max)
  return level.astype(jnp.int32) - k_min


def multiscale_roi_align(features: Sequence[jax.Array], boxes: jax.Array,
                         batch_index: jax.Array,
                         strides: Sequence[int] = (4, 8, 16, 32),
                         output_size=7, sampling_ratio: int = 2,
                         canonical_scale: float = 224.0,
                         canonical_level: int = 4) -> jax.Array:
  """MultiScaleRoIAlign over FPN maps (NHWC, finest first) of the given
  strides (powers of two): spatial scale 1 / stride per map, the level of
  each RoI from map_levels. boxes (K, 4), batch_index (K,). Every RoI reads
  its own level from one flattened array. Returns (K, out_h, out_w, C).

  torchvision infers the scales as 2**round(log2(map size / largest
  unpadded image size)); that is 1 / stride whenever the unpadded images
  fill the canvas to within a factor sqrt(2) (always with its own
  transform, which pads by less than 32 pixels).
  """
  if isinstance(output_size, int):
    output_size = (output_size, output_size)
  b = features[0].shape[0]
  k_min = int(round(math.log2(strides[0])))
  k_max = int(round(math.log2(strides[-1])))
  level = map_levels(boxes, k_min, k_max, canonical_scale, canonical_level)
  sizes = [(f.shape[1], f.shape[2]) for f in features]
  starts = np.cumsum([0] + [b * h * w for h, w in sizes])[:-1]
  table = lambda values, dtype: jnp.asarray(np.asarray(values), dtype)[level]
  height = table([h for h, _ in sizes], jnp.int32)
  width = table([w for _, w in sizes], jnp.int32)
  base = table(starts, jnp.int32) + batch_index * height * width
  scale = table([1.0 / s for s in strides], boxes.dtype)
  flat = jnp.concatenate([f.reshape(-1, f.shape[-1]) for f in features], 0)
  return _roi_align_flat(flat, base, height, width, scale, boxes,
                         tuple(output_size), sampling_ratio, False)
