"""ResNet-50 feature extractor, as torchvision builds it.

The backbone of DeepLabV3: torchvision's `resnet50(replace_stride_with_
dilation=[False, True, True])` up to layer4 (output stride 8), returning
{"aux": layer3 (1024 channels), "out": layer4 (2048 channels)}. Flax
module names follow torch's: conv1, bn1, layer1..layer4 / block0.. /
conv1..conv3, bn1..bn3, downsample (conv, bn). BN: eps 1e-5, momentum 0.1.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from tcr_jax.tasks.layers import BatchNorm, ConvBN, conv2d

STAGE_BLOCKS = (3, 4, 6, 3)
STAGE_PLANES = (64, 128, 256, 512)
EXPANSION = 4
STEM_CHANNELS = 64


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4), plus a projected shortcut."""
  planes: int
  stride: int = 1
  dilation: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def bn(name):
      return BatchNorm(use_running_average=not train, name=name)

    y = nn.relu(bn("bn1")(conv2d(self.planes, 1, name="conv1")(x)))
    y = conv2d(self.planes, 3, stride=self.stride, dilation=self.dilation,
               name="conv2")(y)
    y = nn.relu(bn("bn2")(y))
    y = bn("bn3")(conv2d(self.planes * EXPANSION, 1, name="conv3")(y))
    shortcut = x
    if self.downsample:
      shortcut = ConvBN(self.planes * EXPANSION, 1, stride=self.stride,
                        name="downsample")(x, train)
    return nn.relu(y + shortcut)


def stage_layout(replace_stride_with_dilation: Sequence[bool]
                 ) -> list[list[tuple[int, int, bool]]]:
  """(stride, dilation, downsample) of every block, stage by stage.

  A dilated stage keeps stride 1 and multiplies the running dilation by 2;
  its first block still uses the previous dilation (torchvision's rule).
  """
  layout = []
  dilation, in_channels = 1, STEM_CHANNELS
  for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, STAGE_BLOCKS)):
    stride = 1 if i == 0 else 2
    previous = dilation
    if i > 0 and replace_stride_with_dilation[i - 1]:
      dilation *= stride
      stride = 1
    downsample = stride != 1 or in_channels != planes * EXPANSION
    stage = [(stride, previous, downsample)]
    stage += [(1, dilation, False)] * (blocks - 1)
    layout.append(stage)
    in_channels = planes * EXPANSION
  return layout


class ResNetStage(nn.Module):
  """A sequence of bottlenecks (torchvision's layer1..layer4)."""
  planes: int
  blocks: tuple[tuple[int, int, bool], ...]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for j, (stride, dilation, downsample) in enumerate(self.blocks):
      x = Bottleneck(self.planes, stride, dilation, downsample,
                     name=f"block{j}")(x, train)
    return x


def scaled(channels: int, width: float) -> int:
  """`channels` times the width multiplier, at least 8."""
  return max(8, int(round(channels * width)))


class ResNet50(nn.Module):
  """ResNet-50 features; returns {"aux": layer3, "out": layer4} (NHWC).
  `width` scales every layer's channels (1: torchvision's ResNet-50; the
  synthetic scenes' reproduction uses a quarter on CPUs)."""
  replace_stride_with_dilation: tuple[bool, bool, bool] = (False, True, True)
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    x = conv2d(scaled(STEM_CHANNELS, self.width), 7, stride=2, name="conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    layout = stage_layout(self.replace_stride_with_dilation)
    features = []
    for i, (planes, blocks) in enumerate(zip(STAGE_PLANES, layout), start=1):
      x = ResNetStage(scaled(planes, self.width), tuple(blocks),
                      name=f"layer{i}")(x, train)
      features.append(x)
    return {"aux": features[2], "out": features[3]}


def torch_leaves(torch_prefix: str, flax_prefix: tuple[str, ...],
                 replace_stride_with_dilation=(False, True, True)
                 ) -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) for every layer with weights.

  `torch_prefix` is "" for an ImageNet classifier's state_dict and
  "backbone." inside DeepLabV3.
  """
  leaves = [(flax_prefix + ("conv1",), f"{torch_prefix}conv1", "conv"),
            (flax_prefix + ("bn1",), f"{torch_prefix}bn1", "bn")]
  layout = stage_layout(replace_stride_with_dilation)
  for i, stage in enumerate(layout, start=1):
    for j, (_, _, downsample) in enumerate(stage):
      fblock = flax_prefix + (f"layer{i}", f"block{j}")
      tblock = f"{torch_prefix}layer{i}.{j}"
      for k in (1, 2, 3):
        leaves.append((fblock + (f"conv{k}",), f"{tblock}.conv{k}", "conv"))
        leaves.append((fblock + (f"bn{k}",), f"{tblock}.bn{k}", "bn"))
      if downsample:
        leaves.append((fblock + ("downsample", "conv"), f"{tblock}.downsample.0", "conv"))
        leaves.append((fblock + ("downsample", "bn"), f"{tblock}.downsample.1", "bn"))
  return leaves
