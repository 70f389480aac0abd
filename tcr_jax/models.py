"""Models assembled from the codec core.

ImageCodec is the plain learned image codec: g_a, an entropy model, g_s.
It is the reconstruction path that the base and enhancement layers of the
paper are built from.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.codec import entropy, entropy_models, ops, transforms


class ImageCodec(nn.Module):
  """x in [0, 1], (B, H, W, 3) -> reconstruction, likelihoods.

  Sides that are not multiples of 16 are edge-padded before g_a and the
  reconstruction is cropped back to (H, W); the rate counts the padded
  latent, and bpp divides by the original H * W.
  """
  latent_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  blocks: int = 3
  entropy_model: str = "hyperprior"
  hyper_channels: int = 128
  quantizer: str = "ste"

  def setup(self):
    self.g_a = transforms.AnalysisTransform(self.latent_channels, self.widths,
                                            self.blocks)
    self.g_s = transforms.SynthesisTransform(3, tuple(reversed(self.widths)),
                                             self.blocks)
    self.em = entropy_models.make_entropy_model(
        self.entropy_model, self.latent_channels, self.quantizer,
        self.hyper_channels)

  def __call__(self, x: jax.Array, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    padded, size = ops.pad_to_multiple(x, transforms.AnalysisTransform.downsampling)
    y_hat, likelihoods = self.em(self.g_a(padded), train=train)
    x_hat = ops.crop(self.g_s(y_hat), size)
    return x_hat, likelihoods


def psnr(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Per-image PSNR in dB for images in [0, 1]."""
  mse = jnp.mean((jnp.clip(x_hat, 0, 1) - x) ** 2, axis=tuple(range(1, x.ndim)))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def rate_distortion_loss(x, x_hat, likelihoods, lmbda: float):
  """bpp + lmbda * 255^2 * MSE (CompressAI's convention); returns (loss, aux)."""
  num_pixels = x.shape[1] * x.shape[2]
  rate = entropy.bpp(likelihoods, num_pixels)
  mse = jnp.mean((x_hat - x) ** 2)
  return rate + lmbda * 255.0 ** 2 * mse, {"bpp": rate, "mse": mse}
