"""Faster R-CNN ResNet-50 FPN v2 (torchvision's fasterrcnn_resnet50_fpn_v2),
the paper's detection head, with static shapes.

    model = FasterRCNN(num_classes=91)
    dets = model.apply(variables, images, image_sizes)           # eval
    losses, state = model.apply(variables, images, image_sizes, train=True,
                                targets=targets, rng=key,
                                mutable=["batch_stats"])

images (B, H, W, 3), H and W multiples of 32: in [0, 1] with
normalize=True (ImageNet mean / std applied inside), already normalised
with normalize=False (the codec's synthesis output). Nothing is resized.
image_sizes (B, 2) int32 are the unpadded (h, w) of each image on the
canvas (default: the whole canvas): pixels outside are zeroed after
normalisation (torchvision pads its normalised batch with zeros) and
proposals and detections are clipped to them.

Eval returns {"boxes" (B, D, 4) x1 y1 x2 y2 in input pixels, "scores"
(B, D), "labels" (B, D) int32}; rows without a detection are zero.
Train returns torchvision's four losses; targets are {"boxes" (B, G, 4),
"labels" (B, G), "mask" (B, G) bool} and `rng` drives both samplers.
The stages are methods too (features, propose, detect, rpn_losses,
roi_losses), and intermediates are sown into "intermediates".
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.tasks import fpn, roi_heads, rpn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FasterRCNN(nn.Module):
  """fasterrcnn_resnet50_fpn_v2; the fields are torchvision's defaults."""
  num_classes: int = 91
  normalize: bool = True
  detections_per_img: int = 100
  rpn_pre_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_thresh: float = 0.7
  rpn_fg_iou_thresh: float = 0.7
  rpn_bg_iou_thresh: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_score_thresh: float = 0.0
  box_score_thresh: float = 0.05
  box_nms_thresh: float = 0.5
  box_fg_iou_thresh: float = 0.5
  box_bg_iou_thresh: float = 0.5
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  image_mean: tuple[float, float, float] = IMAGENET_MEAN
  image_std: tuple[float, float, float] = IMAGENET_STD
  # Not torchvision's: scales the channels of the backbone, the pyramid and
  # the box head (1: torchvision's model; the :smoke configs' CPU tests use
  # less). The RPN head follows the pyramid.
  width: float = 1.0

  def setup(self):
    self.backbone = fpn.ResNetFPN(self.width)
    self.rpn = rpn.RPN()
    self.roi_heads = roi_heads.RoIHeads(self.num_classes, fpn.STRIDES,
                                        self.width)

  # ------------------------------------------------------------ stages

  def features(self, images: jax.Array, image_sizes: jax.Array | None = None,
               train: bool = False) -> list[jax.Array]:
    """Normalisation, padding mask, backbone and FPN: [P2..P5, pool]."""
    _check_canvas(images)
    x = images
    if self.normalize:
      x = (x - jnp.asarray(self.image_mean, x.dtype)) / jnp.asarray(
          self.image_std, x.dtype)
    if image_sizes is not None:
      h, w = images.shape[1:3]
      inside = ((jnp.arange(h)[None, :, None] < image_sizes[:, 0, None, None])
                & (jnp.arange(w)[None, None, :] < image_sizes[:, 1, None, None]))
      x = jnp.where(inside[..., None], x, 0.0)
    return self.backbone(x, train)

  def propose(self, features, canvas_hw: tuple[int, int],
              image_sizes: jax.Array, train: bool = False):
    """RPN head outputs and the filtered proposals.

    Returns (objectness per level, deltas per level, anchors (A, 4) numpy,
    proposals (B, P, 4), proposal scores (B, P), valid (B, P)).
    """
    objectness, deltas = self.rpn(features)
    self.sow("intermediates", "rpn_head", (objectness, deltas))
    anchors = rpn.anchors(canvas_hw, [f.shape[1:3] for f in features])
    boxes, scores, valid = rpn.filter_proposals(
        objectness, deltas, anchors, image_sizes,
        pre_nms_top_n=(self.rpn_pre_nms_top_n_train if train
                       else self.rpn_pre_nms_top_n_test),
        post_nms_top_n=(self.rpn_post_nms_top_n_train if train
                        else self.rpn_post_nms_top_n_test),
        nms_thresh=self.rpn_nms_thresh, score_thresh=self.rpn_score_thresh)
    return objectness, deltas, anchors, boxes, scores, valid

  def box_outputs(self, features, boxes: jax.Array, valid: jax.Array,
                  train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Class logits (B, R, C) and deltas (B, R, 4C) of RoIs (B, R, 4)."""
    b, r = boxes.shape[:2]
    batch_index = jnp.repeat(jnp.arange(b, dtype=jnp.int32), r)
    logits, deltas = self.roi_heads(features, boxes.reshape(b * r, 4),
                                    batch_index, valid.reshape(b * r), train)
    return logits.reshape(b, r, -1), deltas.reshape(b, r, -1)

  def detect(self, features, proposals: jax.Array, proposal_valid: jax.Array,
             image_sizes: jax.Array) -> dict[str, jax.Array]:
    """Eval-mode RoI heads on given proposals: the detections."""
    logits, deltas = self.box_outputs(features, proposals, proposal_valid)
    self.sow("intermediates", "class_logits", logits)
    self.sow("intermediates", "box_regression", deltas)
    return roi_heads.postprocess_detections(
        logits, deltas, proposals, proposal_valid, image_sizes,
        score_thresh=self.box_score_thresh, nms_thresh=self.box_nms_thresh,
        detections_per_img=self.detections_per_img)

  def rpn_losses(self, features, sample: Mapping[str, jax.Array]):
    """The RPN losses of a given anchor sample (rpn.sample_anchors)."""
    objectness, deltas = self.rpn(features)
    return rpn.rpn_loss(objectness, deltas, sample)

  def roi_losses(self, features, sample: Mapping[str, jax.Array],
                 train: bool = True) -> dict[str, jax.Array]:
    """The RoI losses of a given RoI sample (roi_heads.select_training_samples)."""
    logits, deltas = self.box_outputs(features, sample["boxes"],
                                      sample["valid"], train)
    c = logits.shape[-1]
    return roi_heads.fastrcnn_loss(
        logits.reshape(-1, c), deltas.reshape(-1, 4 * c),
        sample["labels"].reshape(-1), sample["targets"].reshape(-1, 4),
        sample["valid"].reshape(-1))

  # ------------------------------------------------------------- model

  def __call__(self, images: jax.Array, image_sizes: jax.Array | None = None,
               *, train: bool = False,
               targets: Mapping[str, jax.Array] | None = None,
               rng: jax.Array | None = None) -> dict[str, jax.Array]:
    b, h, w = images.shape[:3]
    sizes = (jnp.broadcast_to(jnp.array([h, w], jnp.int32), (b, 2))
             if image_sizes is None else jnp.asarray(image_sizes, jnp.int32))
    features = self.features(images, image_sizes, train)
    self.sow("intermediates", "features", features)
    objectness, deltas, anchors, proposals, scores, valid = self.propose(
        features, (h, w), sizes, train)
    self.sow("intermediates", "proposals", (proposals, scores, valid))
    if not train:
      return self.detect(features, proposals, valid, sizes)
    if targets is None or rng is None:
      raise ValueError("train=True needs targets and rng")
    rpn_key, roi_key = jax.random.split(rng)
    gt_boxes = jnp.asarray(targets["boxes"], images.dtype)
    gt_mask = jnp.asarray(targets["mask"], bool)
    anchor_sample = rpn.sample_anchors(
        rpn_key, anchors, gt_boxes, gt_mask,
        fg_iou_thresh=self.rpn_fg_iou_thresh, bg_iou_thresh=self.rpn_bg_iou_thresh,
        batch_size_per_image=self.rpn_batch_size_per_image,
        positive_fraction=self.rpn_positive_fraction)
    losses = rpn.rpn_loss(objectness, deltas, anchor_sample)
    roi_sample = roi_heads.select_training_samples(
        roi_key, proposals, valid, gt_boxes,
        jnp.asarray(targets["labels"], jnp.int32), gt_mask,
        fg_iou_thresh=self.box_fg_iou_thresh, bg_iou_thresh=self.box_bg_iou_thresh,
        batch_size_per_image=self.box_batch_size_per_image,
        positive_fraction=self.box_positive_fraction)
    losses.update(self.roi_losses(features, roi_sample, train=True))
    return losses


def _check_canvas(images: jax.Array) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
  if images.shape[1] % 32 or images.shape[2] % 32:
    raise ValueError(f"image height and width must be multiples of 32 (pad "
                     f"to a canvas), got {images.shape[1:3]}")


# torchvision's _resnet_fpn_extractor: the backbone layers trained for each
# trainable_backbone_layers (counted from the top); the rest is frozen.
_TRAINABLE_BODY = ("layer4", "layer3", "layer2", "layer1", "conv1")


def trainable_mask(params: Mapping[str, Any], trainable_backbone_layers: int = 3
                   ) -> Any:
  """Pytree of bools like `params`: False for what torchvision freezes.

  With trainable_backbone_layers=3 (torchvision's default with pretrained
  weights) conv1, bn1 and layer1 of backbone.body are frozen; 5 trains
  everything. Batch statistics update regardless, as in torchvision.
  freeze_untrainable wraps an optimiser accordingly (optax.masked alone
  passes the masked-out gradients through unchanged).
  """
  if not 0 <= trainable_backbone_layers <= 5:
    raise ValueError(f"trainable_backbone_layers must be in [0, 5], got "
                     f"{trainable_backbone_layers}")
  train = list(_TRAINABLE_BODY[:trainable_backbone_layers])
  if trainable_backbone_layers == 5:
    train.append("bn1")

  def trainable(path, _):
    keys = [getattr(k, "key", None) for k in path]
    if keys[:2] != ["backbone", "body"]:
      return True
    return keys[2] in train

  return jax.tree_util.tree_map_with_path(trainable, params)


def freeze_untrainable(tx, params: Mapping[str, Any],
                       trainable_backbone_layers: int = 3):
  """optax.multi_transform applying `tx` to the trainable params and zero
  updates (no weight decay either) to the ones torchvision freezes."""
  import optax  # pylint: disable=g-import-not-at-top
  labels = jax.tree.map(lambda t: "train" if t else "freeze",
                        trainable_mask(params, trainable_backbone_layers))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               labels)


def torch_leaves() -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) of every layer with weights."""
  return fpn.torch_leaves() + rpn.torch_leaves() + roi_heads.torch_leaves()
