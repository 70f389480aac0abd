"""The detection operators: NMS, RoIAlign, box coding, anchors, matcher and
sampler. Torch-free tests check them against small numpy references and
the rules they implement; the parity tests (marked) against torchvision."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax.tasks import detection_ops as ops


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _random_boxes(rng, n, extent=100.0, mean_size=20.0):
  """Boxes partly outside [0, extent], sizes from tiny to large."""
  xy = rng.uniform(-0.2 * extent, extent, (n, 2))
  wh = rng.exponential(mean_size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def _iou_np(box, boxes):
  """IoU of one box with many, the torchvision kernel's formula in float32."""
  area = (box[2] - box[0]) * (box[3] - box[1])
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  w = np.maximum(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0)
  h = np.maximum(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0)
  inter = w * h
  with np.errstate(invalid="ignore", divide="ignore"):
    return inter / (area + areas - inter)


def _greedy_nms(boxes, scores, threshold, categories=None, valid=None):
  """Reference: visit boxes by descending score, keep the unsuppressed."""
  n = len(boxes)
  categories = np.zeros(n, int) if categories is None else categories
  suppressed = np.zeros(n, bool) if valid is None else ~valid
  keep = []
  for i in np.argsort(-scores, kind="stable"):
    if suppressed[i]:
      continue
    keep.append(i)
    suppressed |= (_iou_np(boxes[i], boxes) > threshold) & (categories == categories[i])
  return np.array(keep, np.int64)


# -------------------------------------------------------------------- NMS


@pytest.mark.parametrize("n,threshold,tile", [(1, 0.5, 256), (37, 0.3, 4),
                                              (300, 0.5, 16), (900, 0.7, 256)])
def test_nms_equals_greedy_reference(n, threshold, tile):
  """Exact greedy order across tiles (small tiles give suppression chains
  that cross tile borders and need several rounds within a tile)."""
  rng = np.random.RandomState(n)
  boxes = _random_boxes(rng, n, extent=60.0 if tile < 256 else 100.0)
  scores = rng.rand(n).astype(np.float32)
  expected = _greedy_nms(boxes, scores, threshold)
  fn = jax.jit(functools.partial(ops.batched_nms, iou_threshold=threshold,
                                 max_output_size=n, tile=tile))
  got = np.asarray(fn(boxes, scores, np.zeros(n, np.int32)))
  np.testing.assert_array_equal(got[:len(expected)], expected)
  assert np.all(got[len(expected):] == -1)


def test_nms_output_size_categories_and_validity():
  rng = np.random.RandomState(1)
  n = 400
  boxes = _random_boxes(rng, n, extent=50.0)
  scores = rng.rand(n).astype(np.float32)
  cats = rng.randint(0, 4, n)
  valid = rng.rand(n) > 0.3
  expected = _greedy_nms(boxes, scores, 0.5, cats, valid)
  assert len(expected) > 20
  got = np.asarray(ops.batched_nms(boxes, scores, cats, 0.5, 20, valid, tile=32))
  np.testing.assert_array_equal(got, expected[:20])  # stops at 20 kept
  got = np.asarray(ops.nms(boxes, scores, 0.5, n + 5))
  expected = _greedy_nms(boxes, scores, 0.5)
  np.testing.assert_array_equal(got[:len(expected)], expected)
  assert got.shape == (n + 5,) and np.all(got[len(expected):] == -1)
  # No boxes at all, or none valid: nothing kept.
  assert list(np.asarray(ops.nms(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 3))) == [-1] * 3
  none = ops.batched_nms(boxes, scores, cats, 0.5, 4, jnp.zeros(n, bool))
  assert list(np.asarray(none)) == [-1] * 4


# --------------------------------------------------------------- RoIAlign


def _linear_roi_align(slopes, offsets, rois, h, w, out, scale, ratio, aligned):
  """RoIAlign of a map that is linear in (y, x): bilinear sampling is exact
  there, so each sample is the linear function at the clamped point, or 0
  outside [-1, H] x [-1, W]. Written from the definition, in float64."""
  result = np.zeros((len(rois), out, out, slopes.shape[1]))
  off = 0.5 if aligned else 0.0
  for k, (b, x1, y1, x2, y2) in enumerate(rois.astype(np.float64)):
    x0, y0 = x1 * scale - off, y1 * scale - off
    rw, rh = x2 * scale - off - x0, y2 * scale - off - y0
    if not aligned:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    for p in range(out):
      for q in range(out):
        acc = 0.0
        for i in range(ratio):
          for j in range(ratio):
            y = y0 + p * rh / out + (i + 0.5) * rh / out / ratio
            x = x0 + q * rw / out + (j + 0.5) * rw / out / ratio
            if -1 <= y <= h and -1 <= x <= w:
              yc, xc = min(max(y, 0), h - 1), min(max(x, 0), w - 1)
              acc = acc + slopes[0] * yc + slopes[1] * xc + offsets[int(b)]
        result[k, p, q] = acc / ratio ** 2
  return result


@pytest.mark.parametrize("scale,ratio,aligned", [(0.25, 2, False), (0.5, 1, True),
                                                 (0.125, 3, False)])
def test_roi_align_on_linear_maps(scale, ratio, aligned):
  rng = np.random.RandomState(2)
  b, h, w, c = 2, 9, 13, 3
  slopes, offsets = rng.randn(2, c), rng.randn(b, c)
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  feats = (slopes[0] * yy[..., None] + slopes[1] * xx[..., None])[None] + offsets[:, None, None]
  rois = np.concatenate([rng.randint(0, b, (40, 1)),
                         _random_boxes(rng, 40, extent=w / scale)], 1)
  rois[0, 1:] = [-30, -30, 2 * w / scale, 2 * h / scale]  # covers everything
  rois[1, 1:] = [3, 3, 3.2, 3.1]                           # tiny
  expected = _linear_roi_align(slopes, offsets, rois, h, w, 5, scale, ratio, aligned)
  got = ops.roi_align(jnp.asarray(feats, jnp.float32), jnp.asarray(rois, jnp.float32),
                      5, scale, ratio, aligned)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_roi_align_needs_a_fixed_sampling_ratio_and_takes_no_rois():
  with pytest.raises(ValueError, match="sampling_ratio"):
    ops.roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 5)), 2, 1.0, 0)
  assert ops.roi_align(jnp.ones((1, 4, 4, 3)), jnp.zeros((0, 5)), 2).shape == (0, 2, 2, 3)


def test_level_mapping_follows_the_fpn_rule():
  side = np.array([1.0, 111.0, 112.0, 223.0, 224.0, 447.0, 448.0, 1000.0])
  boxes = jnp.asarray(np.stack([0 * side, 0 * side, side, side], 1), jnp.float32)
  expected = np.clip(np.floor(4 + np.log2(side / 224) + 1e-6), 2, 5) - 2
  np.testing.assert_array_equal(ops.map_levels(boxes), expected)
  # Degenerate boxes (zero or negative area) go to the finest level.
  assert list(np.asarray(ops.map_levels(jnp.array([[0., 0, 0, 0], [5, 5, 1, 1]])))) == [0, 0]


# ------------------------------------------------- boxes, anchors, match


def test_box_coding_round_trip_and_clamp():
  rng = np.random.RandomState(3)
  props = _random_boxes(rng, 50) + np.array([0, 0, 1, 1], np.float32)
  gt = _random_boxes(rng, 50) + np.array([0, 0, 1, 1], np.float32)
  weights = (10.0, 10.0, 5.0, 5.0)
  codes = ops.encode_boxes(gt, props, weights)
  back = ops.decode_boxes(codes[:, None], props, weights)[:, 0]
  np.testing.assert_allclose(back, gt, rtol=1e-4, atol=1e-3)
  huge = ops.decode_boxes(jnp.array([[[0.0, 0.0, 100.0, 100.0]]]),
                          jnp.array([[0.0, 0.0, 16.0, 8.0]]), (1, 1, 1, 1))
  np.testing.assert_allclose(huge[0, 0], [-492, -246, 508, 254], rtol=1e-5)


def test_clip_and_size_filter():
  boxes = jnp.array([[-5.0, 2.0, 300.0, 50.0], [10.0, 10.0, 10.0005, 20.0]])
  clipped = ops.clip_boxes(boxes, jnp.array([40, 200]))
  np.testing.assert_array_equal(clipped[0], [0, 2, 200, 40])
  assert list(np.asarray(ops.large_enough(clipped, 1e-3))) == [True, False]


def test_anchors_rounding_order_and_strides():
  cell = ops.cell_anchors(32, (0.5, 1.0, 2.0))
  # h = s * sqrt(r), w = s / sqrt(r): 22.6 x 45.3 -> half sizes 11.3, 22.6.
  np.testing.assert_array_equal(cell, [[-23, -11, 23, 11], [-16, -16, 16, 16],
                                       [-11, -23, 11, 23]])
  grid = ops.grid_anchors((800, 1344), (13, 21), cell)  # the pool level
  assert grid.shape == (13 * 21 * 3, 4)
  np.testing.assert_array_equal(grid[3], cell[0] + [64, 0, 64, 0])   # x = 1
  np.testing.assert_array_equal(grid[21 * 3], cell[0] + [0, 61, 0, 61])  # y = 1


def test_matcher_thresholds_low_quality_and_padding():
  iou = jnp.array([[0.9, 0.5, 0.1, 0.2, 0.0, 0.6],
                   [0.1, 0.65, 0.6, 0.0, 0.0, 0.6],
                   [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])  # a padded row
  valid = jnp.array([True, True, False])
  m = ops.match(iou, valid, 0.7, 0.3, allow_low_quality_matches=False)
  np.testing.assert_array_equal(m, [0, -2, -2, -1, -1, -2])
  m = ops.match(iou, valid, 0.7, 0.3, allow_low_quality_matches=True)
  # Row 1's best (0.65) is element 1; element 0 is row 0's best anyway.
  np.testing.assert_array_equal(m, [0, 1, -2, -1, -1, -2])
  none = ops.match(iou, jnp.zeros(3, bool), 0.7, 0.3, True)
  assert np.all(np.asarray(none) == ops.BELOW_LOW_THRESHOLD)


def test_balanced_sampler_counts_and_uniformity():
  rng = np.random.RandomState(4)
  labels = jnp.asarray(rng.choice([-1, 0, 1, 3], size=500, p=[0.2, 0.7, 0.05, 0.05]))
  pos, neg = int(np.sum(labels >= 1)), int(np.sum(labels == 0))
  sample = jax.jit(functools.partial(ops.sample_balanced, num_samples=128,
                                     positive_fraction=0.5))
  counts = np.zeros(500)
  for seed in range(60):
    idx, valid = map(np.asarray, sample(jax.random.key(seed), labels))
    chosen = idx[valid]
    assert len(set(chosen)) == len(chosen) == min(pos, 64) + min(neg, 128 - min(pos, 64))
    lab = np.asarray(labels)[chosen]
    npos = min(pos, 64)
    assert np.all(lab[:npos] >= 1) and np.all(lab[npos:] == 0)
    counts[chosen] += 1
  # Every positive is taken (fewer than 64); negatives uniformly often.
  assert np.all(counts[np.asarray(labels) >= 1] == 60)
  assert np.all(counts[np.asarray(labels) < 0] == 0)
  neg_counts = counts[np.asarray(labels) == 0]
  expected = 60 * (128 - pos) / neg
  assert abs(neg_counts.mean() - expected) < 1e-6
  assert neg_counts.std() < 3 * np.sqrt(expected)
  # Few samples wanted: the positive fraction caps the positives.
  idx, valid = sample(jax.random.key(0), jnp.where(labels == 0, 1, labels))
  assert int(np.sum(np.asarray(jnp.where(labels == 0, 1, labels))[np.asarray(idx)[np.asarray(valid)]] >= 1)) == 64


# ------------------------------------------------ parity with torchvision


@pytest.fixture(scope="module")
def tv():
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  return torch, torchvision


@pytest.mark.parity
def test_nms_matches_torchvision(tv):
  torch, torchvision = tv
  rng = np.random.RandomState(5)
  for n, threshold in [(5, 0.5), (700, 0.3), (1500, 0.7)]:
    boxes = _random_boxes(rng, n)
    scores = rng.rand(n).astype(np.float32)
    cats = rng.randint(0, 6, n)
    ref = torchvision.ops.nms(torch.from_numpy(boxes), torch.from_numpy(scores),
                              threshold).numpy()
    got = np.asarray(ops.nms(boxes, scores, threshold, n))
    np.testing.assert_array_equal(got[:len(ref)], ref)
    assert np.all(got[len(ref):] == -1)
    ref = torchvision.ops.batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(cats),
        threshold).numpy()
    got = np.asarray(ops.batched_nms(boxes, scores, cats, threshold, 100))
    np.testing.assert_array_equal(got[:min(len(ref), 100)], ref[:100])


@pytest.mark.parity
@pytest.mark.parametrize("scale,ratio,aligned", [(0.25, 2, False), (0.5, 1, True),
                                                 (0.125, 3, False), (1.0, 2, True)])
def test_roi_align_matches_torchvision(tv, scale, ratio, aligned):
  torch, torchvision = tv
  rng = np.random.RandomState(6)
  feats = rng.randn(3, 5, 20, 28).astype(np.float32)
  rois = np.concatenate([rng.randint(0, 3, (300, 1)).astype(np.float32),
                         _random_boxes(rng, 300, extent=28 / scale)], 1)
  rois[:4, 1:] = [[1, 1, 1.2, 1.3], [-500, -500, 4000, 4000],
                  [27 / scale, 19 / scale, 40 / scale, 30 / scale], [5, 5, 3, 3]]
  ref = torchvision.ops.roi_align(torch.from_numpy(feats), torch.from_numpy(rois),
                                  (7, 6), scale, ratio, aligned).numpy()
  got = ops.roi_align(jnp.asarray(feats.transpose(0, 2, 3, 1)), jnp.asarray(rois),
                      (7, 6), scale, ratio, aligned)
  got = np.asarray(got).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)


@pytest.mark.parity
def test_multiscale_roi_align_matches_torchvision(tv):
  torch, torchvision = tv
  rng = np.random.RandomState(7)
  h, w = 128, 192
  feats = {str(i): torch.from_numpy(rng.randn(2, 4, h // s, w // s).astype(np.float32))
           for i, s in enumerate((4, 8, 16, 32))}
  boxes = [torch.from_numpy(np.clip(_random_boxes(rng, 60, 192, 60), 0, 192))
           for _ in range(2)]
  boxes[0][:3] = torch.tensor([[0, 0, 192, 128], [10, 10, 12, 11], [0, 0, 112, 112]])
  pooler = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2)
  ref = pooler(feats, boxes, [(h, w), (h, w)]).numpy()
  got = ops.multiscale_roi_align(
      [jnp.asarray(f.numpy().transpose(0, 2, 3, 1)) for f in feats.values()],
      jnp.concatenate([jnp.asarray(b.numpy()) for b in boxes]),
      jnp.repeat(jnp.arange(2), 60))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), ref,
                             rtol=1e-5, atol=2e-5)


@pytest.mark.parity
def test_box_ops_anchors_and_matcher_match_torchvision(tv):
  torch, torchvision = tv
  from torchvision.models.detection import _utils as det_utils  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.anchor_utils import AnchorGenerator  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.image_list import ImageList  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(8)
  a = _random_boxes(rng, 40) + np.array([0, 0, 1, 1], np.float32)
  b = _random_boxes(rng, 30) + np.array([0, 0, 1, 1], np.float32)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  np.testing.assert_allclose(ops.box_iou(a, b), torchvision.ops.box_iou(ta, tb),
                             rtol=1e-6, atol=1e-7)
  coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))
  np.testing.assert_allclose(ops.encode_boxes(a[:30], b, (10, 10, 5, 5)),
                             coder.encode_single(ta[:30], tb), rtol=1e-5, atol=1e-5)
  codes = rng.randn(30, 3 * 4).astype(np.float32) * 3
  np.testing.assert_allclose(
      ops.decode_boxes(codes.reshape(30, 3, 4), b, (10, 10, 5, 5)),
      coder.decode(torch.from_numpy(codes), [tb]).numpy(), rtol=1e-5, atol=1e-4)

  gen = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
  sizes = [(200, 336), (100, 168), (50, 84), (25, 42), (13, 21)]
  images = ImageList(torch.zeros(1, 3, 800, 1344), [(800, 1344)])
  ref = gen(images, [torch.zeros(1, 1, *s) for s in sizes])[0].numpy()
  got = np.concatenate(ops.level_anchors((800, 1344), sizes, (32, 64, 128, 256, 512),
                                         (0.5, 1.0, 2.0)))
  np.testing.assert_array_equal(got, ref)

  iou = torchvision.ops.box_iou(tb[:6], ta)
  padded = jnp.concatenate([jnp.asarray(iou.numpy()), jnp.ones((2, 40))])
  valid = jnp.array([True] * 6 + [False] * 2)
  for high, low, allow in [(0.7, 0.3, True), (0.5, 0.5, False), (0.2, 0.05, True)]:
    ref = det_utils.Matcher(high, low, allow)(iou.clone()).numpy()
    np.testing.assert_array_equal(ops.match(padded, valid, high, low, allow), ref)
