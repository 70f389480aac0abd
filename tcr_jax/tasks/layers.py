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
           kernel_init=kaiming_fan_out, name: str | None = None) -> nn.Conv:
  """A square convolution padded like torch's Conv2d(padding=(k-1)//2*d)."""
  pad = (kernel - 1) // 2 * dilation
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(dilation, dilation),
                 feature_group_count=groups, use_bias=use_bias,
                 kernel_init=kernel_init, name=name)


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
