"""Analysis and synthesis transforms: g_a, g_s, h_a, h_s.

ELIC-style residual-bottleneck transforms as the authors build them:

  g_a: conv5x5/2 (3 -> 24), 3 blocks, conv5x5/2 (24 -> 48), 3 blocks,
       conv5x5/2 (48 -> 192), 3 blocks, conv5x5/2 (192 -> latent)
  g_s: the mirror with transposed 5x5/2 convolutions; 1 block per stage in
       front of a task model, 3 for reconstruction.

A residual bottleneck block is 1x1 -> ELU -> kxk -> ELU -> 1x1, plus input.
g_a divides each side by 16; sides that are not multiples of 16 are handled
by the caller (`ops.pad_to_multiple` before g_a, `ops.crop` after g_s):
`AnalysisTransform.downsampling` says by how much.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.codec import layers


def downsampling(widths: Sequence[int]) -> int:
  """g_a's total stride: one stride-2 conv per width, and the last one."""
  return 2 ** (len(widths) + 1)


class ResidualBottleneck(nn.Module):
  """x + conv1x1(elu(convkxk(elu(conv1x1(x)))))."""
  kernel: int = 3
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    h = layers.conv(c, 1, dtype=self.dtype)(x)
    h = layers.conv(c, self.kernel, dtype=self.dtype)(nn.elu(h))
    h = layers.conv(c, 1, dtype=self.dtype)(nn.elu(h))
    return x + h


class AnalysisTransform(nn.Module):
  """g_a: image (B, H, W, C_in) -> latent (B, H/16, W/16, latent_channels)."""
  latent_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  blocks: int = 3
  dtype: jnp.dtype | None = None

  downsampling = 16  # with three widths; see downsampling(widths)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in self.widths:
      x = layers.conv(width, 5, stride=2, dtype=self.dtype)(x)
      for _ in range(self.blocks):
        x = ResidualBottleneck(dtype=self.dtype)(x)
    return layers.conv(self.latent_channels, 5, stride=2, dtype=self.dtype)(x)


class SynthesisTransform(nn.Module):
  """g_s: latent (B, h, w, C) -> (B, 16h, 16w, out_channels)."""
  out_channels: int = 3
  widths: Sequence[int] = (192, 48, 24)
  blocks: int = 3
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    x = y
    for width in self.widths:
      x = layers.SubpixelConvTranspose(width, dtype=self.dtype)(x)
      for _ in range(self.blocks):
        x = ResidualBottleneck(dtype=self.dtype)(x)
    return layers.SubpixelConvTranspose(self.out_channels, dtype=self.dtype)(x)


class HyperAnalysis(nn.Module):
  """h_a: latent y -> hyper-latent z, 4x smaller per side (Balle 2018)."""
  hyper_channels: int = 128

  downsampling = 4

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    n = self.hyper_channels
    x = nn.leaky_relu(layers.conv(n, 3)(y))
    x = nn.leaky_relu(layers.conv(n, 5, stride=2)(x))
    return layers.conv(n, 5, stride=2)(x)


class HyperSynthesis(nn.Module):
  """h_s: hyper-latent z -> features of y's size, `out_channels` of them."""
  out_channels: int
  hyper_channels: int = 128

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    n = self.hyper_channels
    x = nn.leaky_relu(layers.SubpixelConvTranspose(n)(z))
    x = nn.leaky_relu(layers.SubpixelConvTranspose(n * 3 // 2)(x))
    return layers.conv(self.out_channels, 3)(x)
