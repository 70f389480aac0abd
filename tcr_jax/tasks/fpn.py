"""ResNet-50 + FPN backbone of Faster R-CNN v2, as torchvision builds it
(`_resnet_fpn_extractor(resnet50(), norm_layer=BatchNorm2d)`).

The body is the plain (undilated) ResNet-50 with BatchNorm2d everywhere
(v2 has no FrozenBatchNorm), returning layer1..layer4 (strides 4..32).
The FPN has a 1x1 lateral and a 3x3 output conv per level, each without
bias and followed by BatchNorm, nearest top-down upsampling, and the extra
"pool" level x[:, ::2, ::2] of the coarsest output. Flax names follow
torch's: backbone/body/{conv1,bn1,layer1..4}, backbone/fpn/{inner,layer}{i}.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax.tasks import resnet
from tcr_jax.tasks.layers import BatchNorm, conv2d

FPN_CHANNELS = 256
IN_CHANNELS = (256, 512, 1024, 2048)
STRIDES = (4, 8, 16, 32)  # of P2..P5; the pool level's anchors use canvas // size

# torchvision initialises the FPN convs with kaiming_uniform_(a=1).
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class ResNet50Body(nn.Module):
  """Undilated ResNet-50 returning [layer1, layer2, layer3, layer4];
  `width` scales every layer's channels (resnet.scaled; 1: torchvision's)."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    x = conv2d(resnet.scaled(resnet.STEM_CHANNELS, self.width), 7, stride=2,
               name="conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = []
    layout = resnet.stage_layout((False, False, False))
    for i, (planes, blocks) in enumerate(zip(resnet.STAGE_PLANES, layout), 1):
      x = resnet.ResNetStage(resnet.scaled(planes, self.width), tuple(blocks),
                             name=f"layer{i}")(x, train)
      features.append(x)
    return features


class ConvNorm(nn.Module):
  """Conv (no bias, FPN init) + BatchNorm, no activation."""
  features: int
  kernel: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv2d(self.features, self.kernel, kernel_init=kaiming_uniform_a1,
               name="conv")(x)
    return BatchNorm(use_running_average=not train, name="bn")(x)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """torch's F.interpolate(mode="nearest"): source index floor(i * in/out)."""
  def index(n_in, n_out):
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum((np.arange(n_out, dtype=np.float32) * scale).astype(np.int64),
                      n_in - 1)
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  x = jnp.take(x, index(x.shape[1], size[0]), axis=1)
  return jnp.take(x, index(x.shape[2], size[1]), axis=2)


class FPN(nn.Module):
  """Feature pyramid with BatchNorm and the max-pool level: returns the
  five 256-channel maps [P2, P3, P4, P5, pool], finest first."""
  channels: int = FPN_CHANNELS

  @nn.compact
  def __call__(self, features: list[jax.Array], train: bool = False
               ) -> list[jax.Array]:
    n = len(features)
    last = ConvNorm(self.channels, 1, name=f"inner{n - 1}")(features[-1], train)
    results = [ConvNorm(self.channels, 3, name=f"layer{n - 1}")(last, train)]
    for i in range(n - 2, -1, -1):
      lateral = ConvNorm(self.channels, 1, name=f"inner{i}")(features[i], train)
      last = lateral + resize_nearest(last, lateral.shape[1:3])
      results.insert(0, ConvNorm(self.channels, 3, name=f"layer{i}")(last, train))
    results.append(results[-1][:, ::2, ::2])  # max_pool2d(kernel 1, stride 2)
    return results


class ResNetFPN(nn.Module):
  """backbone/body + backbone/fpn: NHWC image -> five FPN maps; `width`
  scales the body's and the pyramid's channels (1: torchvision's)."""
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> list[jax.Array]:
    body = ResNet50Body(self.width, name="body")(x, train)
    return FPN(resnet.scaled(FPN_CHANNELS, self.width), name="fpn")(body, train)


def torch_leaves() -> list[tuple[tuple[str, ...], str, str]]:
  """(flax path, torch module name, kind) of backbone.body and backbone.fpn."""
  leaves = resnet.torch_leaves("backbone.body.", ("backbone", "body"),
                               (False, False, False))
  for i in range(len(IN_CHANNELS)):
    for flax_name, torch_name in ((f"inner{i}", "inner_blocks"),
                                  (f"layer{i}", "layer_blocks")):
      path = ("backbone", "fpn", flax_name)
      leaves.append((path + ("conv",), f"backbone.fpn.{torch_name}.{i}.0", "conv"))
      leaves.append((path + ("bn",), f"backbone.fpn.{torch_name}.{i}.1", "bn"))
  return leaves
