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

from tcr_jax.codec import entropy, entropy_models, layers, ops, transforms


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


# --------------------------------------------------------------------------
# The paper's two layers.


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def gate_gradient(x: jax.Array, gate: jax.Array) -> jax.Array:
  """x in value; its gradient is scaled by `gate` (0: stop_gradient).

  Lets baseline (gate 0) and proposal (gate 1) share one compiled step.
  """
  return jax.lax.stop_gradient(x) + gate * (x - jax.lax.stop_gradient(x))


class DepthBase(nn.Module):
  """The depth base layer (DESIGN.md section 2).

  x (B, H, W, 3) in [0, 1] -> bilinear x1/2 and a learned 5x5 conv -> g_a ->
  entropy model -> y_hat, then
    - the task path: g_s (task_blocks) -> LRASPP MobileNetV3-L (1 output)
      -> x2 nearest -> 5x5 conv -> disparity in pixels (x disparity_scale);
    - the reconstruction decoder: g_s (recon_blocks) -> x2 nearest -> 5x5
      conv -> x_rec at full resolution, fed with gate_gradient(y_hat, gate):
      gate 1 (proposal) lets the reward shape the latent, gate 0 (baseline)
      only trains the decoder on what the latent already holds.
  H and W must be multiples of 2; sides that are not multiples of 32 are
  edge-padded and the outputs cropped back.
  """
  latent_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  analysis_blocks: int = 3
  task_blocks: int = 1
  recon_blocks: int = 3
  entropy_model: str = "hyperprior"
  hyper_channels: int = 128
  quantizer: str = "ste"
  disparity_scale: float = 128.0
  compute_dtype: str = "float32"

  multiple = 32

  def setup(self):
    from tcr_jax.tasks import LRASPPMobileNetV3
    dt = _dtype(self.compute_dtype)
    widths = tuple(self.widths)
    self.down = layers.conv(3, 5)
    self.g_a = transforms.AnalysisTransform(self.latent_channels, widths,
                                            self.analysis_blocks, dtype=dt)
    self.em = entropy_models.make_entropy_model(
        self.entropy_model, self.latent_channels, self.quantizer,
        self.hyper_channels)
    self.g_s_task = transforms.SynthesisTransform(3, widths[::-1],
                                                  self.task_blocks, dtype=dt)
    self.head = LRASPPMobileNetV3(num_classes=1, task="depth")
    self.up_depth = layers.conv(1, 5)
    self.g_s_rec = transforms.SynthesisTransform(3, widths[::-1],
                                                 self.recon_blocks, dtype=dt)
    self.up_rec = layers.conv(3, 5)

  def encode(self, x: jax.Array, train: bool = False
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (padded to a multiple of 32) -> (y_hat, likelihoods)."""
    y = self.g_a(self.down(ops.downsample_2x(x)))
    return self.em(y.astype(jnp.float32), train=train)

  def task(self, y_hat: jax.Array, train: bool = False) -> jax.Array:
    """y_hat -> disparity in pixels at the padded full resolution, (B, H, W)."""
    t = self.g_s_task(y_hat).astype(jnp.float32)
    d = self.head(t, train=train)["out"]
    d = self.up_depth(ops.upsample_nearest_2x(d))
    return self.disparity_scale * d[..., 0]

  def reconstruct(self, y_hat: jax.Array) -> jax.Array:
    r = self.g_s_rec(y_hat).astype(jnp.float32)
    return self.up_rec(ops.upsample_nearest_2x(r))

  def __call__(self, x: jax.Array, train: bool = False,
               rec_gate: jax.Array | float = 1.0) -> dict[str, jax.Array]:
    padded, size = ops.pad_to_multiple(x, self.multiple)
    y_hat, likelihoods = self.encode(padded, train)
    disparity = self.task(y_hat, train)[:, :size[0], :size[1]]
    x_rec = ops.crop(self.reconstruct(gate_gradient(y_hat, rec_gate)), size)
    return {"y_hat": y_hat, "likelihoods": likelihoods,
            "disparity": disparity, "x_rec": x_rec}


class Enhancement(nn.Module):
  """The enhancement layer: a second latent coded given the base latent.

  Input: the half-resolution image (ops.downsample_2x of x), the layer's
  own g_a (so y_e has y_b's spatial size), the conditional entropy model
  (side branch on y_b plus a causal context), then
    - reconstruction: g_s (recon_blocks) -> the half-resolution image;
    - segmentation: g_s (task_blocks) -> DeepLabV3-R50 (+ aux) -> logits,
      bilinearly resized to the full label resolution.
  side=None gives the standalone enhancement (side information zeroed).
  """
  task_name: str = "reconstruction"
  latent_channels: int = 192
  side_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  analysis_blocks: int = 3
  task_blocks: int = 1
  recon_blocks: int = 3
  context: str = "serial"
  quantizer: str = "ste"
  num_classes: int = 20
  ignore_index: int = 19
  compute_dtype: str = "float32"

  multiple = 16  # of the half-resolution input

  def setup(self):
    dt = _dtype(self.compute_dtype)
    widths = tuple(self.widths)
    if self.task_name not in ("reconstruction", "segmentation"):
      raise ValueError(f"unknown enhancement task {self.task_name!r}")
    self.g_a = transforms.AnalysisTransform(self.latent_channels, widths,
                                            self.analysis_blocks, dtype=dt)
    self.em = entropy_models.make_conditional_model(
        self.latent_channels, self.side_channels, self.context, self.quantizer)
    blocks = (self.recon_blocks if self.task_name == "reconstruction"
              else self.task_blocks)
    self.g_s = transforms.SynthesisTransform(3, widths[::-1], blocks, dtype=dt)
    if self.task_name == "segmentation":
      from tcr_jax.tasks import DeepLabV3ResNet50
      self.head = DeepLabV3ResNet50(num_classes=self.num_classes,
                                    ignore_index=self.ignore_index)

  def __call__(self, x_half: jax.Array, side: jax.Array | None,
               train: bool = False, out_size: tuple[int, int] | None = None
               ) -> dict[str, jax.Array]:
    padded, size = ops.pad_to_multiple(x_half, self.multiple)
    y = self.g_a(padded).astype(jnp.float32)
    y_hat, likelihoods = self.em(y, side, train=train)
    out = ops.crop(self.g_s(y_hat).astype(jnp.float32), size)
    result = {"y_hat": y_hat, "likelihoods": likelihoods}
    if self.task_name == "reconstruction":
      result["x_hat"] = out
    else:
      logits = self.head(out, train=train)
      if out_size is not None:
        from tcr_jax.tasks.layers import resize_bilinear
        logits = {k: resize_bilinear(v, out_size) for k, v in logits.items()}
      result["logits"] = logits
    return result


def rmse_255(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """255 * per-image RMSE, averaged over the batch (the authors' recon term)."""
  mse = jnp.mean((x_hat - x) ** 2, axis=tuple(range(1, x.ndim)))
  return 255.0 * jnp.mean(jnp.sqrt(mse + 1e-12))
