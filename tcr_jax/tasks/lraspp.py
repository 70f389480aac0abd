"""LRASPP with a MobileNetV3-Large backbone (torchvision's
`lraspp_mobilenet_v3_large`), the paper's depth head.

The paper uses it with one output channel as a disparity regressor (its
loss: tcr_jax.tasks.losses.depth_loss).
"""
from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax

from tcr_jax.tasks.layers import ConvBN, conv2d, global_avg_pool, resize_bilinear
from tcr_jax.tasks.mobilenetv3 import BN_MOMENTUM, MobileNetV3Large

INTER_CHANNELS = 128


class LRASPPHead(nn.Module):
  """Lite R-ASPP: a gated 1x1 projection of "high", upsampled to "low"'s
  size, plus linear classifiers of both. Head BN: eps 1e-5, torch momentum
  0.1."""
  num_classes: int
  inter_channels: int = INTER_CHANNELS

  @nn.compact
  def __call__(self, features: Mapping[str, jax.Array],
               train: bool = False) -> jax.Array:
    low, high = features["low"], features["high"]
    x = ConvBN(self.inter_channels, 1, activation=nn.relu, name="cbr")(high, train)
    gate = conv2d(self.inter_channels, 1, name="scale")(global_avg_pool(high))
    x = x * nn.sigmoid(gate)
    x = resize_bilinear(x, low.shape[1:3])
    classifier_init = nn.initializers.lecun_normal()
    low_logits = conv2d(self.num_classes, 1, use_bias=True,
                        kernel_init=classifier_init, name="low_classifier")(low)
    high_logits = conv2d(self.num_classes, 1, use_bias=True,
                         kernel_init=classifier_init, name="high_classifier")(x)
    return low_logits + high_logits


class LRASPPMobileNetV3(nn.Module):
  """`lraspp_mobilenet_v3_large`: {"out": (B, H, W, num_classes)}.

  Input: NHWC images normalised by the caller (torchvision's models do not
  normalise). Variables: params and batch_stats; in train mode apply with
  `mutable=["batch_stats"]`.

  Attributes:
    num_classes: output channels (1 for the paper's depth head).
    backbone_bn_momentum: the backbone's batch-norm decay (Flax convention;
      torchvision: 0.99, i.e. torch momentum 0.01).
  """
  num_classes: int = 21
  backbone_bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    features = MobileNetV3Large(dilated=True, bn_momentum=self.backbone_bn_momentum,
                                name="backbone")(x, train)
    out = LRASPPHead(self.num_classes, name="classifier")(features, train)
    return {"out": resize_bilinear(out, x.shape[1:3])}


def torch_leaves() -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) of the LRASPP head layers."""
  return [
      (("classifier", "cbr", "conv"), "classifier.cbr.0", "conv"),
      (("classifier", "cbr", "bn"), "classifier.cbr.1", "bn"),
      (("classifier", "scale"), "classifier.scale.1", "conv"),
      (("classifier", "low_classifier"), "classifier.low_classifier", "conv_bias"),
      (("classifier", "high_classifier"), "classifier.high_classifier", "conv_bias"),
  ]
