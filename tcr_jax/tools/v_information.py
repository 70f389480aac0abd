"""Predictive V-information (Xu et al., ICLR 2020): how much of a target Z a
fixed, simple family V of decoders can read off a latent Y.

    H_V(Z | Y) = inf over f in V of E[-log2 f[Y](Z)]
    H_V(Z | 0) = the same with the empty input (f[0]: the family's offset alone)
    I_V(Y -> Z) = H_V(Z | 0) - H_V(Z | Y)

Each family member is a readout of Y (zero at initialisation) plus a learned
per-pixel offset, so f[0] (the readout zeroed) belongs to the family and
training starts there:

  Gaussian targets (image, disparity): mean = offset + readout(Y); a
    per-pixel, per-channel variance that does not depend on Y. The target
    is quantized (8-bit images: step 1/255), so it is scored as the
    uniformly dequantized value Z + U(-step/2, step/2), analytically: the
    expected negative log-likelihood adds step^2 / 12 to each squared
    residual. The maximum-likelihood variance given the means is then the
    pixel's mean squared residual plus step^2 / 12 (the floor), which is
    what the variance is refitted to after training. Bits are those of the
    quantized target (density bits - log2 step): a perfect prediction costs
    0.5 * log2(2 pi e / 12) = 0.25 bits, the floor's entropy. f[0] is the
    per-pixel mean and variance (+ the floor) of the fitting images.
  Categorical targets (labels): logits = offset + readout(Y); f[0] is the
    per-pixel class frequencies (add-one smoothed). Cross-entropy in bits.

Families (`FAMILIES`): "linear", a 1x1 readout of each latent cell into the
s x s patch of target pixels it covers (depth_to_space: a linear decoder);
"conv", a small convolutional synthesis (two 3x3 convolutions, 64 channels,
ELU, at the latent's resolution) whose features and the latent itself
go through the linear family's readout: it contains the linear family.

The estimate: the latent is standardized per channel with the fitting
images' mean and standard deviation (an affine change of the input that
the readout absorbs: it only conditions the fit, which then needs a third
of the steps), fit on the training images (a hold-out part of them picks
the step: the family starts at f[0], so a latent that carries nothing
leaves f[0]), score on validation images; a paired bootstrap over validation images
gives the interval. Only pixels of `mask` count (disparity's valid pixels,
labels without the ignore class).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tcr_jax.codec import layers, ops

FAMILIES = ("linear", "conv")
# Adam's peak rate (cosine decay to 0 over the fit) of the readout and the
# offsets, per target kind: logits must move by several units, means by a
# fraction of a pixel value. Measured on the demo's latents: 0.1 halves the
# steps the label probes need, 1e-2 made the image probes worse than 3e-3.
# The conv family's hidden layers train at HIDDEN_RATE whatever the target
# (at 3e-2 and above they diverged on the labels; with the standardized
# latent, 1e-2 ended no higher than 3e-3).
LEARNING_RATES = {"gaussian": 3e-3, "categorical": 0.1}
HIDDEN_RATE = 3e-3
LN2 = math.log(2.0)


@dataclasses.dataclass
class Target:
  """values: (N, H, W, K) float (gaussian) or (N, H, W) int (categorical);
  mask: (N, H, W) bool, the pixels that count; step: the quantization step
  of a Gaussian target (its floor is step^2 / 12); classes: categorical."""
  name: str
  kind: str
  values: np.ndarray
  mask: np.ndarray
  step: float = 1.0 / 255.0
  classes: int = 0

  def take(self, idx) -> "Target":
    return dataclasses.replace(self, values=self.values[idx], mask=self.mask[idx])

  @property
  def channels(self) -> int:
    return self.classes if self.kind == "categorical" else self.values.shape[-1]

  @property
  def floor(self) -> float:
    return self.step ** 2 / 12.0


class LinearReadout(nn.Module):
  """Each latent cell -> its s x s patch of outputs (zero-initialised)."""
  channels: int
  factor: int

  @nn.compact
  def __call__(self, y):
    out = nn.Dense(self.channels * self.factor ** 2,
                   kernel_init=nn.initializers.zeros)(y)
    return ops.depth_to_space(out, self.factor) if self.factor > 1 else out


class ConvReadout(nn.Module):
  """A small convolutional synthesis: two 3x3 convolutions with ELU at the
  latent's resolution (each output pixel sees the 5 x 5 latent cells
  around its own), then the linear readout of each cell, its features and
  the latent itself, into its s x s patch (zero-initialised): a sub-pixel
  synthesis that contains the linear family (so I_V(conv) >= I_V(linear)
  up to training), costs about what it costs, and trains about as fast."""
  channels: int
  factor: int
  width: int = 64

  @nn.compact
  def __call__(self, y):
    x = nn.elu(layers.conv(self.width, 3)(y))
    x = nn.elu(layers.conv(self.width, 3)(x))
    return LinearReadout(self.channels, self.factor)(jnp.concatenate([y, x], -1))


class Probe(nn.Module):
  """f[Y]: (B, h, w, C) -> (B, H, W, K) means or logits, and the per-pixel
  log-variance (Gaussian). offset and log_var are set to f[0] after init."""
  family: str
  channels: int
  size: tuple[int, int]
  factor: int

  @nn.compact
  def __call__(self, y):
    h, w = self.size
    if self.family == "linear":
      r = LinearReadout(self.channels, self.factor)(y)
    elif self.family == "conv":
      r = ConvReadout(self.channels, self.factor)(y)
    else:
      raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")
    offset = self.param("offset", nn.initializers.zeros, (h, w, self.channels))
    log_var = self.param("log_var", nn.initializers.zeros, (h, w, self.channels))
    return offset + r[:, :h, :w], log_var


def empty_member(t: Target) -> dict[str, np.ndarray]:
  """f[0] fitted on `t`: per-pixel mean and floored variance (Gaussian), or
  add-one smoothed per-pixel class log-frequencies (categorical)."""
  m = t.mask.astype(np.float64)
  if t.kind == "categorical":
    counts = np.stack([((t.values == k) & t.mask).sum(0)
                       for k in range(t.classes)], -1) + 1.0
    offset = np.log(counts / counts.sum(-1, keepdims=True))
    return {"offset": offset.astype(np.float32),
            "log_var": np.zeros_like(offset, np.float32)}
  v = t.values.astype(np.float64)
  n = m.sum(0)[..., None]
  overall = (v * m[..., None]).sum((0, 1, 2)) / max(m.sum(), 1.0)
  mean = np.where(n > 0, (v * m[..., None]).sum(0) / np.maximum(n, 1), overall)
  var = ((v - mean) ** 2 * m[..., None]).sum(0) / np.maximum(n, 1)
  var = np.where(n > 1, var, ((v - overall) ** 2 * m[..., None]).sum()
                 / max(m.sum() * v.shape[-1], 1.0))
  return {"offset": mean.astype(np.float32),
          "log_var": np.log(var + t.floor).astype(np.float32)}


def _element_bits(kind: str, floor: float, step: float, out, z):
  """Bits of each target element (B, H, W, K) or pixel (B, H, W)."""
  pred, log_var = out
  if kind == "categorical":
    return optax.softmax_cross_entropy_with_integer_labels(pred, z) / LN2
  log_var = jnp.maximum(log_var, math.log(floor))
  sq = (z - pred) ** 2 + floor  # E over the dequantization noise
  nats = 0.5 * (math.log(2 * math.pi) + log_var + sq / jnp.exp(log_var))
  return nats / LN2 - math.log2(step)


def _pixel_bits(kind, floor, step, out, z, mask):
  """(B,) sums of bits over the counted elements, and (B,) their counts."""
  bits = _element_bits(kind, floor, step, out, z)
  m = mask.astype(jnp.float32)
  if kind != "categorical":
    bits = bits.mean(-1)  # per pixel: the mean over channels
  return (bits * m).sum((1, 2)), m.sum((1, 2))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _scores(probe: Probe, kind: str, floor: float, step: float, params, y, z, mask):
  return _pixel_bits(kind, floor, step, probe.apply({"params": params}, y), z, mask)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _train_step(probe: Probe, kind: str, floor: float, step: float, tx,
                params, opt_state, y, z, mask):
  def loss(p):
    s, n = _pixel_bits(kind, floor, step, probe.apply({"params": p}, y), z, mask)
    return s.sum() / jnp.maximum(n.sum(), 1.0)
  value, grads = jax.value_and_grad(loss)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, value


def image_bits(probe, t: Target, params, latents, batch: int | None = None):
  """Per image: (bits summed over its counted elements, element count)."""
  if batch is None:  # about 2M target elements a call
    batch = max(8, 2 ** 21 // max(1, int(np.prod(t.values.shape[1:]))))
  sums, counts = [], []
  for i in range(0, len(latents), batch):
    s, n = _scores(probe, t.kind, t.floor, t.step, params,
                   jnp.asarray(latents[i:i + batch]),
                   jnp.asarray(t.values[i:i + batch]), jnp.asarray(t.mask[i:i + batch]))
    sums.append(np.asarray(s, np.float64))
    counts.append(np.asarray(n, np.float64))
  return np.concatenate(sums), np.concatenate(counts)


def make_probe(family: str, t: Target, latent_shape) -> Probe:
  h, w = t.values.shape[1:3]
  factor = max(1, -(-h // latent_shape[1]))
  if factor & (factor - 1) or -(-w // latent_shape[2]) != factor:
    raise ValueError(f"the target's size {h}x{w} is not a power-of-two multiple "
                     f"of the latent's {latent_shape[1]}x{latent_shape[2]}")
  return Probe(family, t.channels, (h, w), factor)


def _layer_kind(params):
  """"hidden" for the conv family's hidden convolutions, else "readout"."""
  def kind(path, _):
    names = [getattr(p, "key", "") for p in path]
    hidden = "ConvReadout_0" in names and not any(
        n.startswith("LinearReadout") for n in names)
    return "hidden" if hidden else "readout"
  return jax.tree_util.tree_map_with_path(kind, params)


@functools.lru_cache(maxsize=None)
def _adam(learning_rate: float, steps: int):
  """Adam with a cosine decay to 0 over the fit (so that a fit ends
  converged rather than wherever a constant rate's noise leaves it), the
  readout and offsets at `learning_rate`, hidden layers at HIDDEN_RATE; one
  object per (rate, steps): the jitted step takes it as static."""
  adam = lambda lr: optax.adam(optax.cosine_decay_schedule(lr, steps))
  return optax.multi_transform({"readout": adam(learning_rate),
                                "hidden": adam(HIDDEN_RATE)}, _layer_kind)


def _holdout_count(n: int, holdout: float) -> int:
  return max(1, int(round(n * holdout))) if n > 1 else 0


def fit(family: str, latents: np.ndarray, t: Target, *, steps: int,
        batch: int = 8, learning_rate: float | None = None, holdout: float = 0.125,
        eval_every: int = 50, seed: int = 0) -> tuple[Probe, dict, dict]:
  """Trains a member of `family` on (latents, t); returns (probe, params of
  the step with the lowest hold-out bits, f[0]'s params), both fitted on the
  same images (the first 1 - holdout of them)."""
  n = len(latents)
  n_hold = _holdout_count(n, holdout)
  fit_idx, hold_idx = np.arange(n - n_hold), np.arange(n - n_hold, n)
  t_fit, t_hold = t.take(fit_idx), t.take(hold_idx)
  probe = make_probe(family, t, latents.shape)
  params = probe.init(jax.random.key(seed), jnp.asarray(latents[:1]))["params"]
  empty = {**jax.tree.map(jnp.zeros_like, params),
           **jax.tree.map(jnp.asarray, empty_member(t_fit))}
  params = {**params, **{k: empty[k] for k in ("offset", "log_var")}}
  tx = _adam(learning_rate or LEARNING_RATES[t.kind], steps)
  opt_state = tx.init(params)
  rng = np.random.default_rng(seed)
  y_hold = latents[hold_idx]

  def hold_bits(p):
    if not n_hold:
      return 0.0
    s, c = image_bits(probe, t_hold, p, y_hold)
    return s.sum() / max(c.sum(), 1.0)

  best, best_bits, best_step = params, hold_bits(params), 0
  for i in range(1, steps + 1):
    idx = rng.choice(fit_idx, size=min(batch, len(fit_idx)), replace=False)
    params, opt_state, _ = _train_step(
        probe, t.kind, t.floor, t.step, tx, params, opt_state,
        jnp.asarray(latents[idx]), jnp.asarray(t.values[idx]), jnp.asarray(t.mask[idx]))
    if i % eval_every == 0 or i == steps:
      b = hold_bits(params)
      if b < best_bits:
        best, best_bits, best_step = params, b, i
  if t.kind != "categorical":
    best = {**best, "log_var": _refit_log_var(probe, best, latents[fit_idx], t_fit)}
  return probe, best, {"params": empty, "best_step": best_step}


def _refit_log_var(probe, params, latents, t: Target, batch: int = 256):
  """The maximum-likelihood variance given the means: per pixel and
  channel, the mean squared residual over the fitting images plus the
  floor (the dequantization noise's variance)."""
  sq, cnt = 0.0, 0.0
  for i in range(0, len(latents), batch):
    mean, _ = probe.apply({"params": params}, jnp.asarray(latents[i:i + batch]))
    m = t.mask[i:i + batch, ..., None].astype(np.float64)
    sq = sq + ((t.values[i:i + batch] - np.asarray(mean, np.float64)) ** 2 * m).sum(0)
    cnt = cnt + m.sum(0)
  var = np.where(cnt > 0, sq / np.maximum(cnt, 1) + t.floor,
                 np.exp(np.asarray(params["log_var"])))
  return jnp.asarray(np.log(np.maximum(var, t.floor)), jnp.float32)


def bootstrap_interval(diff_sums, counts, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
  """Percentile interval of sum(diff) / sum(counts) over images resampled
  with replacement (paired: both terms come from the same images)."""
  rng = np.random.default_rng(seed)
  k = len(counts)
  stats = []
  for start in range(0, resamples, 100):  # bounded memory for many images
    idx = rng.integers(0, k, size=(min(100, resamples - start), k))
    stats.append(diff_sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1.0))
  stats = np.concatenate(stats)
  lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def standardize(fitting: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Every array minus the fitting latents' per-channel mean, over their
  standard deviation (1 for a constant channel)."""
  mean = fitting.mean(axis=tuple(range(fitting.ndim - 1)))
  std = fitting.std(axis=tuple(range(fitting.ndim - 1)))
  std = np.where(std > 1e-6, std, 1.0)
  return [((a - mean) / std).astype(np.float32) for a in (fitting, *others)]


def estimate(family: str, train_latents: np.ndarray, train: Target,
             val_latents: np.ndarray, val: Target, *, steps: int, seed: int = 0,
             holdout: float = 0.125, **fit_args) -> dict:
  """I_V(Y -> Z) in bits per target element (pixel, for labels) on the
  validation images, with H_V(Z | 0), H_V(Z | Y) and a 95% interval."""
  n_fit = len(train_latents) - _holdout_count(len(train_latents), holdout)
  _, train_latents, val_latents = standardize(train_latents[:n_fit], train_latents,
                                              val_latents)
  probe, params, empty = fit(family, train_latents, train, steps=steps,
                             seed=seed, holdout=holdout, **fit_args)
  s_y, n = image_bits(probe, val, params, val_latents)
  s_0, _ = image_bits(probe, val, empty["params"], val_latents)
  keep = n > 0
  s_y, s_0, n = s_y[keep], s_0[keep], n[keep]
  total = max(n.sum(), 1.0)
  lo, hi = bootstrap_interval(s_0 - s_y, n, seed=seed)
  return {"family": family, "target": val.name,
          "bits": float((s_0 - s_y).sum() / total), "interval": [lo, hi],
          "h_empty": float(s_0.sum() / total), "h_given": float(s_y.sum() / total),
          "floor_bits": (float(0.5 * math.log2(2 * math.pi * math.e / 12.0))
                         if val.kind != "categorical" else 0.0),
          "steps": steps, "best_step": empty["best_step"], "seed": seed,
          "learning_rate": fit_args.get("learning_rate") or LEARNING_RATES[val.kind],
          "train_images": len(train_latents), "val_images": int(keep.sum())}
