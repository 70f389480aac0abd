"""Parity of the Flax task heads with torchvision (needs the parity extra).

torchvision models with a fixed seed and random weights (BN statistics
randomised too, so eval mode is not the identity) are converted with
tcr_jax.tasks.load_torchvision and compared on random inputs: eval mode at
two sizes (one not a multiple of 32), a train-mode forward with batch
statistics and the updated running statistics, and the gradient of the
task loss with respect to the first backbone convolution.
"""
from __future__ import annotations

import copy
import functools
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision.models import mobilenet_v3_large, resnet50  # noqa: E402
from torchvision.models import segmentation as tv_seg  # noqa: E402
from torchvision.models._utils import IntermediateLayerGetter  # noqa: E402

from tcr_jax import cli  # noqa: E402
from tcr_jax.errors import UserError  # noqa: E402
from tcr_jax.tasks import losses  # noqa: E402
from tcr_jax.tasks import checkpoint_io  # noqa: E402
from tcr_jax.tasks import torchvision_import as ti  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow]

SIZES = [(64, 128), (72, 136)]  # the second is not a multiple of 32
EVAL_TOL = 1e-4
GRAD_TOL = 1e-3
NUM_SEG_CLASSES, IGNORE_INDEX = 20, 19  # the paper's segmentation setting


@pytest.fixture(autouse=True)
def _highest_precision():
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  with jax.default_matmul_precision("highest"):
    yield


def _randomise_batchnorm(model, seed):
  """Random affine parameters and running statistics for every BN layer."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=gen))
        m.bias.copy_(0.2 * torch.randn(n, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
        m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
  return model


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nchw_to_nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _images(seed, size, batch=1):
  x = np.random.RandomState(seed).randn(batch, 3, *size).astype(np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def _jit(fn):
  """jax.jit with XLA's CPU backend optimisation off: halves the compile
  time of these one-off test programs on a 2-core CI machine (the
  tolerances below hold with or without it)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def _eval_fn(module):
  return _jit(lambda v, x: module.apply(v, x, train=False))


@pytest.fixture(scope="module")
def lraspp_torch():
  torch.manual_seed(0)
  model = tv_seg.lraspp_mobilenet_v3_large(
      weights=None, weights_backbone=None, num_classes=1)
  return _randomise_batchnorm(model, 1).eval()


@pytest.fixture(scope="module")
def deeplab_torch():
  torch.manual_seed(0)
  model = tv_seg.deeplabv3_resnet50(
      weights=None, weights_backbone=None, num_classes=NUM_SEG_CLASSES,
      aux_loss=True)
  return _randomise_batchnorm(model, 2).eval()


# --------------------------------------------------------------- eval mode


@pytest.mark.parametrize("size", SIZES)
def test_lraspp_eval_matches_torchvision(lraspp_torch, size):
  module, variables = ti.load_torchvision("lraspp_mobilenet_v3_large",
                                          lraspp_torch.state_dict())
  assert module.num_classes == 1
  xt, xj = _images(0, size)
  with torch.no_grad():
    ref = lraspp_torch(xt)
  out = _eval_fn(module)(variables, xj)
  assert set(out) == set(ref) == {"out"}
  assert out["out"].shape == (1, *size, 1)
  assert _rel(out["out"], _nchw_to_nhwc(ref["out"])) < EVAL_TOL


@pytest.mark.parametrize("size", SIZES)
def test_deeplabv3_eval_matches_torchvision(deeplab_torch, size):
  module, variables = ti.load_torchvision("deeplabv3_resnet50",
                                          deeplab_torch.state_dict())
  assert module.num_classes == NUM_SEG_CLASSES and module.aux_loss
  xt, xj = _images(1, size)
  with torch.no_grad():
    ref = deeplab_torch(xt)
  out = _eval_fn(module)(variables, xj)
  assert set(out) == set(ref) == {"out", "aux"}
  for key in ("out", "aux"):
    assert out[key].shape == (1, *size, NUM_SEG_CLASSES)
    assert _rel(out[key], _nchw_to_nhwc(ref[key])) < EVAL_TOL, key


# -------------------------------------------------- train mode and gradient
#
# Train mode: the forward with batch statistics and the updated running
# statistics (torch updates the variance with the unbiased estimate, as
# tcr_jax's BatchNorm does). Gradients are of the task loss w.r.t. the
# first backbone convolution. For DeepLabV3 the gradient is taken in eval
# mode: with random weights the train-mode gradient through ResNet-50's 53
# batch-normalised layers is ill-conditioned in float32 (torch's own float32
# gradient is 2% away from its float64 gradient), so no float32
# implementation can match another to 1e-3 there; LRASPP's train-mode
# gradient checks the BatchNorm backward instead.


def _train_copy(torch_model):
  """A train-mode copy with dropout off (its masks cannot be reproduced)."""
  model = copy.deepcopy(torch_model).train()
  for m in model.modules():
    if isinstance(m, torch.nn.Dropout):
      m.eval()
  return model


def _path(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _check_train_forward(arch, model, ref, out, new_stats, tolerances):
  """Outputs within tolerance; running statistics after the step as
  torch's within EVAL_TOL."""
  for key, tol in tolerances.items():
    assert _rel(out[key], _nchw_to_nhwc(ref[key])) < tol, key
  _, updated = ti.load_torchvision(arch, model.state_dict())
  ref_stats = dict(jax.tree_util.tree_leaves_with_path(updated["batch_stats"]))
  for path, value in jax.tree_util.tree_leaves_with_path(new_stats):
    assert _rel(value, ref_stats[path]) < EVAL_TOL, path


def _jax_loss_and_grad(module, variables, xj, loss, train, kernel_paths):
  """(loss(outputs), outputs, new batch_stats, [grad of each kernel path])."""
  def loss_fn(params):
    out, state = module.apply({"params": params,
                               "batch_stats": variables["batch_stats"]},
                              xj, train=train, mutable=["batch_stats"])
    return loss(out), (out, state["batch_stats"])

  def step(params):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Only the compared kernels: XLA drops the other weight gradients.
    return loss, aux, [_path(grads, p) for p in kernel_paths]

  loss, (out, new_stats), grads = _jit(step)(variables["params"])
  return loss, out, new_stats, grads


def test_lraspp_train_mode_and_depth_loss_gradient(lraspp_torch):
  rng = np.random.RandomState(4)
  disparity = rng.uniform(0, 100, (2, *SIZES[0])).astype(np.float32)
  valid = rng.uniform(size=(2, *SIZES[0])) > 0.3
  d_t, v_t = torch.from_numpy(disparity), torch.from_numpy(valid)
  xt, xj = _images(3, SIZES[0], batch=2)

  model = _train_copy(lraspp_torch)
  module, variables = ti.load_torchvision("lraspp_mobilenet_v3_large",
                                          model.state_dict())
  ref = model(xt)
  pred = ref["out"][:, 0]  # 128 * sqrt(masked MSE on disparity / 128)
  ref_loss = 128.0 * ((pred[v_t] - d_t[v_t]) / 128.0).square().mean().sqrt()
  ref_loss.backward()

  loss, out, new_stats, (grad,) = _jax_loss_and_grad(
      module, variables, xj,
      lambda out: losses.depth_loss(out["out"], disparity, valid), True,
      [("backbone", "stem", "conv", "kernel")])
  _check_train_forward("lraspp_mobilenet_v3_large", model, ref, out,
                       new_stats, {"out": EVAL_TOL})
  assert abs(float(loss) - ref_loss.item()) < 1e-5 * ref_loss.item()
  ref_grad = model.backbone["0"][0].weight.grad.numpy().transpose(2, 3, 1, 0)
  assert _rel(grad, ref_grad) < GRAD_TOL


def test_deeplabv3_train_mode_forward(deeplab_torch):
  xt, xj = _images(3, SIZES[0], batch=2)
  model = _train_copy(deeplab_torch)
  module, variables = ti.load_torchvision("deeplabv3_resnet50",
                                          model.state_dict())
  module = module.clone(dropout=False)
  with torch.no_grad():
    ref = model(xt)
  out, state = _jit(lambda v, x: module.apply(
      v, x, train=True, mutable=["batch_stats"]))(variables, xj)
  # The ASPP image-pooling branch batch-normalises 2 values per channel
  # (batch 2, one pooled pixel each): torch's own float32 "out" is 1.4e-4
  # away from its float64 result, hence the looser bound for "out".
  _check_train_forward("deeplabv3_resnet50", model, ref, out,
                       state["batch_stats"], {"out": 1e-3, "aux": EVAL_TOL})


def test_deeplabv3_segmentation_loss_gradient(deeplab_torch):
  labels = np.random.RandomState(5).randint(
      0, NUM_SEG_CLASSES, (1, *SIZES[0])).astype(np.int32)
  labels_t = torch.from_numpy(labels).long()
  xt, xj = _images(3, SIZES[0])

  model = copy.deepcopy(deeplab_torch).eval()
  module, variables = ti.load_torchvision("deeplabv3_resnet50",
                                          model.state_dict())
  ref = model(xt)
  ce = functools.partial(torch.nn.functional.cross_entropy,
                         ignore_index=IGNORE_INDEX)
  ref_loss = NUM_SEG_CLASSES * (ce(ref["out"], labels_t)
                                + 0.5 * ce(ref["aux"], labels_t))
  ref_loss.backward()

  compared = {"backbone.conv1": ("backbone", "conv1"),
              "classifier.1": ("classifier", "conv_bn", "conv"),
              "aux_classifier.0": ("aux_classifier", "conv_bn", "conv")}
  loss, _, _, grads = _jax_loss_and_grad(
      module, variables, xj,
      lambda out: losses.segmentation_loss(out, labels, NUM_SEG_CLASSES,
                                           IGNORE_INDEX), False,
      [p + ("kernel",) for p in compared.values()])
  assert abs(float(loss) - ref_loss.item()) < 1e-5 * ref_loss.item()
  for torch_name, grad in zip(compared, grads):
    ref_grad = model.get_submodule(torch_name).weight.grad.numpy()
    assert _rel(grad, ref_grad.transpose(2, 3, 1, 0)) < GRAD_TOL, torch_name


# --------------------------------------------------- ImageNet backbones


def test_mobilenet_v3_large_imagenet_state_dict_loads_as_backbone():
  torch.manual_seed(3)
  # The ImageNet classifier; dilation does not change the weights, so the
  # reference features come from the dilated model with the same weights.
  classifier = _randomise_batchnorm(mobilenet_v3_large(weights=None), 3).eval()
  dilated = mobilenet_v3_large(weights=None, dilated=True).eval()
  dilated.load_state_dict(classifier.state_dict())
  result = ti.convert_state_dict("mobilenet_v3_large", classifier.state_dict())
  assert result.reinitialised == []
  assert sorted(result.dropped) == ["classifier.0.bias", "classifier.0.weight",
                                    "classifier.3.bias", "classifier.3.weight"]
  xt, xj = _images(6, SIZES[1])
  with torch.no_grad():
    ref = IntermediateLayerGetter(dilated.features, {"4": "low", "16": "high"})(xt)
  out = _eval_fn(result.module)(result.variables, xj)
  for key in ("low", "high"):
    assert _rel(out[key], _nchw_to_nhwc(ref[key])) < EVAL_TOL, key


def test_resnet50_imagenet_state_dict_loads_as_backbone():
  torch.manual_seed(4)
  model = _randomise_batchnorm(
      resnet50(weights=None, replace_stride_with_dilation=[False, True, True]),
      4).eval()
  result = ti.convert_state_dict("resnet50", model.state_dict())
  assert sorted(result.dropped) == ["fc.bias", "fc.weight"]
  xt, xj = _images(7, SIZES[0])
  with torch.no_grad():
    ref = IntermediateLayerGetter(model, {"layer3": "aux", "layer4": "out"})(xt)
  out = _eval_fn(result.module)(result.variables, xj)
  for key in ("aux", "out"):
    assert _rel(out[key], _nchw_to_nhwc(ref[key])) < EVAL_TOL, key


# ------------------------------------------------ CLI, class counts, errors


def test_cli_import_torchvision_round_trip(lraspp_torch, tmp_path, capsys):
  pth = tmp_path / "lraspp.pth"
  torch.save(lraspp_torch.state_dict(), pth)
  out_dir = tmp_path / "ckpt"
  argv = ["import-torchvision", "--arch", "lraspp_mobilenet_v3_large",
          "--state-dict", str(pth), "--output", str(out_dir)]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["arch"] == "lraspp_mobilenet_v3_large"
  assert summary["num_classes"] == 1
  assert summary["reinitialised"] == []
  assert summary["num_params"] == sum(
      p.numel() for p in lraspp_torch.parameters())

  module, variables = checkpoint_io.load_checkpoint(str(out_dir))
  xt, xj = _images(8, SIZES[0])
  with torch.no_grad():
    ref = lraspp_torch(xt)["out"]
  out = _eval_fn(module)(variables, xj)["out"]
  assert _rel(out, _nchw_to_nhwc(ref)) < EVAL_TOL

  # A non-empty output directory is refused; so is a file that is not a
  # state_dict.
  assert cli.main(argv) == 2
  assert "not an empty directory" in capsys.readouterr().err
  bad = tmp_path / "bad.pth"
  torch.save([1, 2, 3], bad)
  assert cli.main(argv[:-3] + [str(bad), "--output", str(tmp_path / "o2")]) == 2
  assert "state_dict" in capsys.readouterr().err
  with pytest.raises(UserError, match="not found"):
    checkpoint_io.import_to_checkpoint("resnet50", str(tmp_path / "none.pth"),
                            str(tmp_path / "o3"))


def test_other_class_count_reinitialises_the_head():
  torch.manual_seed(5)
  model = tv_seg.lraspp_mobilenet_v3_large(
      weights=None, weights_backbone=None, num_classes=21)
  state_dict = model.state_dict()
  with pytest.warns(UserWarning, match="low_classifier"):
    module, variables = ti.load_torchvision(
        "lraspp_mobilenet_v3_large", state_dict, num_classes=1)
  _, _, reinit = ti.load_torchvision_report(
      "lraspp_mobilenet_v3_large", state_dict, num_classes=1)
  assert reinit == ["classifier.high_classifier", "classifier.low_classifier"]
  head = variables["params"]["classifier"]
  assert head["low_classifier"]["kernel"].shape == (1, 1, 40, 1)
  assert head["high_classifier"]["kernel"].shape == (1, 1, 128, 1)
  np.testing.assert_array_equal(
      head["cbr"]["conv"]["kernel"],
      state_dict["classifier.cbr.0.weight"].numpy().transpose(2, 3, 1, 0))
  assert module.num_classes == 1

  # DeepLabV3: dropping the aux head is not an error, asking for one that
  # the checkpoint lacks initialises it.
  sd = {k: v for k, v in tv_seg.deeplabv3_resnet50(
      weights=None, weights_backbone=None, num_classes=21,
      aux_loss=True).state_dict().items()}
  result = ti.convert_state_dict("deeplabv3_resnet50", sd, aux_loss=False)
  assert not result.module.aux_loss and result.reinitialised == []
  assert "aux_classifier.4.weight" in result.dropped
  no_aux = {k: v for k, v in sd.items() if not k.startswith("aux_classifier.")}
  result = ti.convert_state_dict("deeplabv3_resnet50", no_aux, aux_loss=True)
  assert result.reinitialised == ["aux_classifier.0", "aux_classifier.1",
                                  "aux_classifier.4"]


def test_bad_state_dict_names_every_problem(lraspp_torch):
  sd = dict(lraspp_torch.state_dict())
  del sd["backbone.3.block.1.1.running_var"]
  sd["backbone.99.weight"] = torch.zeros(3)
  sd["classifier.scale.1.weight"] = torch.zeros(128, 960, 3, 3)
  with pytest.raises(UserError) as info:
    ti.load_torchvision("lraspp_mobilenet_v3_large", sd)
  msg = str(info.value)
  assert "\n" not in msg
  assert "missing keys: backbone.3.block.1.1.running_var" in msg
  assert "unexpected keys: backbone.99.weight" in msg
  assert "mis-shaped keys: classifier.scale.1.weight [128, 960, 3, 3]" in msg
  assert "[128, 960, 1, 1]" in msg
  with pytest.raises(UserError, match="resnet50"):
    ti.load_torchvision("resnet18", sd)


def test_jax_to_torch_export_loads_into_torchvision(deeplab_torch):
  """export_state_dict is the inverse of the import, for torchvision too."""
  _, variables = ti.load_torchvision("deeplabv3_resnet50",
                                     deeplab_torch.state_dict())
  exported = ti.export_state_dict("deeplabv3_resnet50", variables)
  reference = deeplab_torch.state_dict()
  assert set(exported) == set(reference)
  for key, value in exported.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(value, reference[key].numpy(), err_msg=key)


def test_parameter_counts_match_torchvision(lraspp_torch, deeplab_torch):
  for arch, model in [("lraspp_mobilenet_v3_large", lraspp_torch),
                      ("deeplabv3_resnet50", deeplab_torch)]:
    _, variables = ti.load_torchvision(arch, model.state_dict())
    assert ti.count_params(variables) == sum(
        p.numel() for p in model.parameters()), arch
