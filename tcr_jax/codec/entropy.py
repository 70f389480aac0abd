"""Entropy-model math as plain functions: likelihoods, bits, bits per pixel.

The discretized Gaussian follows the authors' formulation: the coded symbol
is the integer residual r = round(y_hat - mean) of the already-rounded
latent y_hat, under a zero-mean Gaussian of the predicted scale,

  p(r) = Phi((1/2 - |r|) / s) - Phi((-1/2 - |r|) / s),   s >= 0.11,

bounded below by 1e-9. Using |r| keeps the difference of CDFs in the lower
tail, where it is accurate in float32. Because the table is zero-mean and
indexed by scale alone, a range coder needs only a few fixed tables, and the
decoder recovers y_hat = round(r + mean).
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import jax
import jax.numpy as jnp

SCALE_LOWER_BOUND = 0.11
LIKELIHOOD_LOWER_BOUND = 1e-9


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def lower_bound(x: jax.Array, bound: float) -> jax.Array:
  """max(x, bound), letting gradients through where they push x up.

  CompressAI's LowerBound (the authors' scale and likelihood bounds): the
  forward value is max(x, bound); unlike a clamp, a value stuck below the
  bound still receives the gradient that would raise it, so predicted
  scales cannot get trapped at the bound.
  """
  return jnp.maximum(x, bound)


def _lower_bound_fwd(x, bound):
  return jnp.maximum(x, bound), x


def _lower_bound_bwd(bound, x, g):
  pass_through = (x >= bound) | (g < 0)
  return (jnp.where(pass_through, g, jnp.zeros_like(g)),)


lower_bound.defvjp(_lower_bound_fwd, _lower_bound_bwd)


def standard_normal_cdf(x: jax.Array) -> jax.Array:
  return 0.5 * jax.scipy.special.erfc(-x / math.sqrt(2.0))


LIKELIHOOD_BOUNDS = ("clamp", "lower_bound")


def gaussian_likelihood(residual: jax.Array, scale: jax.Array,
                        bound: str = "clamp") -> jax.Array:
  """Probability of an integer (or noisy) residual under N(0, scale^2) binned.

  Args:
    residual: y_hat - mean, rounded (straight-through) or with uniform noise.
    scale: predicted standard deviation, bounded below by 0.11.
    bound: how the likelihood's lower bound 1e-9 treats gradients below it:
      "clamp" (zero gradient there) or "lower_bound" (the gradient passes
      where it would raise the likelihood, as CompressAI's LowerBound, which
      the authors' code uses).

  Returns:
    per-element likelihoods, bounded below by 1e-9.
  """
  if bound not in LIKELIHOOD_BOUNDS:
    raise ValueError(f"unknown likelihood bound {bound!r}; expected one of "
                     f"{LIKELIHOOD_BOUNDS}")
  v = jnp.abs(residual)
  s = lower_bound(scale, SCALE_LOWER_BOUND)
  p = standard_normal_cdf((0.5 - v) / s) - standard_normal_cdf((-0.5 - v) / s)
  if bound == "lower_bound":
    return lower_bound(p, LIKELIHOOD_LOWER_BOUND)
  # Our default: below the bound the gradient is zero. Passing it through
  # lets the tail's float32 noise, divided by a likelihood near 1e-9, into
  # the rate's gradient.
  return jnp.maximum(p, LIKELIHOOD_LOWER_BOUND)


def bits(likelihoods: jax.Array | Mapping[str, jax.Array]) -> jax.Array:
  """Bits per image: -sum log2 p over all axes but the batch axis.

  `likelihoods` is one array or a mapping of them (e.g. {"y": ..., "z": ...}),
  each with a leading batch axis; the result has shape (batch,).
  """
  if isinstance(likelihoods, Mapping):
    return sum(bits(v) for v in likelihoods.values())
  lik = likelihoods.astype(jnp.float32)
  return -jnp.sum(jnp.log2(lik), axis=tuple(range(1, lik.ndim)))


def bits_within(likelihoods: jax.Array | Mapping[str, jax.Array],
                image_sizes: jax.Array, canvas: tuple[int, int],
                multiple: int = 32) -> jax.Array:
  """Bits per image of the latent elements a file of that image alone codes.

  For images on a shared canvas (B, H, W) of which image i fills the top
  left image_sizes[i] = (h, w): the elements of each likelihood map (B, h_l,
  w_l, C) at stride s = H / h_l (rounded to a power of two) within the
  image's footprint, ceil(ceil_multiple(h) / s) rows by the same in columns,
  i.e. what coding the image padded to `multiple` alone gives. The canvas's
  further padding costs nothing. Shape (batch,).
  """
  if isinstance(likelihoods, Mapping):
    return sum(bits_within(v, image_sizes, canvas, multiple)
               for v in likelihoods.values())
  lik = likelihoods.astype(jnp.float32)
  sizes = jnp.asarray(image_sizes, jnp.int32)
  padded = -(-sizes // multiple) * multiple
  counts = []
  for axis, extent in enumerate(canvas):
    n = lik.shape[1 + axis]
    stride = 2 ** round(math.log2(extent / n))
    counts.append((jnp.arange(n)[None, :] < -(-padded[:, axis:axis + 1] // stride)))
  inside = counts[0][:, :, None, None] & counts[1][:, None, :, None]
  return -jnp.sum(jnp.where(inside, jnp.log2(lik), 0.0), axis=(1, 2, 3))


def bpp(likelihoods: jax.Array | Mapping[str, jax.Array],
        num_pixels: int) -> jax.Array:
  """Mean bits per pixel over the batch; `num_pixels` = H * W of the input.

  The paper divides by the full-resolution pixel count, also for models that
  downsample the input before coding.
  """
  return jnp.mean(bits(likelihoods)) / num_pixels


def factorized_logits_cumulative(x: jax.Array, matrices, biases, factors
                                 ) -> jax.Array:
  """Logits of Balle's deep factorized CDF, per channel.

  Args:
    x: (C, 1, N) values.
    matrices: per layer (C, d_out, d_in), made positive with softplus.
    biases: per layer (C, d_out, 1).
    factors: per layer but the last (C, d_out, 1), tanh gates.
  """
  for i, (matrix, bias) in enumerate(zip(matrices, biases)):
    x = jnp.matmul(jax.nn.softplus(matrix), x) + bias
    if i < len(factors):
      x = x + jnp.tanh(factors[i]) * jnp.tanh(x)
  return x


def factorized_likelihood(v: jax.Array, matrices, biases, factors) -> jax.Array:
  """P(integer v) = c(v + 1/2) - c(v - 1/2) under the deep factorized prior."""
  lower = factorized_logits_cumulative(v - 0.5, matrices, biases, factors)
  upper = factorized_logits_cumulative(v + 0.5, matrices, biases, factors)
  # Evaluate in the tail where the difference of sigmoids is accurate.
  sign = jax.lax.stop_gradient(-jnp.sign(lower + upper))
  p = jnp.abs(jax.nn.sigmoid(sign * upper) - jax.nn.sigmoid(sign * lower))
  return jnp.maximum(p, LIKELIHOOD_LOWER_BOUND)
