"""Parity of the Flax Faster R-CNN with torchvision's
fasterrcnn_resnet50_fpn_v2 (needs the parity extra).

torchvision's model is built with weights=None, min_size / max_size equal
to the canvas (no resizing) and smaller proposal counts (on both sides, to
keep the CPU time down). Its batch-norm statistics are calibrated on the
test images, then randomised, and the RPN and predictor weights scaled, so
that random weights give varied proposals and detections. Top-k and NMS
amplify float noise, so the stages are compared one by one on torch's own
inputs, then the whole model by matching detections.
"""
from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2  # noqa: E402

from tcr_jax import cli  # noqa: E402
from tcr_jax.tasks import detection_ops as ops  # noqa: E402
from tcr_jax.tasks import roi_heads, rpn  # noqa: E402
from tcr_jax.tasks import checkpoint_io  # noqa: E402
from tcr_jax.tasks import torchvision_import as ti  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.slow]

ARCH = "fasterrcnn_resnet50_fpn_v2"
H, W = 128, 192
COUNTS = dict(rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
              rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
              box_batch_size_per_image=64)
STAGE_TOL = 1e-4
# Train-mode features: batch statistics of a two-image batch amplify the
# float32 noise of 50 layers (about 9e-5 here; in float64 both sides agree
# to 1e-12, so it is noise, not semantics).
TRAIN_FEATURE_TOL = 5e-4
GT_BOXES = [np.array([[20, 30, 90, 100], [100, 10, 180, 70], [5, 80, 60, 126]], np.float32),
            np.array([[40, 40, 150, 110], [0, 0, 30, 40]], np.float32)]
GT_LABELS = [np.array([3, 17, 1]), np.array([62, 3])]


@pytest.fixture(autouse=True)
def _highest_precision():
  torch.backends.cudnn.allow_tf32 = False
  torch.backends.cuda.matmul.allow_tf32 = False
  with jax.default_matmul_precision("highest"):
    yield


def _jit(fn):
  """jax.jit with XLA's CPU backend optimisation off (faster compiles)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _images(seed):
  return torch.from_numpy(np.random.RandomState(seed).rand(2, 3, H, W).astype(np.float32))


@pytest.fixture(scope="module")
def tv_model():
  return build_tv_model()


def build_tv_model():
  """Random torchvision model with calibrated, then randomised, BN
  statistics and scaled RPN / predictor weights."""
  torch.manual_seed(0)
  model = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None,
                                     min_size=H, max_size=W, **COUNTS).eval()
  gen = torch.Generator().manual_seed(1)
  bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in bns:
      m.weight.copy_(0.5 + torch.rand(m.num_features, generator=gen))
      m.bias.copy_(0.2 * torch.randn(m.num_features, generator=gen))
      m.momentum = 1.0  # running statistics := those of the next batch
    images, _ = model.transform(list(_images(2)))
    model.backbone.train()
    model.backbone(images.tensors)
    model.backbone.eval()
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    model.roi_heads.box_head.train()
    model.roi_heads.box_head(model.roi_heads.box_roi_pool(
        features, proposals, images.image_sizes))
    model.roi_heads.box_head.eval()
    for m in bns:
      m.momentum = 0.1
      m.running_mean.add_(0.1 * torch.randn(m.num_features, generator=gen)
                          * m.running_var.sqrt())
      m.running_var.mul_(0.7 + 0.6 * torch.rand(m.num_features, generator=gen))
    model.rpn.head.cls_logits.weight.mul_(30)
    model.rpn.head.bbox_pred.weight.mul_(10)
    model.roi_heads.box_predictor.cls_score.weight.mul_(2.5)
  return model


@pytest.fixture(scope="module")
def converted(tv_model):
  module, variables = ti.load_torchvision(ARCH, tv_model.state_dict())
  return module.clone(**COUNTS), variables


def _record(module, store, key):
  module.register_forward_hook(lambda m, i, o: store.__setitem__(key, o))


@pytest.fixture(scope="module")
def eval_outputs(tv_model, converted):
  """torch's and JAX's eval outputs on two batches: two full 128x192
  images, and a 128x192 with a 112x160 one (torch resizing switched off)."""
  module, variables = converted
  run = _jit(lambda v, x, s: module.apply(v, x, s, mutable=["intermediates"]))
  results = []
  for seed, small in [(0, False), (1, True)]:
    model = copy.deepcopy(tv_model)
    store = {}
    _record(model.backbone, store, "features")
    _record(model.rpn.head, store, "head")
    _record(model.rpn, store, "rpn")
    _record(model.roi_heads.box_predictor, store, "predictor")
    x = _images(seed)
    images = list(x)
    sizes = np.array([[H, W], [H, W]], np.int32)
    if small:
      images[1] = images[1][:, :112, :160]
      sizes[1] = (112, 160)
      model.transform.resize = lambda image, target=None: (image, target)
    with torch.no_grad():
      store["detections"] = model(images)
    dets, inter = run(variables, _nhwc(x), sizes)
    results.append((store, dets, inter["intermediates"], sizes))
  return results


def _padded(boxes_list, rows):
  out = np.zeros((len(boxes_list), rows, 4), np.float32)
  valid = np.zeros((len(boxes_list), rows), bool)
  for i, b in enumerate(boxes_list):
    b = np.asarray(b)
    out[i, :len(b)], valid[i, :len(b)] = b, True
  return out, valid


def _torch_rpn_head(store):
  """torch's RPN head outputs per level as (B, H*W*A) and (B, H*W*A, 4)."""
  objectness, deltas = store["head"]
  out = []
  for o, d in zip(objectness, deltas):
    b, a, h, w = o.shape
    out.append((_nhwc(o).reshape(b, -1), d.detach().numpy().reshape(
        b, a, 4, h, w).transpose(0, 3, 4, 1, 2).reshape(b, -1, 4)))
  return out


def test_backbone_and_fpn_features(eval_outputs):
  worst = 0.0
  for store, _, inter, _ in eval_outputs:
    for ours, ref in zip(inter["features"][0], store["features"].values()):
      worst = max(worst, _rel(ours, _nhwc(ref)))
  print(f"backbone+FPN worst relative error {worst:.2e}")
  assert worst < STAGE_TOL


def test_rpn_on_torch_features(eval_outputs, converted):
  """Head outputs and proposals of the JAX RPN fed torchvision's features."""
  module, variables = converted
  def propose(v, f, s):
    out = module.apply(v, f, (H, W), s, method="propose")
    return out[:2] + out[3:]  # without the anchors (numpy constants)

  propose = _jit(propose)
  worst = {"objectness": 0.0, "deltas": 0.0, "proposals": 0.0}
  for store, _, _, sizes in eval_outputs:
    feats = [jnp.asarray(_nhwc(f)) for f in store["features"].values()]
    objectness, deltas, boxes, scores, valid = propose(variables, feats, sizes)
    for (ref_o, ref_d), o, d in zip(_torch_rpn_head(store), objectness, deltas):
      worst["objectness"] = max(worst["objectness"], _rel(o, ref_o))
      worst["deltas"] = max(worst["deltas"], _rel(d, ref_d))
    for i, ref in enumerate(store["rpn"][0]):
      assert int(valid[i].sum()) == len(ref) > 0
      worst["proposals"] = max(worst["proposals"],
                               _rel(np.asarray(boxes[i])[:len(ref)], ref.numpy()))
  print("RPN worst relative errors", {k: f"{v:.2e}" for k, v in worst.items()})
  assert max(worst.values()) < STAGE_TOL


def test_roi_heads_on_torch_proposals(eval_outputs, converted):
  """Class logits, box deltas and the detections from torchvision's
  features and proposals (so no near-tie upstream can diverge)."""
  module, variables = converted
  detect = _jit(lambda v, f, p, pv, s: module.apply(
      v, f, p, pv, s, method="detect", mutable=["intermediates"]))
  worst = {"class_logits": 0.0, "box_regression": 0.0, "boxes": 0.0}
  worst_score = 0.0
  for store, _, _, sizes in eval_outputs:
    feats = [jnp.asarray(_nhwc(f)) for f in store["features"].values()]
    props, valid = _padded([p.numpy() for p in store["rpn"][0]],
                           COUNTS["rpn_post_nms_top_n_test"])
    dets, inter = detect(variables, feats, props, valid, sizes)
    inter = inter["intermediates"]
    for name, ref in zip(("class_logits", "box_regression"), store["predictor"]):
      ours = np.concatenate([np.asarray(inter[name][0][i])[valid[i]] for i in range(2)])
      worst[name] = max(worst[name], _rel(ours, ref.numpy()))
    for i, ref in enumerate(store["detections"]):
      n = len(ref["boxes"])
      assert n > 10 and int(np.sum(np.asarray(dets["scores"][i]) > 0)) == n
      np.testing.assert_array_equal(np.asarray(dets["labels"][i])[:n], ref["labels"].numpy())
      worst["boxes"] = max(worst["boxes"], _rel(np.asarray(dets["boxes"][i])[:n],
                                                ref["boxes"].numpy()))
      worst_score = max(worst_score, float(np.max(np.abs(
          np.asarray(dets["scores"][i])[:n] - ref["scores"].numpy()))))
  print("RoI heads worst relative errors", {k: f"{v:.2e}" for k, v in worst.items()},
        f"scores max abs {worst_score:.1e}")
  assert max(worst.values()) < STAGE_TOL and worst_score < 1e-5


def _matched_fraction(ref, boxes, scores, labels):
  """Greedy one-to-one matching of torch's detections to ours: same
  label, IoU >= 0.9, scores within 1e-3."""
  found = scores > 0
  boxes, scores, labels = boxes[found], scores[found], labels[found]
  ref_boxes = ref["boxes"].numpy()
  iou = np.asarray(ops.box_iou(jnp.asarray(ref_boxes), jnp.asarray(boxes)))
  used, hits = np.zeros(len(boxes), bool), 0
  for k, (label, score) in enumerate(zip(ref["labels"].numpy(), ref["scores"].numpy())):
    ok = ~used & (labels == label) & (np.abs(scores - score) <= 1e-3) & (iou[k] >= 0.9)
    if ok.any():
      used[np.argmax(np.where(ok, iou[k], -1.0))] = True
      hits += 1
  return hits / max(len(ref_boxes), 1)


def test_whole_model_detections_match(eval_outputs):
  fractions = []
  for store, dets, _, sizes in eval_outputs:
    for i, ref in enumerate(store["detections"]):
      assert len(ref["boxes"]) > 10
      assert int(np.sum(np.asarray(dets["scores"][i]) > 0)) == len(ref["boxes"])
      fractions.append(_matched_fraction(ref, *(np.asarray(dets[k][i]) for k in
                                                ("boxes", "scores", "labels"))))
      boxes = np.asarray(dets["boxes"][i])
      assert np.all(boxes[:, 2] <= sizes[i][1]) and np.all(boxes[:, 3] <= sizes[i][0])
  print("matched fraction of detections per image", fractions)
  assert min(fractions) >= 0.97


@pytest.fixture(scope="module")
def train_outputs(tv_model):
  """One torchvision train-mode forward with its features, proposals,
  sampler inputs / outputs, losses and updated BN statistics recorded."""
  model = copy.deepcopy(tv_model).train()
  store = {"samplers": []}
  _record(model.backbone, store, "features")
  _record(model.rpn, store, "rpn")

  def recording(sampler):
    def call(labels):
      pos, neg = sampler(labels)
      store["samplers"].append(([l.clone() for l in labels], pos, neg))
      return pos, neg
    return call

  model.rpn.fg_bg_sampler = recording(model.rpn.fg_bg_sampler)
  model.roi_heads.fg_bg_sampler = recording(model.roi_heads.fg_bg_sampler)
  targets = [{"boxes": torch.from_numpy(b), "labels": torch.from_numpy(l)}
             for b, l in zip(GT_BOXES, GT_LABELS)]
  torch.manual_seed(3)
  x = _images(4)
  store["losses"] = {k: float(v.detach()) for k, v in model(list(x), targets).items()}
  store["model"], store["images"] = model, x
  return store


def _ground_truth():
  boxes, mask = _padded(GT_BOXES, 3)
  labels = np.zeros((2, 3), np.int32)
  for i, l in enumerate(GT_LABELS):
    labels[i, :len(l)] = l
  return jnp.asarray(boxes), jnp.asarray(labels), jnp.asarray(mask)


def _index_from_masks(pos, neg, rows, position=lambda i, j: j):
  """(B, rows) sample indices and validity from torch's sampler masks."""
  index = np.zeros((len(pos), rows), np.int32)
  valid = np.zeros((len(pos), rows), bool)
  for i, (p, n) in enumerate(zip(pos, neg)):
    chosen = [position(i, j) for j in torch.cat([torch.where(p)[0], torch.where(n)[0]]).tolist()]
    index[i, :len(chosen)], valid[i, :len(chosen)] = chosen, True
  return jnp.asarray(index), jnp.asarray(valid)


def test_train_mode_features_and_batch_statistics(train_outputs, converted):
  module, variables = converted
  run = _jit(lambda v, x, s: module.apply(v, x, s, True, method="features",
                                          mutable=["batch_stats"]))
  sizes = np.array([[H, W]] * 2, np.int32)
  feats, state = run(variables, _nhwc(train_outputs["images"]), sizes)
  worst = max(_rel(o, _nhwc(r)) for o, r in zip(feats, train_outputs["features"].values()))
  torch_sd = train_outputs["model"].state_dict()
  exported = ti.export_state_dict(ARCH, {"params": variables["params"],
                                         "batch_stats": state["batch_stats"]})
  stats = max(_rel(exported[k], torch_sd[k].numpy()) for k in exported
              if k.startswith("backbone.") and k.endswith(("running_mean", "running_var")))
  print(f"train-mode features {worst:.2e}, running statistics {stats:.2e}")
  assert worst < TRAIN_FEATURE_TOL and stats < STAGE_TOL


def test_rpn_loss_with_torch_sampled_anchors(train_outputs, converted):
  module, variables = converted
  feats = [jnp.asarray(_nhwc(f)) for f in train_outputs["features"].values()]
  anchors = rpn.anchors((H, W), [f.shape[1:3] for f in feats])
  gt_boxes, _, gt_mask = _ground_truth()
  labels, matches = rpn.match_anchors(anchors, gt_boxes, gt_mask)
  torch_labels, pos, neg = train_outputs["samplers"][0]
  np.testing.assert_array_equal(labels, np.stack([l.numpy() for l in torch_labels]))
  index, valid = _index_from_masks(pos, neg, module.rpn_batch_size_per_image)
  sample = rpn.gather_sample(anchors, gt_boxes, labels, matches, index, valid)
  losses = _jit(lambda v, f, s: module.apply(v, f, s, method="rpn_losses"))(
      variables, feats, sample)
  for name in ("loss_objectness", "loss_rpn_box_reg"):
    ref = train_outputs["losses"][name]
    print(name, float(losses[name]), ref)
    assert abs(float(losses[name]) - ref) <= STAGE_TOL * abs(ref), name


def test_roi_losses_on_torch_sampled_proposals(train_outputs, converted):
  module, variables = converted
  feats = [jnp.asarray(_nhwc(f)) for f in train_outputs["features"].values()]
  rows = COUNTS["rpn_post_nms_top_n_train"]
  torch_props = [p.detach().numpy() for p in train_outputs["rpn"][0]]
  props, props_valid = _padded(torch_props, rows)
  gt_boxes, gt_labels, gt_mask = _ground_truth()
  cand, _, labels, matches = roi_heads.match_proposals(
      jnp.asarray(props), jnp.asarray(props_valid), gt_boxes, gt_labels, gt_mask)

  def position(i, j):  # torch's candidates: its proposals, then the GT
    n = len(torch_props[i])
    return j if j < n else rows + j - n

  torch_labels, pos, neg = train_outputs["samplers"][1]
  for i, ref in enumerate(torch_labels):
    ours = np.asarray(labels[i])[[position(i, j) for j in range(len(ref))]]
    np.testing.assert_array_equal(ours, ref.numpy())
  index, valid = _index_from_masks(pos, neg, module.box_batch_size_per_image, position)
  sample = roi_heads.gather_sample(cand, labels, matches, gt_boxes, index, valid)
  assert int(np.sum(np.asarray(sample["labels"]) > 0)) > 0
  losses, state = _jit(lambda v, f, s: module.apply(
      v, f, s, method="roi_losses", mutable=["batch_stats"]))(variables, feats, sample)
  for name in ("loss_classifier", "loss_box_reg"):
    ref = train_outputs["losses"][name]
    print(name, float(losses[name]), ref)
    assert abs(float(losses[name]) - ref) <= STAGE_TOL * abs(ref), name
  # The box head's batch statistics come from the sampled RoIs only.
  exported = ti.export_state_dict(ARCH, {"params": variables["params"],
                                         "batch_stats": state["batch_stats"]})
  torch_sd = train_outputs["model"].state_dict()
  for k in exported:
    if k.startswith("roi_heads.box_head") and k.endswith("running_var"):
      assert _rel(exported[k], torch_sd[k].numpy()) < STAGE_TOL, k


# ------------------------------------------------------ import, export, CLI


def test_cli_import_and_checkpoint_round_trip(tv_model, converted, tmp_path, capsys):
  pth = tmp_path / "frcnn.pth"
  torch.save(tv_model.state_dict(), pth)
  argv = ["import-torchvision", "--arch", ARCH, "--state-dict", str(pth),
          "--output", str(tmp_path / "ckpt")]
  assert cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["num_classes"] == 91 and summary["reinitialised"] == []
  assert summary["num_params"] == sum(p.numel() for p in tv_model.parameters())
  module, variables = checkpoint_io.load_checkpoint(str(tmp_path / "ckpt"))
  assert module == ti.build_module(ARCH, 91)
  jax.tree.map(np.testing.assert_array_equal, variables, converted[1])
  exported = ti.export_state_dict(ARCH, variables)
  reference = tv_model.state_dict()
  assert set(exported) == set(reference)
  for key, value in exported.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(value, reference[key].numpy(), err_msg=key)


def test_other_class_count_reinitialises_the_predictor(tv_model):
  state_dict = tv_model.state_dict()
  with pytest.warns(UserWarning, match="box_predictor.cls_score"):
    module, variables = ti.load_torchvision(ARCH, state_dict, num_classes=5)
  assert module.num_classes == 5
  predictor = variables["params"]["roi_heads"]["box_predictor"]
  assert predictor["cls_score"]["kernel"].shape == (1024, 5)
  assert predictor["bbox_pred"]["kernel"].shape == (1024, 20)
  np.testing.assert_array_equal(
      variables["params"]["rpn"]["head"]["cls_logits"]["bias"],
      state_dict["rpn.head.cls_logits.bias"].numpy())
