"""Building blocks shared by the torchvision ports (NHWC throughout).

What matters for parity with torchvision:
  * convolutions pad symmetrically by (k - 1) // 2 * dilation, as torch's
    `padding=` does (Flax's 'SAME' pads asymmetrically for stride 2);
  * BatchNorm normalises with the biased batch variance in train mode and
    updates the running variance with the unbiased one, as torch does;
  * bilinear resizing uses half-pixel centres without antialiasing, which is
    torch's `F.interpolate(..., mode="bilinear", align_corners=False)`.
"""
from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# torchvision initialises convolutions with kaiming_normal_(mode="fan_out").
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

Activation = Optional[Callable[[jax.Array], jax.Array]]


def conv2d(features: int, kernel: int, *, stride: int = 1, dilation: int = 1,
           groups: int = 1, use_bias: bool = False,
           kernel_init=kaiming_fan_out, name: str | None = None) -> nn.Module:
  """A square convolution padded like torch's Conv2d(padding=(k-1)//2*d).

  groups == features (MobileNetV3's depthwise convolutions) gives a
  DepthwiseConv, whose variables are nn.Conv's.
  """
  pad = (kernel - 1) // 2 * dilation
  if groups > 1 and groups == features and not use_bias:
    return DepthwiseConv(features, kernel, stride=stride, dilation=dilation,
                         padding=pad, kernel_init=kernel_init, name=name)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation),
                 feature_group_count=groups, use_bias=use_bias,
                 kernel_init=kernel_init, name=name)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int,
                   dilation: int, padding: int, shifts: bool) -> jax.Array:
  """x (B, H, W, C) convolved channel by channel with kernel (k, k, 1, C).

  shifts=True computes it as the sum of the k * k strided windows of the
  padded input, each scaled by its tap: the same products as lax's grouped
  convolution, summed in another order. XLA:CPU runs the grouped
  convolution, and its gradients above all, several times slower (the
  LRASPP MobileNetV3 head's training step at batch 8 on 32x64: 234 ms as a
  grouped convolution, 53 ms as shifts, on 2 cores).
  """
  if not shifts:
    return jax.lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (stride, stride),
        ((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  span = dilation * (k - 1)
  out_h = (xp.shape[1] - span - 1) // stride + 1
  out_w = (xp.shape[2] - span - 1) // stride + 1
  out = None
  for i in range(k):
    for j in range(k):
      window = jax.lax.slice(
          xp, (0, i * dilation, j * dilation, 0),
          (xp.shape[0], i * dilation + stride * (out_h - 1) + 1,
           j * dilation + stride * (out_w - 1) + 1, xp.shape[3]),
          (1, stride, stride, 1))
      term = window * kernel[i, j, 0].astype(x.dtype)
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """A bias-free depthwise convolution with nn.Conv's variables (params:
  kernel (k, k, 1, C)), so checkpoints and the torchvision import do not
  see the difference. On CPU in one process it runs as shifted windows
  (depthwise_conv), elsewhere as lax's grouped convolution (cuDNN's,
  XLA:TPU's kernels).
  """
  features: int
  kernel: int
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  kernel_init: Callable = kaiming_fan_out

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.features:
      raise ValueError(f"DepthwiseConv({self.features}) got {x.shape[-1]} "
                       "input channels")
    w = self.param("kernel", self.kernel_init,
                   (self.kernel, self.kernel, 1, self.features), jnp.float32)
    # Shifts compile about three times longer; with several CPU processes
    # (tests, a laptop trying the multi-host path) one process compiling
    # far behind another outlasts the CPU collectives' 30 s rendezvous.
    shifts = jax.default_backend() == "cpu" and jax.process_count() == 1
    return depthwise_conv(x, w, self.stride, self.dilation, self.padding,
                          shifts=shifts)


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with torch.nn.BatchNorm2d's semantics.

  Variables are named like Flax's nn.BatchNorm (params: scale, bias;
  batch_stats: mean, var), and `momentum` follows Flax's convention: the
  decay of the running averages, i.e. 1 - torch's momentum. In train mode
  the output uses the biased batch variance (two-pass, no E[x^2]-E[x]^2
  cancellation) and the running variance is updated with the unbiased one,
  exactly as torch does; pass `mutable=["batch_stats"]` to apply.
  """
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    compute_dtype = jnp.promote_types(x.dtype, jnp.float32)
    xf = x.astype(compute_dtype)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // c
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1.0 - m) * jax.lax.stop_gradient(unbiased)
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(x.dtype)


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm + optional activation: torchvision's
  Conv2dNormActivation, and the conv/bn pairs of ResNet and the heads."""
  features: int
  kernel: int = 1
  stride: int = 1
  dilation: int = 1
  groups: int = 1
  activation: Activation = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = conv2d(self.features, self.kernel, stride=self.stride,
               dilation=self.dilation, groups=self.groups, name="conv")(x)
    x = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                  epsilon=self.bn_epsilon, name="bn")(x)
    if self.activation is not None:
      x = self.activation(x)
    return x


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear NHWC resize matching torch (align_corners=False, no antialias)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  shape = (x.shape[0], size[0], size[1], x.shape[3])
  return jax.image.resize(x, shape, "bilinear", antialias=False)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over H and W, kept as a 1x1 map (torch's AdaptiveAvgPool2d(1))."""
  return jnp.mean(x, axis=(1, 2), keepdims=True)
