"""Rate-distortion reporting: BD-rate, RD plots, previews.

`bd_rate` implements Bjontegaard's delta rate two ways:
  "cubic"  the authors' (and Bjontegaard's VCEG-M33) method: log-rate as a
           cubic polynomial of quality fitted by least squares (degree
           n - 1 when fewer than four points), integrated over the overlap;
  "pchip"  piecewise cubic Hermite interpolation of log-rate over quality
           (the monotone interpolation JVET's tools use; scipy's
           Fritsch-Carlson derivative choice), integrated over the overlap.
Both return percent: negative means the test needs less rate than the
anchor for the same quality. Where the quality ranges do not overlap there
is no number: None is returned and the report says so. Where there is no
meaningful number (a curve running the wrong way, a cubic fit that diverges
beyond float range) `BDRateUndefined` says why, and the report prints that.
`bd_quality` is the other Bjontegaard delta, quality at equal rate (BD-PSNR),
defined where the rate ranges overlap.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

METHODS = ("cubic", "pchip")


class BDRateUndefined(ValueError):
  """No BD-rate for these curves; the message says why, in a few words."""

# The depth head's ceiling, written by `tcr-jax ceiling` (tcr_jax/tools/ceiling.py).
CEILING = "ceiling.json"


def _read_json(path: str):
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _points(rate, quality) -> tuple[np.ndarray, np.ndarray]:
  r = np.asarray(rate, np.float64)
  q = np.asarray(quality, np.float64)
  if r.shape != q.shape or r.ndim != 1:
    raise ValueError("rate and quality must be 1-D sequences of equal length")
  if np.any(r <= 0) or not np.all(np.isfinite(r)) or not np.all(np.isfinite(q)):
    raise ValueError("rates must be positive and finite, qualities finite")
  return r, q


def _by_x(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Sorted distinct x, y averaged over equal x (interpolation needs
  distinct abscissae)."""
  ux, inv = np.unique(x, return_inverse=True)
  return ux, np.bincount(inv, weights=y) / np.bincount(inv)


def _prepare(rate, quality, higher_is_better):
  """(quality, log-rate) for fitting log-rate over quality."""
  r, q = _points(rate, quality)
  if not higher_is_better:
    q = -q
  if len(q) >= 2 and np.corrcoef(np.log(r), q)[0, 1] < 0:
    raise BDRateUndefined(
        "quality falls as rate rises: for a distortion where lower is better "
        "(e.g. depth RMSE) pass higher_is_better=False")
  return _by_x(q, np.log(r))


def _integral(q, lr, lo, hi, method):
  if method == "cubic":
    deg = min(3, len(q) - 1)
    poly = np.polynomial.Polynomial.fit(q, lr, deg).convert()
    antider = poly.integ()
    return antider(hi) - antider(lo)
  from scipy.interpolate import PchipInterpolator
  return PchipInterpolator(q, lr).integrate(lo, hi)


def bd_rate(rate_anchor: Sequence[float], quality_anchor: Sequence[float],
            rate_test: Sequence[float], quality_test: Sequence[float],
            method: str = "cubic", higher_is_better: bool = True
            ) -> float | None:
  """Bjontegaard delta rate of test against anchor, in percent.

  Args:
    rate_anchor, quality_anchor: the anchor's RD points (e.g. bpp, PSNR).
    rate_test, quality_test: the test's RD points.
    method: "cubic" or "pchip".
    higher_is_better: False for distortions such as depth RMSE. BD-rate
      itself does not depend on the direction of the quality axis; the flag
      states which way is better so that a curve running the wrong way
      (quality falling as rate rises) is refused instead of averaged.

  Returns:
    percent rate difference at equal quality, or None where the two quality
    ranges do not overlap (or a curve has fewer than two distinct points).
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  qa, la = _prepare(rate_anchor, quality_anchor, higher_is_better)
  qt, lt = _prepare(rate_test, quality_test, higher_is_better)
  if len(qa) < 2 or len(qt) < 2:
    return None
  lo, hi = max(qa[0], qt[0]), min(qa[-1], qt[-1])
  if not hi > lo:
    return None
  avg = (_integral(qt, lt, lo, hi, method) - _integral(qa, la, lo, hi, method)) / (hi - lo)
  try:
    if not math.isfinite(avg):
      raise OverflowError
    return float((math.exp(avg) - 1.0) * 100.0)
  except OverflowError:
    raise BDRateUndefined(f"the {method} fit diverges (log-rate difference "
                          f"{avg:.3g})") from None


def bd_quality(rate_anchor: Sequence[float], quality_anchor: Sequence[float],
               rate_test: Sequence[float], quality_test: Sequence[float],
               method: str = "cubic") -> float | None:
  """Bjontegaard delta quality (BD-PSNR for PSNR): the test's mean quality
  minus the anchor's at equal rate, over the overlap of the two log-rate
  ranges, in the quality's unit (for depth RMSE negative is better).

  Quality is fitted as a function of log-rate, the other way round from
  `bd_rate`, with the same two methods; it is the number to read where the
  quality ranges do not overlap (a test better than the anchor at every
  rate) and `bd_rate` has none. None where the rate ranges do not overlap.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  ra, qa = _points(rate_anchor, quality_anchor)
  rt, qt = _points(rate_test, quality_test)
  (la, qa), (lt, qt) = _by_x(np.log(ra), qa), _by_x(np.log(rt), qt)
  if len(la) < 2 or len(lt) < 2:
    return None
  lo, hi = max(la[0], lt[0]), min(la[-1], lt[-1])
  if not hi > lo:
    return None
  return float((_integral(lt, qt, lo, hi, method)
                - _integral(la, qa, lo, hi, method)) / (hi - lo))


# --------------------------------------------------------------------------
# Reports from results.json records.


def _curve(records, layer, method, rate_fn, quality_key):
  pts = [(rate_fn(r), r[quality_key]) for r in records
         if r["layer"] == layer and r["method"] == method
         and r.get(quality_key) is not None and rate_fn(r) is not None]
  pts.sort()
  return [p[0] for p in pts], [p[1] for p in pts]


def _total_rate(r):
  if r.get("bpp_enhancement") is None:
    return None
  return (r.get("bpp_base") or 0.0) + r["bpp_enhancement"]


def comparisons(records: list[dict]) -> list[dict]:
  """The paper's comparisons: (title, anchor, test, curves, flags)."""
  enh_key = "psnr" if any(r.get("psnr") is not None for r in records
                          if r["layer"] == "enhancement") else "miou"
  enh_label = "PSNR (dB)" if enh_key == "psnr" else "mIoU"
  base_rate = lambda r: r.get("bpp_base")
  detection = any(r.get("map") is not None for r in records)
  rows = [
      ("base task: mAP vs base bpp", "base", base_rate, "map", True,
       "baseline", "proposal", "rd_base_task.png") if detection else
      ("base task: depth RMSE (px) vs base bpp", "base", base_rate,
       "depth_rmse", False, "baseline", "proposal", "rd_base_task.png"),
      ("reconstruction from the base: PSNR (dB) vs base bpp", "base",
       base_rate, "psnr_from_base", True, "baseline", "proposal",
       "rd_base_reconstruction.png"),
      (f"enhancement: {enh_label} vs total bpp (base + enhancement)",
       "enhancement", _total_rate, enh_key, True, "baseline", "proposal",
       "rd_enhancement.png"),
      (f"enhancement: {enh_label} vs total bpp, conditional vs standalone",
       "enhancement", _total_rate, enh_key, True, "standalone", "baseline",
       "rd_enhancement.png"),
      (f"enhancement: {enh_label} vs total bpp, conditional vs standalone",
       "enhancement", _total_rate, enh_key, True, "standalone", "proposal",
       "rd_enhancement.png"),
  ]
  # The side information's use: R_e alone, the base's rate left out.
  rows += [(f"side information: {enh_label} vs enhancement bpp (R_e alone)",
            "enhancement", lambda r: r.get("bpp_enhancement"), enh_key, True,
            anchor, test, "rd_side_information.png")
           for anchor, test in (("standalone", "baseline"), ("standalone", "proposal"),
                                ("baseline", "proposal"))]
  out = []
  for title, layer, rate_fn, key, hib, anchor, test, plot in rows:
    ra, qa = _curve(records, layer, anchor, rate_fn, key)
    rt, qt = _curve(records, layer, test, rate_fn, key)
    if not ra or not rt:
      continue
    out.append(dict(title=title, layer=layer, key=key, higher_is_better=hib,
                    anchor=anchor, test=test, anchor_curve=(ra, qa),
                    test_curve=(rt, qt), plot=plot,
                    bd={m: _safe_bd(ra, qa, rt, qt, m, hib) for m in METHODS},
                    bdq={m: bd_quality(ra, qa, rt, qt, m) for m in METHODS}))
  return out


def _safe_bd(ra, qa, rt, qt, method, hib):
  """The BD-rate, or the reason there is none (a string)."""
  try:
    return bd_rate(ra, qa, rt, qt, method, hib)
  except BDRateUndefined as e:
    return str(e).split(":")[0]


def _fmt_bd(v):
  if v is None:
    return "no overlap"
  return v if isinstance(v, str) else f"{v:+.2f}%"


def _fmt_bdq(v):
  return "no overlap" if v is None else f"{v:+.3f}"


def write_report(records: list[dict], workdir: str, experiment: str,
                 enhancement_rate_pixels: str = "full",
                 sections: Sequence[str] = ()) -> str:
  """Writes bd_rate.md and rd_*.png into workdir; returns the markdown.
  The depth ceiling (WORKDIR/ceiling.json, `tcr-jax ceiling`) joins the
  trivial references where it has been measured; `sections` (markdown
  lines, e.g. poster.report_lines) follow the BD-rate table."""
  ceiling_record = _read_json(os.path.join(workdir, CEILING))
  split = next((r["split"] for r in records if r.get("split")), None)
  if ceiling_record and split and ceiling_record.get("split", split) != split:
    ceiling_record = None  # measured on other images than the models
  if ceiling_record and not any(r.get("method") == "ceiling" for r in records):
    records = [*records, ceiling_record]
  comps = comparisons(records)
  unit = ("estimated bits per full-resolution pixel" if enhancement_rate_pixels == "full"
          else "estimated bits per full-resolution pixel for the base layer "
               "and per half-resolution pixel for the enhancement comparisons")
  lines = [f"# BD-rate, {experiment}", "",
           "Negative: the test needs less rate than the anchor for the same "
           f"quality. Rates are {unit}.", "",
           "BD-quality: the test's mean quality minus the anchor's at equal "
           "rate, in the quality's unit (dB; px for depth RMSE, where negative "
           "is better); it has a value where the quality ranges do not overlap.",
           "",
           "| comparison | anchor | test | points | BD-rate (cubic) | BD-rate (PCHIP) "
           "| BD-quality (cubic) | BD-quality (PCHIP) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for c in comps:
    lines.append(f"| {c['title']} | {c['anchor']} | {c['test']} | "
                 f"{len(c['anchor_curve'][0])}/{len(c['test_curve'][0])} | "
                 f"{_fmt_bd(c['bd']['cubic'])} | {_fmt_bd(c['bd']['pchip'])} | "
                 f"{_fmt_bdq(c['bdq']['cubic'])} | {_fmt_bdq(c['bdq']['pchip'])} |")
  lines += list(sections)
  lines += _reward_lines(records)
  lines += _reference_lines(records)
  lines += stage_lines(workdir)
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "bd_rate.md"), "w") as f:
    f.write(text)
  _plots(records, comps, workdir, experiment)
  return text


_REFERENCES = (  # (reference method, record key, what it is, model key, lower is better)
    ("trivial", "constant_disparity_rmse", "depth RMSE (px) predicting one constant",
     "depth_rmse", True),
    ("trivial", "mean_disparity_rmse", "depth RMSE (px) predicting the per-pixel mean "
     "disparity", "depth_rmse", True),
    ("trivial", "mean_disparity_rmse_objects", "the same on the pixels of people and "
     "vehicles", "depth_rmse_objects", True),
    ("ceiling", "depth_rmse", "depth RMSE (px) of the depth head on uncompressed "
     "images (ceiling)", "depth_rmse", True),
    ("ceiling", "depth_rmse_objects", "the ceiling on the pixels of people and "
     "vehicles", "depth_rmse_objects", True),
    ("trivial", "mean_image_psnr", "PSNR (dB) of the mean training image",
     "psnr_from_base", False),
)


def _references(records) -> dict[str, dict]:
  """Reference method ("trivial", "ceiling") -> its record."""
  return {r.get("method", "trivial"): r for r in records if r.get("layer") == "reference"}


def rewards(records) -> list[tuple[dict, float]]:
  """Per proposal base by alpha: (record, reward), the reward L_b - alpha *
  R_b - D_b = beta * 255 * RMSE(x, x_rec) read off its record; its ratio to
  D_b is the stand-in for beta << lambda_b (docs/reproduction.md)."""
  rows = sorted((r for r in records if r.get("layer") == "base"
                 and r.get("method") == "proposal" and r.get("beta")
                 and None not in (r.get("loss"), r.get("bpp_base"), r.get("depth_rmse"))),
                key=lambda r: r["alpha"])
  return [(r, r["loss"] - r["alpha"] * r["bpp_base"] - r["depth_rmse"]) for r in rows]


def _reward_lines(records) -> list[str]:
  rows = rewards(records)
  if not rows:
    return []
  lines = ["", "The proposal's reward against its task term:", "",
           "| alpha | beta | D_b: depth RMSE (px) | reward: beta * 255 * RMSE | reward / D_b |",
           "| --- | --- | --- | --- | --- |"]
  for r, reward in rows:
    lines.append(f"| {r['alpha']:g} | {r['beta']:g} | {r['depth_rmse']:.3f} | "
                 f"{reward:.3f} | {reward / r['depth_rmse']:.2f} |")
  return lines


def stage_lines(workdir: str) -> list[str]:
  """Per finished stage (WORKDIR/stages/*/done.json): its step cap, the steps
  it trained, the step of its result (the best validation evaluation), and
  whether early stopping ended it or the cap did."""
  root = os.path.join(workdir, "stages")
  done = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    path = os.path.join(root, name, "done.json")
    if os.path.exists(path):
      with open(path) as f:
        done.append((name, json.load(f)))
  done = [(n, d) for n, d in done if d.get("trained_steps") is not None]
  if not done:
    return []
  lines = ["", "Training (early stopping on the validation scenes):", "",
           "| stage | cap | trained | result at step | ended by |",
           "| --- | --- | --- | --- | --- |"]
  for name, d in done:
    cap, trained, result = d["steps"], d["trained_steps"], d.get("result_step")
    ended = ("early stopping" if trained < cap else
             "the cap, still improving" if result == cap else "the cap")
    lines.append(f"| {name} | {cap} | {trained} | {result} | {ended} |")
  return lines


def _reference_lines(records) -> list[str]:
  """The trivial references next to the best model of each method."""
  refs = _references(records)
  if not refs:
    return []
  split = next((r["split"] for r in records if r.get("split")), "validation")
  lines = ["", "References (the trivial ones from the training split; every "
           f"figure measured on the {split} images) and the best base model "
           "of each method:", "",
           "| reference | value | baseline | proposal |", "| --- | --- | --- | --- |"]
  for method, key, label, model_key, lower in _REFERENCES:
    ref = refs.get(method, {})
    if ref.get(key) is None:
      continue
    best = []
    for method in ("baseline", "proposal"):
      values = [r[model_key] for r in records if r.get("layer") == "base"
                and r.get("method") == method and r.get(model_key) is not None]
      best.append(f"{(min if lower else max)(values):.3f}" if values else "-")
    lines.append(f"| {label} | {ref[key]:.3f} | {best[0]} | {best[1]} |")
  return lines


def _plots(records, comps, workdir, experiment):
  from matplotlib.figure import Figure
  for plot, cs in _by_plot(comps).items():
    fig = Figure(figsize=(5, 3.6))
    _draw_curves(fig.add_subplot(), cs, records, experiment)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, plot), dpi=110)


def _by_plot(comps) -> dict[str, list[dict]]:
  by_plot: dict[str, list[dict]] = {}
  for c in comps:
    by_plot.setdefault(c["plot"], []).append(c)
  return by_plot


def _draw_curves(ax, cs, records, experiment) -> None:
  """One RD plot: every method of the comparisons `cs`, and the trivial
  references of their quality."""
  drawn = set()
  for c in cs:
    for method, (r, q) in ((c["anchor"], c["anchor_curve"]),
                           (c["test"], c["test_curve"])):
      if method in drawn:
        continue
      drawn.add(method)
      ax.plot(r, q, "o-", label=method)
  refs = _references(records)
  for method, key, label, model_key, _ in _REFERENCES:
    ref = refs.get(method, {})
    if model_key == cs[0]["key"] and ref.get(key) is not None and key != "constant_disparity_rmse":
      if method == "ceiling":
        ax.axhline(ref[key], color="black", ls=":", lw=1,
                   label="ceiling: depth head on uncompressed images")
      else:
        ax.axhline(ref[key], color="grey", ls="--", lw=1, label=label.split(" predicting ")[-1]
                   .replace("PSNR (dB) of the ", ""))
  ax.set_xlabel("bpp" + (" (enhancement)" if cs[0]["plot"] == "rd_side_information.png"
                         else " (base + enhancement)" if cs[0]["layer"] == "enhancement"
                         else " (base)"))
  ax.set_ylabel(cs[0]["key"].replace("_", " "))
  ax.set_title(f"{experiment}: {cs[0]['title'].split(':')[0]}", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def rd_figure(records: list[dict], experiment: str = ""):
  """The RD plots of write_report side by side in one matplotlib Figure
  (one panel per plot, in the order of `comparisons`), for notebooks: it
  is built without pyplot, so no backend is switched; show it with
  IPython's display()."""
  from matplotlib.figure import Figure
  by_plot = _by_plot(comparisons(records))
  fig = Figure(figsize=(5 * max(len(by_plot), 1), 3.8))
  for i, cs in enumerate(by_plot.values()):
    _draw_curves(fig.add_subplot(1, len(by_plot), i + 1), cs, records, experiment)
  fig.tight_layout()
  return fig
