"""MobileNetV3-Large feature extractor, as torchvision builds it.

The backbone of LRASPP: torchvision's `mobilenet_v3_large(dilated=True)`
truncated after `features[16]`, returning {"low": features[4] (40 channels,
stride 8), "high": features[16] (960 channels, stride 16)}. Flax module
names: stem (features.0), block1..block15 (features.1..15), last
(features.16); inside a block: expand, depthwise, se (fc1, fc2), project.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from tcr_jax.tasks.layers import ConvBN, conv2d, global_avg_pool

# torchvision's norm layer for MobileNetV3: BatchNorm2d(eps=1e-3, momentum=0.01).
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99  # Flax convention: 1 - torch's 0.01


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of `divisor`, never more than 10%
  below `value` (the TF-slim rule torchvision uses)."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """One inverted-residual block (a row of Table 1 of the MobileNetV3 paper)."""
  in_channels: int
  kernel: int
  expanded: int
  out_channels: int
  use_se: bool
  hardswish: bool
  stride: int
  dilation: int = 1


def large_blocks(dilated: bool) -> tuple[BlockConfig, ...]:
  """The 15 blocks of MobileNetV3-Large; `dilated` dilates the last three."""
  d = 2 if dilated else 1
  rows = [  # in, k, exp, out, se, hs, stride, dilation
      (16, 3, 16, 16, False, False, 1, 1),
      (16, 3, 64, 24, False, False, 2, 1),
      (24, 3, 72, 24, False, False, 1, 1),
      (24, 5, 72, 40, True, False, 2, 1),
      (40, 5, 120, 40, True, False, 1, 1),
      (40, 5, 120, 40, True, False, 1, 1),
      (40, 3, 240, 80, False, True, 2, 1),
      (80, 3, 200, 80, False, True, 1, 1),
      (80, 3, 184, 80, False, True, 1, 1),
      (80, 3, 184, 80, False, True, 1, 1),
      (80, 3, 480, 112, True, True, 1, 1),
      (112, 3, 672, 112, True, True, 1, 1),
      (112, 5, 672, 160, True, True, 2, d),
      (160, 5, 960, 160, True, True, 1, d),
      (160, 5, 960, 160, True, True, 1, d),
  ]
  return tuple(BlockConfig(*r) for r in rows)


# Index in `features` whose output is the "low" feature (stride 8, 40 ch).
LOW_FEATURE_INDEX = 4
LAST_CHANNELS = 960


class SqueezeExcite(nn.Module):
  """Squeeze-and-excitation: GAP -> 1x1 -> ReLU -> 1x1 -> hard sigmoid."""
  squeeze: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = global_avg_pool(x)
    s = conv2d(self.squeeze, 1, use_bias=True, name="fc1")(s)
    s = nn.relu(s)
    s = conv2d(x.shape[-1], 1, use_bias=True, name="fc2")(s)
    return x * jax.nn.hard_sigmoid(s)


class InvertedResidual(nn.Module):
  """Expand (1x1) -> depthwise (k x k) -> [SE] -> project (1x1) [+ input]."""
  config: BlockConfig
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    cfg = self.config
    act = jax.nn.hard_swish if cfg.hardswish else nn.relu
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=BN_EPSILON)
    y = x
    if cfg.expanded != cfg.in_channels:
      y = ConvBN(cfg.expanded, 1, activation=act, name="expand", **bn)(y, train)
    stride = 1 if cfg.dilation > 1 else cfg.stride
    y = ConvBN(cfg.expanded, cfg.kernel, stride=stride, dilation=cfg.dilation,
               groups=cfg.expanded, activation=act, name="depthwise", **bn)(y, train)
    if cfg.use_se:
      y = SqueezeExcite(make_divisible(cfg.expanded // 4), name="se")(y)
    y = ConvBN(cfg.out_channels, 1, name="project", **bn)(y, train)
    if cfg.stride == 1 and cfg.in_channels == cfg.out_channels:
      y = y + x
    return y


class MobileNetV3Large(nn.Module):
  """MobileNetV3-Large features; returns {"low": ..., "high": ...} (NHWC).

  dilated=True (the default, as in LRASPP) gives output stride 16.
  bn_momentum: the decay of the batch-norm running averages (Flax's
  convention; torchvision's 0.01 is 0.99 here).
  """
  dilated: bool = True
  bn_momentum: float = BN_MOMENTUM

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> dict[str, jax.Array]:
    bn = dict(bn_momentum=self.bn_momentum, bn_epsilon=BN_EPSILON)
    blocks = large_blocks(self.dilated)
    x = ConvBN(blocks[0].in_channels, 3, stride=2, activation=jax.nn.hard_swish,
               name="stem", **bn)(x, train)
    low = None
    for i, cfg in enumerate(blocks, start=1):
      x = InvertedResidual(cfg, self.bn_momentum, name=f"block{i}")(x, train)
      if i == LOW_FEATURE_INDEX:
        low = x
    high = ConvBN(LAST_CHANNELS, 1, activation=jax.nn.hard_swish, name="last",
                  **bn)(x, train)
    return {"low": low, "high": high}


def torch_leaves(torch_prefix: str, flax_prefix: tuple[str, ...],
                 dilated: bool = True) -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) for every layer with weights.

  `torch_prefix` is "features." for an ImageNet classifier's state_dict and
  "backbone." inside LRASPP. kind is "conv", "conv_bias" or "bn".
  """
  leaves = []

  def conv_bn(fpath, tname):
    leaves.append((fpath + ("conv",), f"{tname}.0", "conv"))
    leaves.append((fpath + ("bn",), f"{tname}.1", "bn"))

  blocks = large_blocks(dilated)
  conv_bn(flax_prefix + ("stem",), f"{torch_prefix}0")
  for i, cfg in enumerate(blocks, start=1):
    fblock = flax_prefix + (f"block{i}",)
    tblock = f"{torch_prefix}{i}.block"
    j = 0
    if cfg.expanded != cfg.in_channels:
      conv_bn(fblock + ("expand",), f"{tblock}.{j}")
      j += 1
    conv_bn(fblock + ("depthwise",), f"{tblock}.{j}")
    j += 1
    if cfg.use_se:
      leaves.append((fblock + ("se", "fc1"), f"{tblock}.{j}.fc1", "conv_bias"))
      leaves.append((fblock + ("se", "fc2"), f"{tblock}.{j}.fc2", "conv_bias"))
      j += 1
    conv_bn(fblock + ("project",), f"{tblock}.{j}")
  conv_bn(flax_prefix + ("last",), f"{torch_prefix}{len(blocks) + 1}")
  return leaves
