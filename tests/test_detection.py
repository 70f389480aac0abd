"""Faster R-CNN without torch: shapes, static-shape compilation, padding,
training (losses fall, batch statistics move), the frozen-layer mask and
the masked BatchNorm of the box head."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tcr_jax.tasks import FasterRCNN, trainable_mask, torchvision_import as ti
from tcr_jax.tasks.faster_rcnn import freeze_untrainable
from tcr_jax.tasks.layers import BatchNorm
from tcr_jax.tasks.roi_heads import MaskedBatchNorm

H, W = 128, 192
# Small proposal and sample counts keep the box head cheap on a CPU.
SMALL = dict(num_classes=4, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
             rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
             rpn_batch_size_per_image=64, box_batch_size_per_image=32,
             detections_per_img=30)


def _jit(fn, **kw):
  """jax.jit with XLA's CPU backend optimisation off (faster compiles)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


def _random_variables(module, seed=0):
  """Random variables drawn with numpy (far faster than compiling the Flax
  initialisers of a ResNet on a CPU), scaled so that eval mode stays
  finite and gives detections: He kernels, small last-BN scales in the
  residual branches, torchvision's small initialisations for the RPN head
  and the predictor."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    keys = [p.key for p in path]
    name, fan_in = keys[-1], np.prod(leaf.shape[:-1])
    if name == "kernel" and "rpn" in keys:
      value = 0.01 * rng.randn(*leaf.shape)
    elif name == "kernel" and "box_predictor" in keys:
      value = rng.uniform(-1, 1, leaf.shape) / np.sqrt(fan_in)
    elif name == "kernel":
      value = rng.randn(*leaf.shape) * np.sqrt(2.0 / fan_in)
    elif name == "scale":
      value = rng.uniform(0.1, 0.3, leaf.shape) if "bn3" in keys else (
          rng.uniform(0.5, 1.5, leaf.shape))
    elif name == "var":
      value = np.ones(leaf.shape)
    else:
      value = 0.1 * rng.randn(*leaf.shape)
    return jnp.asarray(value.astype(np.float32))

  return jax.tree_util.tree_map_with_path(draw, ti.abstract_variables(module))


def _scene(seed, batch=2, sizes=((H, W), (H, W))):
  """Images with a few flat-coloured rectangles (the objects) on noise,
  zero outside each image's size, and their padded targets (G = 3)."""
  rng = np.random.RandomState(seed)
  images = np.zeros((batch, H, W, 3), np.float32)
  boxes = np.zeros((batch, 3, 4), np.float32)
  labels = np.zeros((batch, 3), np.int32)
  mask = np.zeros((batch, 3), bool)
  for i, (h, w) in enumerate(sizes):
    images[i, :h, :w] = 0.1 * rng.rand(h, w, 3)
    for g in range(rng.randint(1, 4)):
      bw, bh = rng.randint(16, w // 2), rng.randint(16, h // 2)
      x0, y0 = rng.randint(0, w - bw), rng.randint(0, h - bh)
      boxes[i, g] = [x0, y0, x0 + bw, y0 + bh]
      labels[i, g] = 1 + g
      mask[i, g] = True
      images[i, y0:y0 + bh, x0:x0 + bw] = 0.2 + 0.3 * g
  return (images, np.array(sizes, np.int32),
          {"boxes": boxes, "labels": labels, "mask": mask})


@pytest.fixture(scope="module")
def small_model():
  module = FasterRCNN(**SMALL)
  return module, _random_variables(module)


def test_shapes_and_parameter_count():
  module = FasterRCNN()
  variables = ti.abstract_variables(module)
  # torchvision's num_params for fasterrcnn_resnet50_fpn_v2 (91 classes).
  assert ti.count_params(variables) == 43_712_278
  x = jax.ShapeDtypeStruct((2, 96, 160, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: module.apply(v, x), variables, x)
  assert {k: (v.shape, v.dtype) for k, v in out.items()} == {
      "boxes": ((2, 100, 4), jnp.float32), "scores": ((2, 100), jnp.float32),
      "labels": ((2, 100), jnp.int32)}
  targets = {"boxes": jnp.zeros((2, 7, 4)), "labels": jnp.zeros((2, 7), jnp.int32),
             "mask": jnp.zeros((2, 7), bool)}
  losses, state = jax.eval_shape(
      lambda v, x: module.apply(v, x, train=True, targets=targets,
                                rng=jax.random.key(0), mutable=["batch_stats"]),
      variables, x)
  assert set(losses) == {"loss_objectness", "loss_rpn_box_reg",
                         "loss_classifier", "loss_box_reg"}
  assert all(v.shape == () for v in losses.values())
  assert jax.tree.map(lambda s: s.shape, state["batch_stats"]) == jax.tree.map(
      lambda s: s.shape, variables["batch_stats"])


def test_input_checks():
  module = FasterRCNN()
  variables = ti.abstract_variables(module)
  with pytest.raises(ValueError, match="multiples of 32"):
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 100, 128, 3))), variables)
  with pytest.raises(ValueError, match="targets and rng"):
    jax.eval_shape(lambda v: module.apply(v, jnp.zeros((1, 64, 64, 3)), train=True,
                                          mutable=["batch_stats"]), variables)


def test_trainable_mask_freezes_what_torchvision_freezes():
  params = ti.abstract_variables(FasterRCNN())["params"]
  for layers, frozen_tops in [(3, {"conv1", "bn1", "layer1"}), (0, None),
                              (4, {"conv1", "bn1"}), (5, set())]:
    mask = trainable_mask(params, layers)
    body = params["backbone"]["body"]
    if frozen_tops is None:
      frozen_tops = set(body)
    for top in body:
      assert all(v != (top in frozen_tops) for v in jax.tree.leaves(mask["backbone"]["body"][top])), (layers, top)
    assert all(jax.tree.leaves(mask["backbone"]["fpn"]))
    assert all(jax.tree.leaves(mask["rpn"])) and all(jax.tree.leaves(mask["roi_heads"]))
  with pytest.raises(ValueError):
    trainable_mask(params, 6)
  # Wrapped optimiser: frozen leaves get no update, not even weight decay.
  small = {"backbone": {"body": {"conv1": {"kernel": jnp.ones(2)},
                                 "layer2": {"kernel": jnp.ones(2)}}},
           "rpn": {"bias": jnp.ones(2)}}
  tx = freeze_untrainable(optax.adamw(0.5, weight_decay=0.1), small)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, small), tx.init(small), small)
  new = optax.apply_updates(small, updates)
  assert np.all(np.asarray(new["backbone"]["body"]["conv1"]["kernel"]) == 1.0)
  assert np.all(np.asarray(new["backbone"]["body"]["layer2"]["kernel"]) < 1.0)
  assert np.all(np.asarray(new["rpn"]["bias"]) < 1.0)


def test_masked_batchnorm_uses_only_valid_rows():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(6, 3, 3, 4), jnp.float32)
  mask = jnp.array([True, False, True, True, False, True])
  masked = MaskedBatchNorm(use_running_average=False)
  plain = BatchNorm(use_running_average=False)
  variables = plain.init(jax.random.key(0), x[mask])
  variables = jax.tree.map(lambda v: v + 0.3, variables)
  want, want_state = plain.apply(variables, x[np.asarray(mask)], mutable=["batch_stats"])
  got, got_state = masked.apply(variables, x.at[~mask].set(100.0), mask,
                                mutable=["batch_stats"])
  np.testing.assert_allclose(got[np.asarray(mask)], want, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5),
               got_state, want_state)


def test_eval_compiles_once_and_ignores_the_padding(small_model):
  """One program for every batch of a canvas; pixels outside image_sizes
  do not matter and detections stay inside them."""
  module, variables = small_model
  traces = []

  def detect(variables, images, sizes):
    traces.append(images.shape)
    return module.apply(variables, images, sizes)

  detect = _jit(detect)
  x1, s1, _ = _scene(1)
  x2, s2, _ = _scene(2, sizes=((H, W), (96, 160)))
  d1 = detect(variables, x1, s1)
  d2 = detect(variables, x2, s2)
  x2_noisy = x2.copy()
  x2_noisy[1, 96:] = np.random.RandomState(3).rand(H - 96, W, 3)
  x2_noisy[1, :, 160:] = 1.0
  d3 = detect(variables, x2_noisy, s2)
  assert len(traces) == 1
  jax.tree.map(np.testing.assert_array_equal, d2, d3)
  for d, sizes in [(d1, s1), (d2, s2)]:
    scores = np.asarray(d["scores"])
    found = scores > 0
    assert found.sum(1).min() > 0
    assert np.all(np.diff(scores, axis=1) <= 0)           # by descending score
    assert np.all(np.asarray(d["labels"])[found] >= 1)
    assert np.all(np.asarray(d["labels"])[~found] == 0)
    boxes = np.asarray(d["boxes"])
    assert np.all(boxes[~found] == 0)
    for i, (h, w) in enumerate(sizes):
      b = boxes[i][found[i]]
      assert np.all(b >= 0) and np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h)
  # A different batch really gives different detections.
  assert not np.allclose(d1["boxes"], d2["boxes"])


def test_training_steps_lower_the_loss_with_one_compilation(small_model):
  module, variables = small_model
  images, sizes, targets = _scene(4, sizes=((H, W), (112, 160)))
  other = _scene(5)
  # The body stays frozen here (a cheaper program); FPN and heads train.
  body = variables["params"]["backbone"]["body"]
  rest = {k: v for k, v in variables["params"].items() if k != "backbone"}
  rest["fpn"] = variables["params"]["backbone"]["fpn"]
  tx = optax.adam(3e-4)
  traces = []

  def loss_fn(rest, stats, images, sizes, targets, key):
    params = {k: v for k, v in rest.items() if k != "fpn"}
    params["backbone"] = {"body": body, "fpn": rest["fpn"]}
    losses, state = module.apply({"params": params, "batch_stats": stats}, images,
                                 sizes, train=True, targets=targets, rng=key,
                                 mutable=["batch_stats"])
    return sum(losses.values()), (losses, state["batch_stats"])

  def step(rest, stats, opt_state, images, sizes, targets, key):
    traces.append(1)
    grads, (losses, stats) = jax.grad(loss_fn, has_aux=True)(
        rest, stats, images, sizes, targets, key)
    updates, opt_state = tx.update(grads, opt_state, rest)
    return optax.apply_updates(rest, updates), stats, opt_state, losses

  step = _jit(step)
  evaluate = _jit(loss_fn)
  key = jax.random.key(0)
  before, (losses0, new_stats) = evaluate(rest, variables["batch_stats"], images,
                                          sizes, targets, key)
  assert all(np.isfinite(float(v)) and float(v) > 0 for v in losses0.values())
  # Batch statistics move in train mode (backbone, FPN and box head BN).
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), new_stats,
                       variables["batch_stats"])
  assert all(jax.tree.leaves(moved))
  stats, opt_state = variables["batch_stats"], tx.init(rest)
  for i in range(8):
    batch = (images, sizes, targets) if i % 4 != 3 else other
    rest, stats, opt_state, losses = step(rest, stats, opt_state, *batch,
                                          jax.random.key(i))
    assert np.isfinite(float(sum(losses.values())))
  assert len(traces) == 1  # two batches of one canvas, one program
  after, _ = evaluate(rest, stats, images, sizes, targets, key)
  assert float(after) < 0.8 * float(before)


@pytest.mark.slow
def test_detection_benchmark_runs(capsys):
  from tcr_jax import bench  # pylint: disable=g-import-not-at-top
  code = bench.main(["detection", "--batch", "1", "--height", "64", "--width", "64",
                     "--steps", "1", "--modes", "infer", "--torch-modes", "none"])
  assert code == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [(r["impl"], r["mode"]) for r in rows] == [("tcr_jax", "infer")]
  assert rows[0]["images_per_s"] > 0 and rows[0]["height"] == 64
