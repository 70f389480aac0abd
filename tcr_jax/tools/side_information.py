"""How much the enhancement's conditional entropy model gains from Y_b.

    tcr-jax side-information WORKDIR [--images 64] [--channels]

For every conditional enhancement stage of a finished workdir
(enhancement_{baseline,proposal}_alpha*; the standalone has no side
information), on the first N validation images:

  bits        -log2 of the likelihoods the entropy model returns for Y_e,
              summed over positions, per image and channel: with the real
              base latent Y_b as side information ("with") and with side =
              zeros ("without", what the model predicts from its causal
              context alone). saving = 1 - with / without.
  active      channels carrying >= 0.02 bits per element without side.
  stuck       active channels whose saving is < 5% (also counted against
              the "mean" control below).
  controls    the zero side is far outside what the side branch saw in
              training, so "without" overstates the rate of a model with no
              side information. Two in-distribution controls, as total
              savings: Y_b of another image ("shuffled": rolled by one in
              the batch; right marginals, wrong image, so it misleads) and
              Y_b's per-channel mean over the batch at every position
              ("mean": a typical, uninformative constant).
  saturated   share of the first entropy-parameter layer's hidden units
              (em/entropy_parameters/Conv_0, ELU) whose pre-activation is
              < -3 at every position of every image (real side): units
              that output ~-1 whatever the input, i.e. dead; ">=95%": at
              95% of the positions or more.
  R^2 Y_b     per channel, least-squares linear regression (with intercept)
              of y_hat on the 32 channels of Y_b at the same position,
              in-sample; the medians over the stuck and the learned (active,
              saving >= 5%) channels, by the zero and by the mean control.
  lin. est.   a linear-Gaussian estimate of the saving Y_b could give beyond
              the causal context: per channel 0.5 log2((1 - R^2_ctx) /
              (1 - R^2_ctx+Y_b)) bits per element (R^2_ctx: regression on
              y_hat at the 4 causal neighbours (left, up-left, up, up-right),
              all channels), capped at the channel's bits without side, as a
              share of the total bits without side. High-rate
              approximation: indicative only at these rates.

--channels also prints the per-channel numbers of every model.
"""
from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from tcr_jax import bases, checkpoints
from tcr_jax.errors import UserError
from tcr_jax.tools import compression

SAVING_THRESHOLD = 0.05   # a channel saving less than this is "stuck"
ACTIVE_BITS = 0.02        # bits per element (without side) to count a channel
SATURATION = -3.0         # ELU pre-activation below this: output ~ -1


def conditional_stages(workdir: str) -> list[str]:
  """enhancement_{baseline,proposal}_alpha* stages with a done.json, sorted."""
  stages = []
  for name in checkpoints.finished_stages(workdir):
    m = re.fullmatch(r"enhancement_(baseline|proposal)_alpha(.+)", name)
    if m:
      stages.append((m.group(1), float(m.group(2)), name))
  return [s for _, _, s in sorted(stages)]


def make_measure(base, enh):
  """A jitted (base_vars, enh_vars, x) -> per-image/channel bits (with,
  without side), first-layer pre-activations, y_hat and Y_b."""

  def em_call(module, y, side):
    return module.em(y, side)

  def measure(base_vars, enh_vars, x):
    y_b, _ = base.apply(base_vars, x, method="encode")
    y = enh.apply(enh_vars, x, method="analysis")
    (y_hat, lik), state = enh.apply(enh_vars, y, y_b, method=em_call,
                                    capture_intermediates=True)
    bits = lambda p: -jnp.sum(jnp.log2(p), axis=(1, 2))  # (B, C)
    controls = {
        "zeros": jnp.zeros_like(y_b),
        "shuffled": jnp.roll(y_b, 1, axis=0),
        "mean": jnp.broadcast_to(jnp.mean(y_b, axis=(0, 1, 2)), y_b.shape)}
    without = {k: bits(enh.apply(enh_vars, y, side, method=em_call)[1]["y"])
               for k, side in controls.items()}
    pre = state["intermediates"]["em"]["entropy_parameters"]["Conv_0"][
        "__call__"][0]
    return bits(lik["y"]), without, pre, y_hat, y_b

  return jax.jit(measure)


def r_squared(target: np.ndarray, features: np.ndarray) -> np.ndarray:
  """R^2 per column of target (N, C) of a least-squares fit on features
  (N, F) plus an intercept; 0 for constant columns."""
  a = np.concatenate([features, np.ones((len(features), 1))], axis=1)
  coef, *_ = np.linalg.lstsq(a, target, rcond=None)
  resid = target - a @ coef
  var = target.var(axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    r2 = 1.0 - resid.var(axis=0) / var
  return np.where(var > 0, r2, 0.0)


def causal_neighbours(y: np.ndarray) -> np.ndarray:
  """(B, H, W, C) -> (B, H, W, 4C): y at left, up-left, up, up-right
  (zeros outside), the part of the serial 5x5 context nearest each position."""
  p = np.pad(y, ((0, 0), (1, 0), (1, 1), (0, 0)))
  h, w = y.shape[1:3]
  return np.concatenate([p[:, 1:h + 1, 0:w], p[:, 0:h, 0:w],
                         p[:, 0:h, 1:w + 1], p[:, 0:h, 2:w + 2]], axis=-1)


def analyse(measure, base_vars, enh_vars, batches) -> dict:
  with_, controls, y_hats, y_bs = [], [], [], []
  saturated_count, positions = 0, 0
  for x in batches:
    b_with, b_controls, pre, y_hat, y_b = measure(base_vars, enh_vars, x)
    with_.append(np.asarray(b_with))
    controls.append({k: np.asarray(v) for k, v in b_controls.items()})
    y_hats.append(np.asarray(y_hat))
    y_bs.append(np.asarray(y_b))
    pre = np.asarray(pre)
    saturated_count = saturated_count + np.sum(pre < SATURATION, axis=(0, 1, 2))
    positions += pre[..., 0].size
  with_ = np.concatenate(with_)
  controls = {k: np.concatenate([c[k] for c in controls]) for k in controls[0]}
  without = controls["zeros"]
  saturated = saturated_count == positions
  mostly_saturated = saturated_count >= 0.95 * positions
  y_hat, y_b = np.concatenate(y_hats), np.concatenate(y_bs)
  n, h, w, c = y_hat.shape
  flat = lambda a: a.reshape(n * h * w, -1).astype(np.float64)
  ctx = flat(causal_neighbours(y_hat))
  r2_b = r_squared(flat(y_hat), flat(y_b))
  r2_ctx = r_squared(flat(y_hat), ctx)
  r2_both = r_squared(flat(y_hat), np.concatenate([ctx, flat(y_b)], axis=1))

  bits_with, bits_without = with_.sum(0), without.sum(0)  # (C,) over images
  per_element = bits_without / (n * h * w)
  with np.errstate(invalid="ignore", divide="ignore"):
    saving = np.where(bits_without > 0, 1.0 - bits_with / bits_without, 0.0)
  active = per_element >= ACTIVE_BITS
  stuck = active & (saving < SAVING_THRESHOLD)
  learned = active & ~stuck
  with np.errstate(invalid="ignore", divide="ignore"):
    saving_mean = 1.0 - bits_with / controls["mean"].sum(0)
  stuck_mean = active & ~(saving_mean >= SAVING_THRESHOLD)
  gain = 0.5 * np.log2(np.maximum(1 - r2_ctx, 1e-12)
                       / np.maximum(1 - r2_both, 1e-12))
  estimate = np.minimum(gain * n * h * w, bits_without)
  median = lambda v, m: float(np.median(v[m])) if m.any() else float("nan")
  return {
      "images": n,
      "bits_with": float(bits_with.sum() / n),
      "bits_without": float(bits_without.sum() / n),
      "saving": float(1 - bits_with.sum() / bits_without.sum()),
      "active": int(active.sum()), "stuck": int(stuck.sum()),
      "stuck_mean": int(stuck_mean.sum()),
      "saving_shuffled": float(1 - bits_with.sum() / controls["shuffled"].sum()),
      "saving_mean": float(1 - bits_with.sum() / controls["mean"].sum()),
      "saturated": float(saturated.mean()), "hidden": int(saturated.size),
      "mostly_saturated": float(mostly_saturated.mean()),
      "r2_stuck": median(r2_b, stuck), "r2_learned": median(r2_b, learned),
      "r2_stuck_mean": median(r2_b, stuck_mean),
      "r2_learned_mean": median(r2_b, active & ~stuck_mean),
      "estimate": float(estimate.sum() / bits_without.sum()),
      "channels": {"bits_without_per_element": per_element, "saving": saving,
                   "saving_mean": saving_mean,
                   "r2_yb": r2_b, "r2_ctx": r2_ctx, "r2_ctx_yb": r2_both,
                   "stuck": stuck, "active": active},
  }


def markdown(rows: list[tuple[str, float, dict]]) -> str:
  head = ("| method | alpha | bits/img with | without | total saving % | "
          "saving vs shuffled % | vs mean % | "
          "active ch. | stuck ch. (<5%) | vs mean | saturated 1st layer | >=95% | "
          "median R² Y_b stuck | learned | stuck vs mean | learned vs mean | "
          "lin. est. saving % |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for method, alpha, r in rows:
    lines.append(
        f"| {method} | {alpha:g} | {r['bits_with']:.0f} | "
        f"{r['bits_without']:.0f} | {100 * r['saving']:.1f} | "
        f"{100 * r['saving_shuffled']:.1f} | {100 * r['saving_mean']:.1f} | "
        f"{r['active']} | {r['stuck']} | {r['stuck_mean']} | "
        f"{r['saturated']:.0%} of {r['hidden']} | {r['mostly_saturated']:.0%} | "
        f"{r['r2_stuck']:.2f} | {r['r2_learned']:.2f} | "
        f"{r['r2_stuck_mean']:.2f} | {r['r2_learned_mean']:.2f} | "
        f"{100 * r['estimate']:.1f} |")
  return "\n".join(lines)


def channel_table(r: dict) -> str:
  ch = r["channels"]
  lines = ["| ch | bits/elem without | saving % | vs mean % | R² Y_b | R² ctx "
           "| R² ctx+Y_b | |", "|---|---|---|---|---|---|---|---|"]
  for i in range(len(ch["saving"])):
    tag = ("stuck" if ch["stuck"][i] else "" if ch["active"][i]
           else "inactive")
    lines.append(f"| {i} | {ch['bits_without_per_element'][i]:.3f} | "
                 f"{100 * ch['saving'][i]:.1f} | "
                 f"{100 * ch['saving_mean'][i]:.1f} | {ch['r2_yb'][i]:.2f} | "
                 f"{ch['r2_ctx'][i]:.2f} | {ch['r2_ctx_yb'][i]:.2f} | {tag} |")
  return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
  """Prints the table for args.workdir (UserError when it has no model)."""
  stages = conditional_stages(args.workdir)
  if not stages:
    raise UserError(f"no finished conditional enhancement stages in "
                    f"{args.workdir}; train with python -m tcr_jax.main first")
  rows, measure, dataset = [], None, None
  for stage in stages:
    config, (base, base_vars), (enh, enh_vars), _ = compression.load_models(
        args.workdir, stage)
    if measure is None:  # every stage of a workdir has the same architecture
      measure = make_measure(base, enh)
      dataset = bases.for_config(config).dataset("validation")
      batches = [jnp.asarray(dataset.batch(range(i, min(i + args.batch,
                                                        args.images)))["image"])
                 for i in range(0, args.images, args.batch)]
    r = analyse(measure, base_vars, enh_vars, batches)
    _, method, alpha = re.fullmatch(r"(enhancement)_(\w+)_alpha(.+)",
                                    stage).groups()
    rows.append((method, float(alpha), r))
    if args.channels:
      print(f"\n### {stage}\n\n{channel_table(r)}\n", flush=True)
  print(f"\n{args.workdir}: {rows[0][2]['images']} validation images; "
        f"stuck = channels with >= {ACTIVE_BITS} bits/element saving < "
        f"{SAVING_THRESHOLD:.0%}; saturated = ELU pre-activation < "
        f"{SATURATION:g} everywhere\n")
  print(markdown(rows))
  return 0

