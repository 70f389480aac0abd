"""DeepLabV3 with a ResNet-50 backbone and the FCN auxiliary head
(torchvision's `deeplabv3_resnet50(aux_loss=True)`), the paper's
segmentation head.

Dropout (0.5 after the ASPP projection, 0.1 in the aux head) is active in
train mode and then needs `rngs={"dropout": key}`; `dropout=False` turns it
off (used by the parity tests, since torch's dropout masks cannot be
reproduced).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.tasks.layers import ConvBN, conv2d, global_avg_pool, resize_bilinear
from tcr_jax.tasks.resnet import ResNet50, scaled

ATROUS_RATES = (12, 24, 36)
ASPP_CHANNELS = 256
BACKBONE_CHANNELS = 2048
AUX_CHANNELS = 1024


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: a 1x1 branch, three dilated 3x3
  branches, an image-pooling branch; concatenated, projected to 256."""
  rates: Sequence[int] = ATROUS_RATES
  channels: int = ASPP_CHANNELS
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               dropout: bool = True) -> jax.Array:
    c = self.channels
    branches = [ConvBN(c, 1, activation=nn.relu, name="branch0")(x, train)]
    for i, rate in enumerate(self.rates, start=1):
      branches.append(ConvBN(c, 3, dilation=rate, activation=nn.relu,
                             name=f"branch{i}")(x, train))
    pooled = ConvBN(c, 1, activation=nn.relu, name="pooling")(
        global_avg_pool(x), train)
    # Bilinear upsampling of a 1x1 map is a broadcast.
    branches.append(jnp.broadcast_to(pooled, x.shape[:3] + (c,)))
    y = jnp.concatenate(branches, axis=-1)
    y = ConvBN(c, 1, activation=nn.relu, name="project")(y, train)
    return nn.Dropout(self.dropout_rate, deterministic=not (train and dropout))(y)


class DeepLabHead(nn.Module):
  """ASPP -> 3x3 conv + BN + ReLU -> 1x1 classifier."""
  num_classes: int
  channels: int = ASPP_CHANNELS

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               dropout: bool = True) -> jax.Array:
    x = ASPP(channels=self.channels, name="aspp")(x, train, dropout)
    x = ConvBN(self.channels, 3, activation=nn.relu, name="conv_bn")(x, train)
    return conv2d(self.num_classes, 1, use_bias=True,
                  kernel_init=nn.initializers.lecun_normal(), name="logits")(x)


class FCNHead(nn.Module):
  """The auxiliary head on layer3: 3x3 conv (C/4) + BN + ReLU + dropout
  0.1 -> 1x1 classifier."""
  num_classes: int
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               dropout: bool = True) -> jax.Array:
    x = ConvBN(x.shape[-1] // 4, 3, activation=nn.relu, name="conv_bn")(x, train)
    x = nn.Dropout(self.dropout_rate, deterministic=not (train and dropout))(x)
    return conv2d(self.num_classes, 1, use_bias=True,
                  kernel_init=nn.initializers.lecun_normal(), name="logits")(x)


class DeepLabV3ResNet50(nn.Module):
  """`deeplabv3_resnet50`: {"out", and "aux" if aux_loss} (B, H, W, C).

  Input: NHWC images normalised by the caller. In train mode apply with
  `mutable=["batch_stats"]` and `rngs={"dropout": key}` (unless
  dropout=False).

  Attributes:
    num_classes: classes including the ignore class where the model has
      one (the paper: 20, class 19 ignored).
    aux_loss: build the FCN auxiliary head on layer3.
    dropout: use dropout in train mode.
    width: multiplies every layer's channels (1: torchvision's model, whose
      weights `tcr-jax import-torchvision` loads; smaller for CPU runs).
  """
  num_classes: int = 21
  aux_loss: bool = True
  dropout: bool = True
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    size = x.shape[1:3]
    features = ResNet50(width=self.width, name="backbone")(x, train)
    out = DeepLabHead(self.num_classes, scaled(ASPP_CHANNELS, self.width),
                      name="classifier")(features["out"], train, self.dropout)
    result = {"out": resize_bilinear(out, size)}
    if self.aux_loss:
      aux = FCNHead(self.num_classes, name="aux_classifier")(
          features["aux"], train, self.dropout)
      result["aux"] = resize_bilinear(aux, size)
    return result


def torch_leaves(aux_loss: bool) -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) of the DeepLabV3 and FCN heads."""
  aspp_f, aspp_t = ("classifier", "aspp"), "classifier.0"
  leaves = []

  def conv_bn(fpath, tconv, tbn):
    leaves.append((fpath + ("conv",), tconv, "conv"))
    leaves.append((fpath + ("bn",), tbn, "bn"))

  for i in range(len(ATROUS_RATES) + 1):
    conv_bn(aspp_f + (f"branch{i}",), f"{aspp_t}.convs.{i}.0", f"{aspp_t}.convs.{i}.1")
  n = len(ATROUS_RATES) + 1
  conv_bn(aspp_f + ("pooling",), f"{aspp_t}.convs.{n}.1", f"{aspp_t}.convs.{n}.2")
  conv_bn(aspp_f + ("project",), f"{aspp_t}.project.0", f"{aspp_t}.project.1")
  conv_bn(("classifier", "conv_bn"), "classifier.1", "classifier.2")
  leaves.append((("classifier", "logits"), "classifier.4", "conv_bias"))
  if aux_loss:
    conv_bn(("aux_classifier", "conv_bn"), "aux_classifier.0", "aux_classifier.1")
    leaves.append((("aux_classifier", "logits"), "aux_classifier.4", "conv_bias"))
  return leaves
