"""The paper's two objectives and the metrics they report.

The base layer (Y_b coded for a machine task Z_b):

    L_b = alpha * R_b + D_b + beta * 255 * RMSE(X_rec, X)

  R_b     bits per full-resolution pixel of Y_b (and of its hyper-latent);
  D_b     the task's distortion: depth RMSE in disparity pixels, or the sum
          of Faster R-CNN's four training losses (detection);
  X_rec   the reconstruction decoder's output, read off Y_b.

Detection (`detection_base_terms`), as the authors: images sit on a canvas
(tcr_jax.data.detection), so R_b is each image's bits (the latent within its
footprint, entropy.bits_within) over its own resized pixel count, and the
reconstruction error is 255 * RMSE in the detector's normalised space
(ImageNet mean / std, the space the codec works in), over the image's
pixels only.

beta = 0 is the *baseline*, beta > 0 the *proposal*. In both, the decoder that
gives X_rec trains; what beta changes is whether its error reaches the latent.
The model applies `reconstruction_gate(beta)` to Y_b in front of the decoder
(models.gate_gradient): 1 for the proposal, 0 (stop_gradient) for the
baseline, where the decoder trains with weight 1 on what the latent already
holds (`base_training_loss`), so it measures the reconstruction that can be
read off a latent nobody rewarded for it.

The enhancement layer (Y_e coded given the frozen Y_b):

    L_e = alpha * (R_b + R_e) + D_e

  D_e     255 * RMSE of the reconstruction, or num_classes * CE (+ aux) of
          the segmentation; R_b is a constant here (the base is frozen),
          counted where the layer's rate includes the base's (base_rate 1:
          the conditional layer, and the authors' standalone protocol); the
          from-scratch standalone enhancement (base_rate 0) is charged for
          its own bits. Rates of L_e are bits per pixel of the input, or of
          the half-resolution image (`rate_pixels`, the authors' choice for
          the reconstruction enhancement).

`*_terms` compute the terms from a batch of model outputs, `*_loss` combine
terms into the objective; evaluation feeds dataset-level terms (pooled over
the validation set) into the same `*_loss` functions.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from tcr_jax.codec import entropy
from tcr_jax.model.canvas import inside_mask
from tcr_jax.tasks import losses
from tcr_jax.tasks.faster_rcnn import IMAGENET_STD

Terms = Mapping[str, jax.Array]


# --------------------------------------------------------------------------
# Image metrics.


def mse_per_image(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  return jnp.mean((x_hat - x) ** 2, axis=tuple(range(1, x.ndim)))


def rmse_255_per_image(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """255 * RMSE of each image, for images in [0, 1]."""
  return 255.0 * jnp.sqrt(mse_per_image(x, x_hat) + 1e-12)


def rmse_255(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """255 * per-image RMSE, averaged over the batch (the authors' recon term)."""
  return jnp.mean(rmse_255_per_image(x, x_hat))


def psnr(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Per-image PSNR in dB for images in [0, 1] (x_hat clipped to [0, 1])."""
  mse = mse_per_image(x, jnp.clip(x_hat, 0, 1))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


# --------------------------------------------------------------------------
# L_b.


def reconstruction_gate(beta: jax.Array) -> jax.Array:
  """1 where the reconstruction term may shape the latent (beta > 0)."""
  return (beta > 0).astype(jnp.float32)


def base_terms(out: Mapping[str, jax.Array], batch: Mapping[str, jax.Array]
               ) -> dict[str, jax.Array]:
  """Batch terms of L_b from DepthBase outputs: rate, task, reconstruction."""
  x = batch["image"]
  return {
      "bpp": entropy.bpp(out["likelihoods"], x.shape[1] * x.shape[2]),
      "depth_rmse": losses.depth_loss(out["disparity"], batch["disparity"],
                                      batch["valid"]),
      "rec_rmse255": rmse_255(x, out["x_rec"]),
  }


# D_b of each base task, by its key in the terms: the depth task's, the
# detection task's, and "task_loss" for any other base task (tcr_jax/bases/).
TASK_DISTORTIONS = ("depth_rmse", "detection_loss", "task_loss")


def task_distortion(terms: Terms) -> jax.Array:
  """D_b: the base task's term (depth RMSE, the detection losses, or
  another task's task_loss)."""
  found = [k for k in TASK_DISTORTIONS if k in terms]
  if len(found) != 1:
    raise KeyError(f"base terms need exactly one of {TASK_DISTORTIONS}, "
                   f"got {sorted(terms)}")
  return terms[found[0]]


def base_loss(terms: Terms, alpha, beta) -> jax.Array:
  """L_b = alpha * R_b + D_b + beta * 255 * RMSE."""
  return alpha * terms["bpp"] + task_distortion(terms) + beta * terms["rec_rmse255"]


def base_training_loss(terms: Terms, alpha, beta) -> jax.Array:
  """What the base layer's step differentiates: L_b, except that the
  baseline's decoder still trains with weight 1 (its gate keeps it off the
  latent, so this adds nothing to what shapes Y_b)."""
  weight = jnp.where(beta > 0, beta, 1.0)
  return (alpha * terms["bpp"] + task_distortion(terms)
          + weight * terms["rec_rmse255"])


# --------------------------------------------------------------------------
# The detection base's terms: per-image sizes on a canvas.


def image_pixels(image_sizes: jax.Array) -> jax.Array:
  """(B,) float32: h * w of each image."""
  return jnp.prod(jnp.asarray(image_sizes, jnp.float32), axis=-1)


def masked_mse_per_image(x: jax.Array, x_hat: jax.Array,
                         image_sizes: jax.Array, scale=None) -> jax.Array:
  """Mean squared error over each image's own pixels (its size on the
  canvas) and channels, errors divided by `scale` per channel."""
  err = x_hat - x
  if scale is not None:
    err = err / jnp.asarray(scale, err.dtype)
  inside = inside_mask(x.shape[1:3], image_sizes)
  total = jnp.sum(jnp.where(inside, err ** 2, 0.0), axis=(1, 2, 3))
  return total / (image_pixels(image_sizes) * x.shape[-1])


def normalized_rmse_255_per_image(x, x_hat, image_sizes) -> jax.Array:
  """255 * RMSE in the detector's normalised space (the authors' term)."""
  return 255.0 * jnp.sqrt(masked_mse_per_image(x, x_hat, image_sizes,
                                               IMAGENET_STD) + 1e-12)


def masked_psnr(x, x_hat, image_sizes) -> jax.Array:
  """Per-image PSNR (dB, pixel space, x_hat clipped) over the image's pixels."""
  mse = masked_mse_per_image(x, jnp.clip(x_hat, 0, 1), image_sizes)
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def bpp_per_image(likelihoods, image_sizes, canvas) -> jax.Array:
  """(B,) bits of each image's latent footprint per resized pixel."""
  return (entropy.bits_within(likelihoods, image_sizes, canvas)
          / image_pixels(image_sizes))


def detection_base_terms(out: Mapping, batch: Mapping[str, jax.Array]
                         ) -> dict[str, jax.Array]:
  """Batch terms of L_b from DetectionBase outputs (train mode)."""
  x, sizes = batch["image"], batch["image_size"]
  losses = out["detection_losses"]
  return {
      "bpp": jnp.mean(bpp_per_image(out["likelihoods"], sizes, x.shape[1:3])),
      "detection_loss": sum(losses.values()),
      "rec_rmse255": jnp.mean(normalized_rmse_255_per_image(x, out["x_rec"],
                                                            sizes)),
      **losses,
  }


# --------------------------------------------------------------------------
# L_e.


def enhancement_distortion(out: Mapping[str, jax.Array],
                           batch: Mapping[str, jax.Array], task: str,
                           num_classes: int = 0, ignore_index: int = -1,
                           aux_weight: float = 0.5) -> jax.Array:
  """D_e: 255 * RMSE of the reconstruction, or the segmentation loss."""
  if task == "reconstruction":
    return rmse_255(out["target"], out["x_hat"])
  return losses.segmentation_loss(out["logits"], batch["labels"], num_classes,
                                  ignore_index, aux_weight)


def rate_pixels(height: int, width: int, which: str = "full") -> int:
  """The pixel count rates are divided by: of the (height, width) input
  ("full") or of its half-resolution image ("half")."""
  if which == "half":
    return -(-height // 2) * -(-width // 2)
  if which != "full":
    raise ValueError(f"rate pixels must be 'full' or 'half', not {which!r}")
  return height * width


def enhancement_terms(likelihoods_base, likelihoods_enhancement,
                      distortion: jax.Array, pixels: int) -> dict[str, jax.Array]:
  """Batch terms of L_e: both layers' rates per `pixels`, and D_e."""
  return {"bpp_base": entropy.bpp(likelihoods_base, pixels),
          "bpp_enhancement": entropy.bpp(likelihoods_enhancement, pixels),
          "distortion": distortion}


def detection_enhancement_terms(likelihoods_base, likelihoods_enhancement,
                                x_hat: jax.Array, batch: Mapping[str, jax.Array]
                                ) -> dict[str, jax.Array]:
  """Batch terms of L_e on the detection base: both rates per each image's
  resized pixels (footprints on the canvas), D_e = 255 * RMSE of the
  reconstruction in the detector's normalised space (the authors')."""
  x, sizes = batch["image"], batch["image_size"]
  canvas = x.shape[1:3]
  return {"bpp_base": jnp.mean(bpp_per_image(likelihoods_base, sizes, canvas)),
          "bpp_enhancement": jnp.mean(bpp_per_image(likelihoods_enhancement,
                                                    sizes, canvas)),
          "distortion": jnp.mean(normalized_rmse_255_per_image(x, x_hat, sizes))}


def enhancement_loss(terms: Terms, alpha, base_rate) -> jax.Array:
  """L_e = alpha * (R_b + R_e) + D_e; R_b counted where base_rate is 1."""
  return (alpha * (base_rate * terms["bpp_base"] + terms["bpp_enhancement"])
          + terms["distortion"])
