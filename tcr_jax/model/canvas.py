"""The detector's input canvas: torchvision's ImageNet normalisation and
zero padding to a multiple of 32, with each image's own size on it.

Shared by the detection base (tcr_jax/model/models_detection.py), the enhancement
that codes the detector's input (tcr_jax/model/models.py) and the detection terms
of the objectives (tcr_jax/model/objectives.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tcr_jax.tasks.faster_rcnn import IMAGENET_MEAN, IMAGENET_STD

MULTIPLE = 32


def inside_mask(canvas: tuple[int, int], image_sizes: jax.Array) -> jax.Array:
  """(B, H, W, 1) bool: the pixels of each image on its canvas."""
  h, w = canvas
  return ((jnp.arange(h)[None, :, None] < image_sizes[:, 0, None, None])
          & (jnp.arange(w)[None, None, :] < image_sizes[:, 1, None, None])
          )[..., None]


def full_sizes(batch: int, height: int, width: int) -> jax.Array:
  return jnp.broadcast_to(jnp.array([height, width], jnp.int32), (batch, 2))


def normalize(x: jax.Array) -> jax.Array:
  return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)


def denormalize(x: jax.Array) -> jax.Array:
  return x * jnp.asarray(IMAGENET_STD, x.dtype) + jnp.asarray(IMAGENET_MEAN, x.dtype)


def normalize_canvas(x: jax.Array, image_sizes: jax.Array | None = None,
                     multiple: int = MULTIPLE) -> tuple[jax.Array, jax.Array]:
  """x in [0, 1] -> (the detector's input as torchvision builds it, sizes):
  padded to a multiple, ImageNet-normalised, zero outside image_sizes
  (default: x's own height and width)."""
  b, h, w, _ = x.shape
  sizes = (full_sizes(b, h, w) if image_sizes is None
           else jnp.asarray(image_sizes, jnp.int32))
  ph, pw = (-h) % multiple, (-w) % multiple
  x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return jnp.where(inside_mask(x.shape[1:3], sizes), normalize(x), 0.0), sizes
