"""Entropy models as thin flax.linen modules around `entropy.py`.

Every model maps a latent to `(y_hat, likelihoods)`: the quantized latent and
a dict of per-element likelihoods ("y", and "z" for hyperprior models) that
`entropy.bits` / `entropy.bpp` turn into rates.

  FactorizedPrior        Balle's deep factorized density (hyper-latents)
  GaussianEntropyModel   discretized Gaussian for y, its (scale, mean)
                         predicted from any mix of
                           - a hyperprior (h_a, h_s, z under FactorizedPrior)
                           - a causal context: "serial" (masked 5x5, raster
                             order; the authors') or "checkerboard" (two
                             passes, He et al. 2021)
                           - side information (the enhancement layer's
                             branch on the base latent; zeros = standalone)

`make_entropy_model(kind)` names the combinations the configs use.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax.codec import entropy, layers, ops, transforms

BASE_KINDS = ("hyperprior", "context", "checkerboard")
CONTEXTS = ("none", "serial", "checkerboard")


# --------------------------------------------------------------------------
# Deep factorized prior (Balle et al. 2018, appendix 6.1).


class FactorizedPrior(nn.Module):
  """A learned per-channel density for hyper-latents, binned to integers.

  The cumulative c(x) = sigmoid(f(x)) is a monotone chain of per-channel
  affine maps with positive (softplus) matrices and tanh gates
  (`entropy.factorized_logits_cumulative`); the probability of integer z is
  c(z + 1/2) - c(z - 1/2).
  """
  channels: int
  filters: Sequence[int] = (3, 3, 3)
  init_scale: float = 10.0
  quantizer: str = "ste"

  def setup(self):
    dims = (1, *self.filters, 1)
    scale = self.init_scale ** (1.0 / (len(self.filters) + 1))
    c = self.channels
    uniform = lambda key, shape: jax.random.uniform(key, shape, jnp.float32,
                                                    -0.5, 0.5)
    matrices, biases, factors = [], [], []
    for i in range(len(dims) - 1):
      init = float(np.log(np.expm1(1.0 / scale / dims[i + 1])))
      matrices.append(self.param(f"matrix_{i}", nn.initializers.constant(init),
                                 (c, dims[i + 1], dims[i])))
      biases.append(self.param(f"bias_{i}", uniform, (c, dims[i + 1], 1)))
      if i < len(dims) - 2:
        factors.append(self.param(f"factor_{i}", nn.initializers.zeros,
                                  (c, dims[i + 1], 1)))
    self.matrices, self.biases, self.factors = matrices, biases, factors

  def likelihood(self, z_hat: jax.Array) -> jax.Array:
    """Per-element probability of (quantized) z_hat, shape (B, h, w, C)."""
    c = z_hat.shape[-1]
    v = jnp.moveaxis(z_hat, -1, 0).reshape(c, 1, -1).astype(jnp.float32)
    p = entropy.factorized_likelihood(v, self.matrices, self.biases,
                                      self.factors)
    return jnp.moveaxis(p.reshape(c, *z_hat.shape[:-1]), 0, -1)

  def __call__(self, z: jax.Array, train: bool = False
               ) -> tuple[jax.Array, jax.Array]:
    rng = self.make_rng("noise") if (train and self.quantizer == "noise") else None
    z_hat = ops.quantize(z, self.quantizer, rng, train)
    return z_hat, self.likelihood(z_hat)


# --------------------------------------------------------------------------
# Gaussian models for y.


class EntropyParameters(nn.Module):
  """1x1 convs in -> 10C/3 -> 8C/3 -> 2C, split into (scale, mean)."""
  channels: int
  activation: str = "leaky_relu"  # the authors: base leaky_relu, enhancement elu

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    act = {"leaky_relu": nn.leaky_relu, "elu": nn.elu}[self.activation]
    c = self.channels
    x = act(layers.conv(c * 10 // 3, 1)(x))
    x = act(layers.conv(c * 8 // 3, 1)(x))
    x = layers.conv(2 * c, 1)(x)
    scale, mean = jnp.split(x, 2, axis=-1)
    return scale, mean


def checkerboard_anchor_mask(height: int, width: int) -> jax.Array:
  """(1, H, W, 1) mask, 1 at anchors ((row + col) even: decoded first)."""
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return jnp.asarray(((i + j) % 2 == 0)[None, :, :, None], jnp.float32)


class SideBranch(nn.Module):
  """The enhancement layer's branch on the base latent (the authors').

  2 residual blocks (k5, ELU) on C_b, conv5x5 C_b -> 2C, 2 blocks (k5) on 2C.
  """
  channels: int

  @nn.compact
  def __call__(self, side: jax.Array) -> jax.Array:
    x = side
    for _ in range(2):
      x = transforms.ResidualBottleneck(kernel=5)(x)
    x = layers.conv(2 * self.channels, 5)(x)
    for _ in range(2):
      x = transforms.ResidualBottleneck(kernel=5)(x)
    return x


class GaussianEntropyModel(nn.Module):
  """Discretized Gaussian entropy model for a latent y of `channels` channels.

  Attributes:
    channels: C, the latent's channel count.
    hyperprior: code z = h_a(y) under a FactorizedPrior, feed h_s(z_hat).
    context: "none", "serial" (masked 5x5, the authors') or "checkerboard".
    side_channels: if set, condition on side information of that many
      channels (the base latent) through a SideBranch; `side=None` at call
      time means zeros (the standalone enhancement).
    hyper_channels: width of h_a / h_s.
    activation: of the entropy-parameter network.
    quantizer: "ste" or "noise" (see ops.quantize).
    likelihood_bound: "clamp" or "lower_bound" (entropy.gaussian_likelihood).
  """
  channels: int
  hyperprior: bool = True
  context: str = "none"
  side_channels: int | None = None
  hyper_channels: int = 128
  activation: str = "leaky_relu"
  quantizer: str = "ste"
  likelihood_bound: str = "clamp"

  def setup(self):
    if self.context not in CONTEXTS:
      raise ValueError(f"unknown context {self.context!r}; expected one of {CONTEXTS}")
    if not (self.hyperprior or self.context != "none" or self.side_channels):
      raise ValueError("a Gaussian model needs a hyperprior, a context or side info")
    c = self.channels
    if self.hyperprior:
      self.h_a = transforms.HyperAnalysis(self.hyper_channels)
      self.h_s = transforms.HyperSynthesis(2 * c, self.hyper_channels)
      self.z_prior = FactorizedPrior(self.hyper_channels,
                                     quantizer=self.quantizer)
    if self.side_channels:
      self.side_branch = SideBranch(c)
    if self.context == "serial":
      self.context_conv = layers.MaskedConv(2 * c, layers.causal_mask(5).tolist())
    elif self.context == "checkerboard":
      self.context_conv = layers.conv(2 * c, 5)
    self.entropy_parameters = EntropyParameters(c, self.activation)

  def static_features(self, z_hat, side, shape) -> list[jax.Array]:
    """The inputs of the parameter network that do not depend on y_hat:
    h_s(z_hat) and the side branch (zeros for side=None), in order."""
    b, h, w, _ = shape
    features = []
    if self.hyperprior:
      features.append(self.h_s(z_hat)[:, :h, :w, :])
    if self.side_channels:
      if side is None:
        side = jnp.zeros((b, h, w, self.side_channels), jnp.float32)
      features.append(self.side_branch(side))
    return features

  def parameters(self, y_hat: jax.Array, z_hat: jax.Array | None = None,
                 side: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(scale, mean) for every element of y_hat, as the decoder sees them.

    Causal by construction: the serial context at (i, j) reads only y_hat at
    earlier raster positions; the checkerboard context gives anchors
    ((i + j) even) nothing from y_hat and non-anchors only anchors.
    """
    b, h, w, _ = y_hat.shape
    features = self.static_features(z_hat, side, y_hat.shape)
    if self.context == "serial":
      features.append(self.context_conv(y_hat))
    elif self.context == "checkerboard":
      anchors = checkerboard_anchor_mask(h, w)
      features.append(self.context_conv(y_hat * anchors) * (1.0 - anchors))
    return self.entropy_parameters(jnp.concatenate(features, axis=-1))

  def parameters_at(self, patches: jax.Array, features: jax.Array | None
                    ) -> tuple[jax.Array, jax.Array]:
    """(scale, mean) (..., C) of single positions of a serial-context model,
    from their 5x5 neighbourhoods of y_hat (..., 5, 5, C) and their static
    features (..., F) (None without hyperprior and side information)."""
    context = self.context_conv(patches, centre_only=True)
    x = context if features is None else jnp.concatenate([features, context], -1)
    scale, mean = self.entropy_parameters(x[..., None, :])
    return scale[..., 0, :], mean[..., 0, :]

  def hyper_latent(self, y: jax.Array, train: bool = False
                   ) -> tuple[jax.Array, jax.Array]:
    """(z_hat, z likelihoods) for hyperprior models."""
    return self.z_prior(self.h_a(y), train)

  def __call__(self, y: jax.Array, side: jax.Array | None = None,
               train: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    noisy = train and self.quantizer == "noise"
    likelihoods = {}
    z_hat = None
    if self.hyperprior:
      z_hat, likelihoods["z"] = self.hyper_latent(y, train)
    y_hat = ops.quantize(y, self.quantizer,
                         self.make_rng("noise") if noisy else None, train)
    scale, mean = self.parameters(y_hat, z_hat, side)
    residual = (y_hat - mean) if noisy else ops.ste_round(y_hat - mean)
    likelihoods["y"] = entropy.gaussian_likelihood(residual, scale,
                                                   self.likelihood_bound)
    return y_hat, likelihoods


def make_entropy_model(kind: str, channels: int, quantizer: str = "ste",
                       hyper_channels: int = 128,
                       likelihood_bound: str = "clamp") -> GaussianEntropyModel:
  """The base-layer entropy models by name.

    hyperprior    mean-scale hyperprior (the default)
    context       the authors' serial masked 5x5 context model, no hyperprior
    checkerboard  hyperprior + two-pass checkerboard context
  """
  common = dict(quantizer=quantizer, likelihood_bound=likelihood_bound)
  if kind == "hyperprior":
    return GaussianEntropyModel(channels, True, "none",
                                hyper_channels=hyper_channels, **common)
  if kind == "context":
    return GaussianEntropyModel(channels, False, "serial", **common)
  if kind == "checkerboard":
    return GaussianEntropyModel(channels, True, "checkerboard",
                                hyper_channels=hyper_channels, **common)
  raise ValueError(f"unknown entropy model {kind!r}; expected one of {BASE_KINDS}")


def make_conditional_model(channels: int, side_channels: int,
                           context: str = "serial", quantizer: str = "ste",
                           likelihood_bound: str = "clamp"
                           ) -> GaussianEntropyModel:
  """The enhancement layer's model: side branch on the base latent (+ context).

  context="serial" is the authors' model; "none" or "checkerboard" decode in
  one or two parallel passes.
  """
  return GaussianEntropyModel(channels, False, context,
                              side_channels=side_channels, activation="elu",
                              quantizer=quantizer,
                              likelihood_bound=likelihood_bound)
