"""The detection base layer: Y_b for Faster R-CNN, as the authors place it.

torchvision's detector normalises its images (ImageNet mean / std),
resizes them (800 / 1333) and zero-pads the normalised batch to a multiple
of 32; the authors' codec works on that tensor. Here the input pipeline
resizes and pads to a canvas (tcr_jax.data.detection) and the model does
the rest:

  x (B, H, W, 3) in [0, 1], image_sizes (B, 2) -> `normalize_canvas`
  (ImageNet normalisation, zero outside each image's size, as torchvision
  pads) -> g_a (no x1/2 downsampler) -> entropy model -> y_hat, then
    - the task path: g_s (task_blocks) -> its 3 channels, taken as the
      normalised image -> FasterRCNN(normalize=False) with the unpadded
      image sizes: detections, or the four training losses;
    - the reconstruction decoder: g_s (recon_blocks) -> the normalised
      image, returned de-normalised (pixel space) as x_rec, behind
      models.gate_gradient exactly as in the depth base.

It offers the methods every model offers (analysis, encode, outputs,
entropy_model, entropy_variables, latent_shape; tcr_jax/model/models.py), with
image_sizes as an optional trailing argument: a single image given alone
(the coder) is its own size, zero-padded to a multiple of 32.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcr_jax.codec import entropy_models, transforms
from tcr_jax.model.canvas import MULTIPLE, denormalize, full_sizes, normalize_canvas
from tcr_jax.model.models import entropy_variables, gate_gradient
from tcr_jax.tasks import FasterRCNN


def _dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


class DetectionBase(nn.Module):
  """The detection base layer (module docstring)."""
  latent_channels: int = 192
  widths: Sequence[int] = (24, 48, 192)
  analysis_blocks: int = 3
  task_blocks: int = 1
  recon_blocks: int = 3
  entropy_model_name: str = "hyperprior"
  hyper_channels: int = 128
  quantizer: str = "ste"
  likelihood_bound: str = "clamp"
  num_classes: int = 91
  # FasterRCNN field overrides, ((name, value), ...) (hashable).
  detector: tuple[tuple[str, Any], ...] = ()
  compute_dtype: str = "float32"

  multiple = MULTIPLE
  entropy_variables = staticmethod(entropy_variables)

  @nn.nowrap
  def entropy_model(self) -> entropy_models.GaussianEntropyModel:
    return entropy_models.make_entropy_model(
        self.entropy_model_name, self.latent_channels, self.quantizer,
        self.hyper_channels, self.likelihood_bound)

  def setup(self):
    dt = _dtype(self.compute_dtype)
    widths = tuple(self.widths)
    self.g_a = transforms.AnalysisTransform(self.latent_channels, widths,
                                            self.analysis_blocks, dtype=dt)
    self.em = self.entropy_model()
    self.g_s_task = transforms.SynthesisTransform(3, widths[::-1],
                                                  self.task_blocks, dtype=dt)
    self.head = FasterRCNN(num_classes=self.num_classes, normalize=False,
                           **dict(self.detector))
    self.g_s_rec = transforms.SynthesisTransform(3, widths[::-1],
                                                 self.recon_blocks, dtype=dt)

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int, int]:
    m = self.multiple
    return (1, -(-height // m) * 2, -(-width // m) * 2, self.latent_channels)

  def analysis(self, x: jax.Array, image_sizes: jax.Array | None = None
               ) -> jax.Array:
    """x (B, H, W, 3) in [0, 1] -> y (float32) of the normalised canvas."""
    return self.g_a(normalize_canvas(x, image_sizes)[0]).astype(jnp.float32)

  def encode(self, x: jax.Array, image_sizes: jax.Array | None = None,
             train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    return self.em(self.analysis(x, image_sizes), train=train)

  def task_image(self, y_hat: jax.Array) -> jax.Array:
    """The normalised image the detector reads (padded size)."""
    return self.g_s_task(y_hat).astype(jnp.float32)

  def detect(self, y_hat: jax.Array, image_sizes: jax.Array,
             train: bool = False, targets=None) -> dict[str, jax.Array]:
    """Detections (eval; boxes in canvas pixels) or the four losses (train:
    targets {"boxes", "labels", "mask"}; the samplers draw from the
    "sampler" rng stream)."""
    rng = self.make_rng("sampler") if train else None
    return self.head(self.task_image(y_hat), image_sizes, train=train,
                     targets=targets, rng=rng)

  def reconstruct(self, y_hat: jax.Array) -> jax.Array:
    """The reconstruction decoder, de-normalised to pixel space."""
    return denormalize(self.g_s_rec(y_hat).astype(jnp.float32))

  def outputs(self, y_hat: jax.Array, size: tuple[int, int],
              train: bool = False, rec_gate: jax.Array | float = 1.0,
              image_sizes: jax.Array | None = None) -> dict[str, Any]:
    """Detections and x_rec (B, h, w, 3) at `size`; image_sizes default to
    `size` (one image coded alone)."""
    sizes = (full_sizes(y_hat.shape[0], *size) if image_sizes is None
             else image_sizes)
    x_rec = self.reconstruct(
        gate_gradient(y_hat, rec_gate))[:, :size[0], :size[1], :]
    return {"detections": self.detect(y_hat, sizes, train), "x_rec": x_rec}

  def __call__(self, x: jax.Array, image_sizes: jax.Array | None = None,
               train: bool = False, rec_gate: jax.Array | float = 1.0,
               targets=None) -> dict[str, Any]:
    """Eval: {"y_hat", "likelihoods", "detections", "x_rec"}; train (with
    targets): "detection_losses" in place of "detections"."""
    b, h, w, _ = x.shape
    sizes = full_sizes(b, h, w) if image_sizes is None else image_sizes
    y_hat, likelihoods = self.encode(x, sizes, train)
    x_rec = self.reconstruct(gate_gradient(y_hat, rec_gate))[:, :h, :w, :]
    out = {"y_hat": y_hat, "likelihoods": likelihoods, "x_rec": x_rec}
    if train:
      out["detection_losses"] = self.detect(y_hat, sizes, True, targets)
    else:
      out["detections"] = self.detect(y_hat, sizes)
    return out


def detection_base_model(config) -> DetectionBase:
  m, t = config.model, config.task
  return DetectionBase(
      latent_channels=m.latent_channels, widths=tuple(m.widths),
      analysis_blocks=m.analysis_blocks, task_blocks=m.task_blocks,
      recon_blocks=m.recon_blocks, entropy_model_name=config.entropy_model,
      hyper_channels=m.hyper_channels, quantizer=m.quantizer,
      likelihood_bound=m.likelihood_bound,
      num_classes=t.num_detection_classes,
      detector=tuple(sorted(t.detector.to_dict().items())),
      compute_dtype=m.compute_dtype)
