"""Convolution layers with torch-compatible geometry (NHWC, explicit padding).

Weights convert from PyTorch by transposing (O, I, kh, kw) -> (kh, kw, I, O)
for Conv2d and (I, O, kh, kw) -> (kh, kw, I, O) for ConvTranspose2d.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax.codec import ops


def conv(features: int, kernel: int, stride: int = 1, name: str | None = None,
         use_bias: bool = True, dtype=None) -> nn.Conv:
  """nn.Conv with torch's symmetric padding (k - 1) // 2 on every side."""
  p = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((p, p), (p, p)), use_bias=use_bias, name=name,
                 dtype=dtype)


# For ConvTranspose2d(k=5, s=2, p=2, output_padding=1), output row 2m + a
# reads input rows m - 1, m, m + 1 (3x3 taps at offsets -1, 0, +1) with
# kernel rows below; -1 marks a tap that phase does not use.
_PHASE_TAPS = np.array([[4, 2, 0], [-1, 3, 1]])


def subpixel_kernel(kernel: jax.Array) -> jax.Array:
  """Rewrites a 5x5 stride-2 transposed-convolution kernel as a 3x3 kernel.

  Args:
    kernel: (5, 5, C_in, C_out), the ConvTranspose2d weight in HWIO layout.

  Returns:
    (3, 3, C_in, 4 * C_out): a stride-1 convolution whose output channel
    (a * 2 + b) * C_out + c is output phase (row parity a, column parity b)
    of channel c; depth_to_space then interleaves the phases.
  """
  kh, kw, c_in, c_out = kernel.shape
  if (kh, kw) != (5, 5):
    raise ValueError(f"expected a 5x5 kernel, got {kh}x{kw}")
  padded = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # index 5 is 0
  taps = np.where(_PHASE_TAPS < 0, 5, _PHASE_TAPS)
  rows = taps[:, :, None, None]  # (a, ty, 1, 1)
  cols = taps[None, None, :, :]  # (1, 1, b, tx)
  k = padded[rows, cols]  # (a, ty, b, tx, C_in, C_out)
  k = k.transpose(1, 3, 4, 0, 2, 5)  # (ty, tx, C_in, a, b, C_out)
  return k.reshape(3, 3, c_in, 4 * c_out)


class SubpixelConvTranspose(nn.Module):
  """Exactly torch's ConvTranspose2d(k=5, stride=2, padding=2, output_padding=1).

  Computed as one 3x3 convolution to 4 * C_out channels followed by
  depth_to_space. flax.linen.ConvTranspose is 30 to 110 times slower than
  this on an H100 for the shapes of g_s. The parameter is the transposed
  convolution's own (5, 5, C_in, C_out) kernel, so torch weights convert with
  a plain transpose of (C_in, C_out, 5, 5).
  """
  features: int
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (5, 5, c_in, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    dtype = self.dtype or x.dtype
    k = subpixel_kernel(kernel).astype(dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), k, window_strides=(1, 1), padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = y + jnp.tile(bias, 4).astype(dtype)
    return ops.depth_to_space(y, 2)


def causal_mask(kernel_size: int) -> np.ndarray:
  """Type-A raster mask: 1 above the centre row and left of the centre."""
  m = np.ones((kernel_size, kernel_size), np.float32)
  c = kernel_size // 2
  m[c, c:] = 0
  m[c + 1:, :] = 0
  return m


class MaskedConv(nn.Module):
  """Convolution whose kernel is multiplied by a fixed spatial mask.

  With centre_only=True, x holds k x k neighbourhoods (..., k, k, C) and the
  output is the convolution at their centres (..., features): what a serial
  decoder needs for the positions it decodes next.
  """
  features: int
  mask: Sequence[Sequence[float]]

  @nn.compact
  def __call__(self, x: jax.Array, centre_only: bool = False) -> jax.Array:
    mask = jnp.asarray(self.mask, jnp.float32)
    k = mask.shape[0]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    if centre_only:
      return jnp.einsum("...uvc,uvco->...o", x, kernel * mask[:, :, None, None],
                        precision=jax.lax.Precision.HIGHEST) + bias
    p = (k - 1) // 2
    y = jax.lax.conv_general_dilated(
        x, (kernel * mask[:, :, None, None]).astype(x.dtype), (1, 1),
        ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(x.dtype)
