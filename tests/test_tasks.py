"""The task heads without torch: shapes, train mode, losses and metrics,
and the weight mapping (export -> import round trip)."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax.errors import UserError
from tcr_jax.tasks import checkpoint_io
from tcr_jax.tasks import (DeepLabV3ResNet50, LRASPPMobileNetV3, losses,
                           torchvision_import as ti)

SIZE = (32, 64)
_abstract = ti.abstract_variables


def _jit(fn):
  """jax.jit with XLA's CPU backend optimisation off (faster compiles)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _random_variables(module, seed=0):
  """Random variables of the right shapes, drawn with numpy (compiling the
  Flax initialisers of a whole ResNet takes far longer on CPU)."""
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = np.prod(leaf.shape[:-1])
      value = rng.randn(*leaf.shape) / np.sqrt(fan_in)
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = 0.1 * rng.randn(*leaf.shape)
    return value.astype(np.float32)

  abstract = _abstract(module)
  return jax.tree_util.tree_map_with_path(draw, abstract)


# ------------------------------------------------------------------ models


def test_output_shapes():
  x = jax.ShapeDtypeStruct((2, *SIZE, 3), jnp.float32)
  for module, keys in [(LRASPPMobileNetV3(num_classes=1), {"out"}),
                       (DeepLabV3ResNet50(num_classes=20), {"out", "aux"}),
                       (DeepLabV3ResNet50(num_classes=20, aux_loss=False),
                        {"out"})]:
    variables = _abstract(module)
    out = jax.eval_shape(
        lambda v, x, m=module: m.apply(v, x, train=False), variables, x)
    assert set(out) == keys
    for key in keys:
      assert out[key].shape == (2, *SIZE, module.num_classes)


def test_backbone_feature_shapes():
  x = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
  for arch, expected in [
      ("mobilenet_v3_large", {"low": (1, 8, 12, 40), "high": (1, 4, 6, 960)}),
      ("resnet50", {"aux": (1, 8, 12, 1024), "out": (1, 8, 12, 2048)})]:
    module = ti.ARCHS[arch].build(0, False)
    variables = _abstract(module)
    out = jax.eval_shape(lambda v, x, m=module: m.apply(v, x), variables, x)
    assert {k: v.shape for k, v in out.items()} == expected


def test_parameter_counts():
  """torchvision's numbers (num_params in its weights' metadata)."""
  counts = {}
  for name, module in [("lraspp21", LRASPPMobileNetV3(num_classes=21)),
                       ("deeplab21", DeepLabV3ResNet50(num_classes=21))]:
    counts[name] = ti.count_params(_abstract(module))
  assert counts == {"lraspp21": 3_221_538, "deeplab21": 42_004_074}


def test_a_narrower_deeplab_scales_every_layer():
  """width 1/8: every conv of the backbone and heads an eighth as wide (at
  least 8 channels), about 1/64 of the parameters; the same outputs."""
  full = _abstract(DeepLabV3ResNet50(num_classes=20))
  narrow_module = DeepLabV3ResNet50(num_classes=20, width=0.125)
  narrow = _abstract(narrow_module)
  assert jax.tree_util.tree_structure(full) == jax.tree_util.tree_structure(narrow)
  kernels = [(path, a.shape, b.shape) for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(full["params"])[0],
      jax.tree_util.tree_leaves(narrow["params"])) if path[-1].key == "kernel"]
  for path, a, b in kernels:
    if "logits" not in str(path):
      assert b[-1] == max(8, a[-1] // 8), (path, a, b)
  ratio = ti.count_params(full) / ti.count_params(narrow)
  assert 40 < ratio < 70, ratio
  x = jax.ShapeDtypeStruct((2, *SIZE, 3), jnp.float32)
  out = jax.eval_shape(lambda v, x: narrow_module.apply(v, x), narrow, x)
  assert out["out"].shape == out["aux"].shape == (2, *SIZE, 20)


def test_lraspp_train_mode_updates_batch_stats_and_eval_does_not():
  module = LRASPPMobileNetV3(num_classes=1)
  variables = _random_variables(module)
  x = jnp.asarray(np.random.RandomState(1).randn(2, *SIZE, 3), jnp.float32)

  @_jit
  def both(variables, x):
    train_out, state = module.apply(variables, x, train=True,
                                    mutable=["batch_stats"])
    eval_out = module.apply(variables, x, train=False)
    return train_out, state["batch_stats"], eval_out

  train_out, new_stats, eval_out = both(variables, x)
  assert train_out["out"].shape == eval_out["out"].shape == (2, *SIZE, 1)
  assert np.all(np.isfinite(train_out["out"]))
  old = jax.tree.leaves(variables["batch_stats"])
  new = jax.tree.leaves(new_stats)
  assert len(old) == len(new)
  assert all(not np.allclose(a, b) for a, b in zip(old, new))
  # Batch statistics differ from the running ones, so do the outputs.
  assert not np.allclose(train_out["out"], eval_out["out"])


def test_batchnorm_running_stats_follow_torch():
  """Momentum (Flax convention) and the unbiased running variance."""
  from tcr_jax.tasks.layers import BatchNorm  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.RandomState(2).randn(2, 3, 5, 4), jnp.float32)
  bn = BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, state = bn.apply(variables, x, mutable=["batch_stats"])
  xs = np.asarray(x).reshape(-1, 4)
  np.testing.assert_allclose(state["batch_stats"]["mean"],
                             0.1 * xs.mean(0), rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"],
                             0.9 + 0.1 * xs.var(0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(
      y, ((xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5)).reshape(x.shape),
      rtol=1e-4, atol=1e-5)


def test_deeplab_dropout_needs_rng_only_when_enabled():
  module = DeepLabV3ResNet50(num_classes=3, dropout=False)
  variables = _abstract(module)
  x = jax.ShapeDtypeStruct((2, *SIZE, 3), jnp.float32)
  jax.eval_shape(lambda v, x: module.apply(v, x, train=True,
                                           mutable=["batch_stats"]), variables, x)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda v, x: module.clone(dropout=True).apply(
        v, x, train=True, mutable=["batch_stats"]), variables, x)


# ---------------------------------------------------------- weight mapping


@pytest.mark.parametrize("arch", list(ti.ARCHS))
def test_export_import_round_trip(arch):
  """Every variable has a torchvision name, and the names invert."""
  module = ti.ARCHS[arch].build(21, True)
  variables = _random_variables(module, seed=3)
  state_dict = ti.export_state_dict(arch, variables)
  result = ti.convert_state_dict(arch, state_dict)
  assert result.module == module
  assert result.reinitialised == [] and result.dropped == []
  jax.tree.map(np.testing.assert_array_equal, result.variables, variables)


def test_torch_names_and_layouts():
  module = LRASPPMobileNetV3(num_classes=1)
  variables = _random_variables(module)
  sd = ti.export_state_dict("lraspp_mobilenet_v3_large", variables)
  # Squeeze width make_divisible(72 // 4, 8) = 24; depthwise (C, 1, k, k).
  assert sd["backbone.4.block.2.fc1.weight"].shape == (24, 72, 1, 1)
  assert sd["backbone.4.block.1.0.weight"].shape == (72, 1, 5, 5)
  assert sd["backbone.1.block.0.0.weight"].shape == (16, 1, 3, 3)  # no expand
  assert sd["backbone.16.0.weight"].shape == (960, 160, 1, 1)
  assert sd["classifier.scale.1.weight"].shape == (128, 960, 1, 1)
  dl = ti.export_state_dict("deeplabv3_resnet50", _random_variables(
      DeepLabV3ResNet50(num_classes=20)))
  assert dl["classifier.0.convs.4.1.weight"].shape == (256, 2048, 1, 1)
  assert dl["classifier.0.project.0.weight"].shape == (256, 1280, 1, 1)
  assert dl["backbone.layer3.0.downsample.0.weight"].shape == (1024, 512, 1, 1)
  assert dl["aux_classifier.4.weight"].shape == (20, 256, 1, 1)
  assert "backbone.layer3.1.downsample.0.weight" not in dl


def test_import_errors_name_every_key():
  module = LRASPPMobileNetV3(num_classes=1)
  sd = ti.export_state_dict("lraspp_mobilenet_v3_large",
                            _random_variables(module))
  del sd["backbone.0.1.running_mean"]
  sd["backbone.0.2.weight"] = np.zeros(3, np.float32)
  sd["classifier.cbr.0.weight"] = np.zeros((128, 960, 3, 3), np.float32)
  for i in range(12):
    sd[f"extra.{i}"] = np.zeros(1, np.float32)
  with pytest.raises(UserError) as info:
    ti.load_torchvision("lraspp_mobilenet_v3_large", sd)
  msg = str(info.value)
  assert "\n" not in msg
  assert "missing keys: backbone.0.1.running_mean" in msg
  assert "unexpected keys: backbone.0.2.weight" in msg and "... and 5 more" in msg
  assert "mis-shaped keys: classifier.cbr.0.weight [128, 960, 3, 3]" in msg
  with pytest.raises(UserError, match="lraspp_mobilenet_v3_large, deeplabv3"):
    ti.load_torchvision("vgg16", sd)
  with pytest.raises(UserError, match="not tensors"):
    ti.load_torchvision("resnet50", {"conv1.weight": "abc"})


def test_backbone_into_segmentation_model():
  backbone = ti.ARCHS["mobilenet_v3_large"].build(0, False)
  backbone_vars = _random_variables(backbone, seed=4)
  imagenet_sd = ti.export_state_dict("mobilenet_v3_large", backbone_vars)
  imagenet_sd["classifier.0.weight"] = np.zeros((1280, 960), np.float32)
  imagenet_sd["classifier.3.weight"] = np.zeros((1000, 1280), np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # dropping classifier.* is no warning
    _, loaded = ti.load_torchvision("mobilenet_v3_large", imagenet_sd)
  module, variables = ti.backbone_to_segmentation_variables(
      "lraspp_mobilenet_v3_large", loaded, num_classes=1)
  assert module == LRASPPMobileNetV3(num_classes=1)
  for col in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, variables[col]["backbone"],
                 backbone_vars[col])
  expected = jax.tree.map(lambda s: s.shape, _abstract(module))
  assert jax.tree.map(np.shape, variables) == expected
  with pytest.raises(UserError, match="resnet50"):
    ti.backbone_to_segmentation_variables("deeplabv3_resnet50", loaded, 20)
  with pytest.raises(UserError, match="arch mobilenet_v3_large"):
    ti.load_torchvision("lraspp_mobilenet_v3_large", imagenet_sd)


def test_load_checkpoint_rejects_other_directories(tmp_path):
  with pytest.raises(UserError, match="not a tcr-jax"):
    checkpoint_io.load_checkpoint(str(tmp_path))


# ------------------------------------------------------------------ losses


def test_depth_loss_is_masked_rmse_in_pixels():
  pred = jnp.array([[[10.0, 20.0], [30.0, 40.0]]])
  target = jnp.array([[[13.0, 16.0], [30.0, 1000.0]]])
  valid = jnp.array([[[True, True], [True, False]]])
  # Valid errors 3, -4, 0: RMSE sqrt(25 / 3); the invalid pixel is ignored.
  expected = np.sqrt(25.0 / 3.0)
  np.testing.assert_allclose(losses.depth_loss(pred, target, valid), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(
      losses.depth_loss(pred[..., None], target[..., None], valid), expected,
      rtol=1e-6)
  # 128 * sqrt(MSE on disparity / 128) is the same number.
  mse = np.mean(((np.array([10, 20, 30]) - [13, 16, 30]) / 128.0) ** 2)
  np.testing.assert_allclose(expected, 128 * np.sqrt(mse), rtol=1e-6)


def test_depth_loss_guards_zero_valid_pixels():
  pred = jnp.ones((1, 2, 2))
  none_valid = jnp.zeros((1, 2, 2), bool)
  assert float(losses.depth_loss(pred, pred * 5, none_valid)) == 0.0
  grad = jax.grad(lambda p: losses.depth_loss(p, p * 5, none_valid))(pred)
  assert np.all(np.isfinite(grad))
  exact = jax.grad(lambda p: losses.depth_loss(p, jnp.ones((1, 2, 2))))(pred)
  assert np.all(np.isfinite(exact))  # zero error: no NaN from sqrt'(0)


def test_segmentation_loss_ignores_ignore_index():
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(2, 4, 5, 3), jnp.float32)
  aux = jnp.asarray(rng.randn(2, 4, 5, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 3, (2, 4, 5)))
  labels = labels.at[0, 0].set(255).at[1, :, 2].set(255)
  ignored = (labels == 255)[..., None]
  loss = losses.segmentation_loss({"out": logits, "aux": aux}, labels, 3, 255)
  changed = losses.segmentation_loss(
      {"out": jnp.where(ignored, 100.0, logits),
       "aux": jnp.where(ignored, -50.0, aux)}, labels, 3, 255)
  np.testing.assert_allclose(loss, changed, rtol=1e-6)

  def ce(x):  # by hand, over the kept pixels
    logp = jax.nn.log_softmax(x, -1)
    keep = np.asarray(labels != 255)
    picked = np.take_along_axis(np.asarray(logp), np.asarray(
        jnp.where(labels == 255, 0, labels))[..., None], -1)[..., 0]
    return -picked[keep].mean()

  np.testing.assert_allclose(loss, 3 * (ce(logits) + 0.5 * ce(aux)), rtol=1e-5)
  np.testing.assert_allclose(
      losses.segmentation_loss({"out": logits}, labels, 3, 255),
      3 * ce(logits), rtol=1e-5)
  all_ignored = jnp.full((2, 4, 5), 255)
  assert float(losses.segmentation_loss({"out": logits}, all_ignored, 3, 255)) == 0.0


def test_confusion_matrix_and_miou():
  labels = jnp.array([[0, 0, 1, 1, 2, 255]])
  pred = jnp.array([[0, 1, 1, 1, 0, 2]])
  conf = jax.jit(losses.confusion_matrix, static_argnums=(2, 3))(
      pred, labels, 4, 255)
  np.testing.assert_array_equal(conf, [[1, 1, 0, 0],
                                       [0, 2, 0, 0],
                                       [1, 0, 0, 0],
                                       [0, 0, 0, 0]])
  # IoU: class 0: 1/3, class 1: 2/3, class 2: 0/1; class 3 absent: left out.
  np.testing.assert_allclose(losses.miou(conf), (1 / 3 + 2 / 3 + 0) / 3,
                             rtol=1e-6)
  # An ignore index that is a model class (the paper's class 19 of 20).
  conf = losses.confusion_matrix(pred, jnp.array([[0, 0, 1, 1, 2, 2]]), 3, 2)
  np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
  # IoU: class 0: 1/2, class 1: 2/3; class 2 (ignored) left out.
  np.testing.assert_allclose(losses.miou(conf, ignore_index=2),
                             (1 / 2 + 2 / 3) / 2, rtol=1e-6)


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1),
                                                    (5, 2, 1), (5, 1, 2)])
def test_depthwise_conv_shifts_equal_the_grouped_convolution(kernel, stride,
                                                             dilation):
  """The CPU path (shifted windows) against lax's grouped convolution, values
  and gradients, on odd sizes so that strides drop a border."""
  from tcr_jax.tasks.layers import depthwise_conv
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 11, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, 1, 6)), jnp.float32)
  pad = (kernel - 1) // 2 * dilation

  def f(x, w, shifts):
    y = depthwise_conv(x, w, stride, dilation, pad, shifts)
    return jnp.sum(jnp.sin(y)), y

  (_, y0), g0 = jax.value_and_grad(f, (0, 1), has_aux=True)(x, w, False)
  (_, y1), g1 = jax.value_and_grad(f, (0, 1), has_aux=True)(x, w, True)
  assert y0.shape == y1.shape
  np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_has_the_variables_of_a_grouped_nn_conv():
  """Same names, shapes and initial values as nn.Conv(feature_group_count=C):
  checkpoints and the torchvision import cannot tell them apart."""
  import flax.linen as nn
  from tcr_jax.tasks.layers import DepthwiseConv, conv2d
  x = jnp.ones((1, 8, 8, 12))
  dw = conv2d(12, 5, stride=2, groups=12)
  assert isinstance(dw, DepthwiseConv)
  ref = nn.Conv(12, (5, 5), strides=(2, 2), padding=((2, 2), (2, 2)),
                feature_group_count=12, use_bias=False,
                kernel_init=dw.kernel_init)
  v, v_ref = dw.init(jax.random.key(3), x), ref.init(jax.random.key(3), x)
  assert jax.tree.structure(v) == jax.tree.structure(v_ref)
  np.testing.assert_array_equal(v["params"]["kernel"], v_ref["params"]["kernel"])
  np.testing.assert_allclose(dw.apply(v, x), ref.apply(v_ref, x), rtol=1e-5,
                             atol=1e-5)
