"""The poster's four figures and the paper's regime, read off one sweep.

The poster compares the proposal (beta > 0) with the baseline (beta 0) in
four figures:

  Figure 3  the base task against the base rate: the reward does not hurt
            it (a lift, the poster says)
  Figure 4  the image read off the base latent: the proposal ahead
  Figure 5  the conditional reconstruction against the total rate (base and
            enhancement): BD-rate -22% on a depth base, -10% on a detection
            base
  Figure 6  the segmentation enhancement against the total rate: -26%

`figures(records)` gives, for each figure a sweep's records allow, its
number here and whether it shows at this size; `regime_checks(records)`
whether the sweep is in the paper's regime (the :reproduction variant's
bars, docs/reproduction.md). bd_rate.md carries both (`report_lines`), and
`tcr-jax compare-seeds` both for every seed.
"""
from __future__ import annotations

import math

from tcr_jax.reporting import rd

# The paper's regime (docs/reproduction.md) and Figure 3's bars.
DEPTH_MARGIN = 0.15          # every base this far below the mean map
OBJECTS_MARGIN = 0.30        # ... and this far on people and vehicles
REWARD_SHARE = 1 / 3         # reward / D_b at most
OVERLAP = 0.5                # base rates overlap by this share of the narrower range
SIDE_INFORMATION_BD = -25.0  # proposal's R_e vs the standalone's, PCHIP, at most (%)
DEPTH_BD_LIMIT = 10.0        # proposal's base-task BD-rate vs the baseline, PCHIP, at most (%)
# Where the base task is flat in rate (no BD-rate), Figure 3 holds if the
# proposal's task quality at equal rate (BD-quality) is at most this share
# of the baseline's mean quality worse.
FLAT_TASK_TOLERANCE = 0.02

# A BD-quality counts as a sign only beyond this share of the anchor's mean
# quality (flat curves give BD-qualities of float noise).
QUALITY_NOISE = 0.005
# A curve whose quality spans less than this share of its mean is flat in
# rate: BD numbers fitted to it are fits of noise (measured: mIoU curves
# spanning 0.015 gave PCHIP -46% and cubic -99.9% on one seed), so the
# figure has no number.
FLAT_CURVE = 0.05

SHOWN, NOT_SHOWN, NO_NUMBER = "shown", "not shown", "no number"
SMALLER = "same sign, smaller"     # Figures 5, 6: less than half the poster's saving
NO_RATE = "same sign, no BD-rate"  # Figures 5, 6: a better BD-quality, no size to compare
INCONCLUSIVE = "inconclusive"      # the BD-rates' signs disagree


def _finite(v) -> bool:
  return isinstance(v, float) and math.isfinite(v)


def _comparison(comps, prefix, anchor="baseline", test="proposal"):
  return next((c for c in comps if c["title"].startswith(prefix)
               and c["anchor"] == anchor and c["test"] == test), None)


def _numbers(c, unit="") -> str:
  pchip, cubic = c["bd"]["pchip"], c["bd"]["cubic"]
  if not _finite(pchip) and not _finite(cubic) and pchip == cubic:
    rate = f"no BD-rate ({rd._fmt_bd(pchip)})"
  else:
    rate = f"BD-rate {rd._fmt_bd(pchip)} (PCHIP), {rd._fmt_bd(cubic)} (cubic)"
  return f"{rate}; BD-quality {rd._fmt_bdq(c['bdq']['pchip'])}{unit} (PCHIP)"


def _flat(c) -> bool:
  """Whether either curve's quality spans less than FLAT_CURVE of its mean."""
  def span(q):
    mean = abs(sum(q) / len(q))
    return (max(q) - min(q)) / mean if mean else 0.0
  return min(span(c["anchor_curve"][1]), span(c["test_curve"][1])) < FLAT_CURVE


def _gain(c, flat_means_no_number: bool = True) -> float | None:
  """The proposal's gain over the baseline as one signed figure: minus its
  BD-rates where both fits give one and they agree in sign (the smaller in
  size), 0.0 where they disagree; else its BD-quality in the direction of
  better where it is beyond QUALITY_NOISE; None (no number) where neither
  is, or where a curve is flat in rate (`flat_means_no_number`: Figures 5
  and 6, whose curves are flat when the rate buys no quality)."""
  if flat_means_no_number and _flat(c):
    return None
  rates = [c["bd"][m] for m in rd.METHODS]
  if all(_finite(v) for v in rates):
    if min(rates) < 0 < max(rates):
      return 0.0
    return -min(rates, key=abs)
  bdq = c["bdq"]["pchip"]
  quality = c["anchor_curve"][1]
  noise = QUALITY_NOISE * abs(sum(quality) / len(quality))
  if _finite(bdq) and abs(bdq) > noise:
    return bdq if c["higher_is_better"] else -bdq
  return None


def _worst_below_mean_map(records, key="depth_rmse", ref_key="mean_disparity_rmse"):
  """(worst, its RMSE, the mean map's): the worst base model's depth RMSE
  relative to the per-pixel mean map's (-0.3: 30% below), or None without
  the reference."""
  ref = next((r for r in records if r.get("method") == "trivial"), {})
  values = [r[key] for r in records
            if r["layer"] == "base" and r.get(key) is not None]
  if not ref.get(ref_key) or not values:
    return None
  return max(values) / ref[ref_key] - 1, max(values), ref[ref_key]


def figures(records: list[dict]) -> list[dict]:
  """Per poster figure the records allow: dict(figure, poster, here,
  verdict), the verdict one of SHOWN, SMALLER, NO_RATE, INCONCLUSIVE,
  NOT_SHOWN and NO_NUMBER."""
  comps = rd.comparisons(records)
  out = []
  task = _comparison(comps, "base task")
  if task:
    depth = task["key"] == "depth_rmse"
    bd, bdq = task["bd"]["pchip"], task["bdq"]["pchip"]
    anchor_mean = sum(task["anchor_curve"][1]) / len(task["anchor_curve"][1])
    worse = (bdq if depth else -bdq) if _finite(bdq) else None
    found = _worst_below_mean_map(records) if depth else None
    worst = found[0] if found else None
    here = _numbers(task, " px" if depth else "")
    if worst is not None:
      here += f"; worst base {worst:+.0%} against the per-pixel mean map"
    learned = worst is None or worst <= -DEPTH_MARGIN
    if _finite(bd) and not _flat(task):
      verdict = SHOWN if learned and bd <= DEPTH_BD_LIMIT else NOT_SHOWN
    elif worse is not None:  # flat in rate: judged at equal rate
      verdict = (SHOWN if learned and worse <= FLAT_TASK_TOLERANCE * abs(anchor_mean)
                 else NOT_SHOWN)
    else:
      verdict = NO_NUMBER
    out.append(dict(figure="3: base task vs base rate",
                    poster="the reward does not hurt the base task (a lift, it says)",
                    here=here, verdict=verdict))
  recon = _comparison(comps, "reconstruction from the base")
  if recon:
    base = {m: {r["alpha"]: r["psnr_from_base"] for r in records
                if r["layer"] == "base" and r["method"] == m
                and r.get("psnr_from_base") is not None}
            for m in ("baseline", "proposal")}
    gains = [base["proposal"][a] - base["baseline"][a]
             for a in sorted(set(base["baseline"]) & set(base["proposal"]))]
    gain = _gain(recon, flat_means_no_number=False)
    ahead = bool(gains) and min(gains) > 0
    out.append(dict(
        figure="4: reconstruction read off the base",
        poster="the proposal ahead",
        here=(f"{min(gains):+.1f} to {max(gains):+.1f} dB at the same alpha; "
              if gains else "") + _numbers(recon, " dB"),
        verdict=(NO_NUMBER if gain is None else INCONCLUSIVE if gain == 0
                 else SHOWN if ahead and gain > 0 else NOT_SHOWN)))
  enhancement = _comparison(comps, "enhancement:")
  if enhancement:
    segmentation = enhancement["key"] == "miou"
    detection = any(r.get("map") is not None for r in records)
    claim = 26.0 if segmentation else 10.0 if detection else 22.0
    gain = _gain(enhancement)
    rated = all(_finite(enhancement["bd"][m]) for m in rd.METHODS)
    if gain is None:
      verdict = NO_NUMBER
    elif gain == 0:
      verdict = INCONCLUSIVE
    elif gain < 0:
      verdict = NOT_SHOWN
    else:
      verdict = NO_RATE if not rated else SHOWN if gain >= claim / 2 else SMALLER
    out.append(dict(
        figure=("6: segmentation" if segmentation else "5: conditional reconstruction")
        + " vs total rate",
        poster=f"BD-rate -{claim:g}%" + ("" if segmentation else
                                         " (detection base)" if detection
                                         else " (depth base)"),
        here=_numbers(enhancement, "" if segmentation else " dB")
        + ("; quality flat in rate" if _flat(enhancement) else ""),
        verdict=verdict))
  return out


def regime_checks(records: list[dict]) -> list[tuple[str, bool, str]]:
  """The checks of the paper's regime (the :reproduction variant's bars)
  that the records allow, as (what, held, the figures); a comparison
  without a number misses its check."""
  out = []
  comps = rd.comparisons(records)
  bases = [r for r in records if r["layer"] == "base"]
  for key, ref_key, margin, where in (
      ("depth_rmse", "mean_disparity_rmse", DEPTH_MARGIN, ""),
      ("depth_rmse_objects", "mean_disparity_rmse_objects", OBJECTS_MARGIN,
       " on people and vehicles")):
    found = _worst_below_mean_map(records, key, ref_key)
    if found:
      worst, rmse, mean_map = found
      out.append((f"every base model's depth RMSE{where} at least {margin:.0%} "
                  "below the per-pixel mean's", worst <= -margin,
                  f"worst {worst:+.0%} ({rmse:.3f} vs {mean_map:.3f} px)"))
  shares = [(r["alpha"], reward / r["depth_rmse"]) for r, reward in rd.rewards(records)]
  if shares:
    out.append((f"the proposal's reward at most {REWARD_SHARE:.2f} of its task "
                "term at every alpha", all(v <= REWARD_SHARE for _, v in shares),
                " ".join(f"{a:g}: {v:.2f}" for a, v in shares)))
  ranges = [[r["bpp_base"] for r in bases if r["method"] == m
             and r.get("bpp_base") is not None] for m in ("baseline", "proposal")]
  if all(len(v) >= 2 for v in ranges):
    common = min(map(max, ranges)) - max(map(min, ranges))
    narrower = min(max(v) - min(v) for v in ranges)
    share = common / narrower if narrower > 0 else 0.0
    out.append((f"the two methods' base rates overlap by at least {OVERLAP:.0%} of "
                "the narrower range", share >= OVERLAP, f"{share:.0%}"))
  bd = {(c["title"].split(":")[0], c["anchor"], c["test"]): c["bd"]["pchip"]
        for c in comps}
  side_key = ("side information", "standalone", "proposal")
  side = bd.get(side_key)
  if side_key in bd:
    out.append((f"side information: the proposal's conditional enhancement spends "
                f"at least {-SIDE_INFORMATION_BD:g}% less R_e than the standalone "
                "(PCHIP)", _finite(side) and side <= SIDE_INFORMATION_BD,
                rd._fmt_bd(side)))
  richer_key = ("side information", "baseline", "proposal")
  richer = bd.get(richer_key)
  if richer_key in bd:
    out.append(("side information: the proposal's conditional enhancement spends "
                "less R_e than the baseline's (PCHIP)", _finite(richer) and richer < 0,
                rd._fmt_bd(richer)))
  depth_key = ("base task", "baseline", "proposal")
  depth = bd.get(depth_key)
  if depth_key in bd and any(r.get("depth_rmse") is not None for r in bases):
    out.append((f"the proposal's depth BD-rate against the baseline at most "
                f"+{DEPTH_BD_LIMIT:g}% (PCHIP)",
                _finite(depth) and depth <= DEPTH_BD_LIMIT, rd._fmt_bd(depth)))
  return out


def report_lines(records: list[dict]) -> list[str]:
  """bd_rate.md's sections: the poster's figures, then the regime."""
  lines = []
  rows = figures(records)
  if rows:
    lines += ["", "The poster's figures at this size (proposal against baseline; "
              "docs/reproduction.md: the full-size report):", "",
              "| poster figure | the poster | here | verdict |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {r['figure']} | {r['poster']} | {r['here']} | {r['verdict']} |"
              for r in rows]
  checks = regime_checks(records)
  if checks:
    lines += ["", "The paper's regime (docs/reproduction.md: the bars):", "",
              "| check | held | figures |", "| --- | --- | --- |"]
    lines += [f"| {what} | {'yes' if held else '**no**'} | {figures_} |"
              for what, held, figures_ in checks]
  return lines
