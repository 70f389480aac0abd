"""One sweep under several seeds: which results are not luck.

  tcr-jax compare-seeds out/demo out/demo_seed1 out/demo_seed2 \
      --output out/seeds.md

reads each workdir's results.json (the same config but `--config.seed`,
which for the synthetic scenes also changes the scenes) and writes a
markdown report:
  * every BD-rate of bd_rate.md for every seed, and whether its sign held on
    all of them;
  * the demo's checks for every seed (`checks`): trained models against the
    trivial references, curves that behave, the paper's mechanism;
  * the poster's figures and the checks of the paper's regime for every
    seed (poster.py: the :reproduction variant's bars, docs/reproduction.md).
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence

from tcr_jax.errors import UserError
from tcr_jax.reporting import poster, rd

# The demo's targets (README: what the demo shows): the proposal's
# reconstruction from the base this far above the mean image, and its
# conditional enhancement at least this good, both at their highest rate.
RECONSTRUCTION_MARGIN_DB = 5.0
ENHANCEMENT_PSNR_DB = 22.0


def load_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir}: no results.json (has its sweep finished?)")
  with open(path) as f:
    return json.load(f)


def _seed(workdir: str) -> str:
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      return str(json.load(f).get("seed", "?"))
  return "?"


def _by_alpha(records, layer, method) -> list[dict]:
  return sorted((r for r in records if r["layer"] == layer
                 and r["method"] == method), key=lambda r: r["alpha"])


def _monotone(values: Sequence[float], decreasing: bool) -> bool:
  pairs = list(zip(values, values[1:]))
  return all(b < a if decreasing else b > a for a, b in pairs)


def checks(records: list[dict]) -> list[tuple[str, bool, str]]:
  """(what, held, the figures) for the checks the records allow."""
  out = []
  ref = next((r for r in records if r["layer"] == "reference"), {})
  bases = {m: _by_alpha(records, "base", m) for m in ("baseline", "proposal")}
  enh = {m: _by_alpha(records, "enhancement", m)
         for m in ("baseline", "proposal", "standalone")}
  all_bases = bases["baseline"] + bases["proposal"]
  if ref.get("mean_disparity_rmse") is not None and all_bases:
    worst = max(r["depth_rmse"] for r in all_bases)
    out.append(("every base model's depth RMSE below the per-pixel mean's",
                worst < ref["mean_disparity_rmse"],
                f"worst {worst:.3f} px vs {ref['mean_disparity_rmse']:.3f} px"))
  if ref.get("mean_image_psnr") is not None and bases["proposal"]:
    top = max(bases["proposal"], key=lambda r: r["bpp_base"])
    need = ref["mean_image_psnr"] + RECONSTRUCTION_MARGIN_DB
    out.append((f"proposal's reconstruction from the base at its highest rate "
                f">= mean image + {RECONSTRUCTION_MARGIN_DB:g} dB",
                top["psnr_from_base"] >= need,
                f"{top['psnr_from_base']:.2f} dB vs {need:.2f} dB"))
  if enh["proposal"] and enh["proposal"][0].get("psnr") is not None:
    top = max(enh["proposal"], key=rd._total_rate)
    out.append((f"proposal's conditional enhancement at its highest total rate "
                f">= {ENHANCEMENT_PSNR_DB:g} dB",
                top["psnr"] >= ENHANCEMENT_PSNR_DB, f"{top['psnr']:.2f} dB"))
  curves = []  # (name, [(rate, quality)] by alpha, quality higher is better)
  for m, rs in bases.items():
    if rs and rs[0].get("depth_rmse") is not None:
      curves.append((f"{m} depth", [(r["bpp_base"], r["depth_rmse"]) for r in rs], False))
    if rs:
      curves.append((f"{m} reconstruction from the base",
                     [(r["bpp_base"], r["psnr_from_base"]) for r in rs], True))
  for m, rs in enh.items():
    if rs and rs[0].get("psnr") is not None:
      curves.append((f"{m} enhancement",
                     [(rd._total_rate(r), r["psnr"]) for r in rs], True))
  for name, pts, hib in curves:
    rates = [p[0] for p in pts]
    by_rate = [q for _, q in sorted(pts)]
    held = _monotone(rates, decreasing=True) and _monotone(by_rate, not hib)
    out.append((f"{name}: rate falls as alpha rises, quality rises with rate",
                held, " ".join(f"{r:.3f}/{q:.2f}" for r, q in pts)))
  if bases["baseline"] and bases["proposal"]:
    pairs = [(b["alpha"], b["psnr_from_base"], p["psnr_from_base"])
             for b, p in zip(bases["baseline"], bases["proposal"])
             if b["alpha"] == p["alpha"]]
    out.append(("proposal's reconstruction from the base beats the baseline's "
                "at every alpha", all(p > b for _, b, p in pairs),
                " ".join(f"{a:g}: {b:.2f}<{p:.2f}" if p > b else
                         f"{a:g}: {b:.2f}>={p:.2f}" for a, b, p in pairs)))
  comps = rd.comparisons(records)
  bds = [v for c in comps for v in c["bd"].values()]
  if bds:
    finite = [v for v in bds if _finite(v)]
    out.append(("every BD-rate is a finite number", len(finite) == len(bds),
                f"{len(finite)} of {len(bds)}"))
    some = [c for c in comps if any(_finite(v) for v in
                                    (*c["bd"].values(), *c["bdq"].values()))]
    out.append(("every comparison has a finite BD-rate or BD-quality",
                len(some) == len(comps), f"{len(some)} of {len(comps)}"))
  return out


def _finite(v) -> bool:
  return isinstance(v, float) and math.isfinite(v)


def _mean_sd(values, fmt) -> str:
  """Mean and sample standard deviation over the seeds, when every seed has
  a number; "-" otherwise."""
  if not values or not all(_finite(v) for v in values):
    return "-"
  mean = sum(values) / len(values)
  if len(values) == 1:
    return fmt(mean)
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
  return f"{fmt(mean)} ({fmt(sd).lstrip('+')})"


def _sign(v) -> str | None:
  if _finite(v) and v != 0:
    return "-" if v < 0 else "+"
  return None


def report(workdirs: Sequence[str]) -> str:
  """The markdown report for the workdirs of one sweep under several seeds."""
  if not workdirs:
    raise UserError("compare-seeds needs at least one workdir")
  runs = [(_seed(w), load_records(w)) for w in workdirs]
  seeds = [s for s, _ in runs]
  comps = [rd.comparisons(recs) for _, recs in runs]
  keys = [(c["title"], c["anchor"], c["test"]) for c in comps[0]]
  lines = ["# One sweep, several seeds", "",
           "Workdirs: " + ", ".join(f"`{w}` (seed {s})"
                                    for w, s in zip(workdirs, seeds)), "",
           "## BD-rates and BD-qualities", "",
           "BD-rate: negative, the test needs less rate than the anchor for "
           "the same quality. BD-quality: the test's quality minus the "
           "anchor's at equal rate (for depth RMSE negative is better). As in "
           "each workdir's bd_rate.md.", "",
           "| comparison | anchor | test | delta | "
           + " | ".join(f"seed {s}" for s in seeds) + " | mean (sd) | same sign on all |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in seeds)
           + " | --- | --- |"]
  for key in keys:
    for field, name, fmt in (("bd", "BD-rate", rd._fmt_bd),
                             ("bdq", "BD-quality", rd._fmt_bdq)):
      for method in rd.METHODS:
        values = []
        for run in comps:
          match = [c for c in run if (c["title"], c["anchor"], c["test"]) == key]
          values.append(match[0][field][method] if match else None)
        signs = {_sign(v) for v in values}
        held = (f"yes ({signs.pop()})" if len(signs) == 1 and None not in signs
                else "no")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {name} ({method}) | "
                     + " | ".join(fmt(v) for v in values)
                     + f" | {_mean_sd(values, fmt)} | {held} |")
  lines += ["", "## The poster's figures (proposal against baseline)", "",
            "| figure | the poster | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "| --- | --- | " + " | ".join("---" for _ in seeds) + " |"]
  per_seed = [{f["figure"]: f for f in poster.figures(recs)} for _, recs in runs]
  for name in dict.fromkeys(n for run in per_seed for n in run):
    claim = next(run[name]["poster"] for run in per_seed if name in run)
    cells = [f"{run[name]['verdict']}: {run[name]['here']}" if name in run else "n/a"
             for run in per_seed]
    lines.append(f"| {name} | {claim} | " + " | ".join(cells) + " |")
  for title, check in (("Checks", checks),
                       ("The paper's regime (docs/reproduction.md)",
                        poster.regime_checks)):
    lines += ["", f"## {title}", "",
              "| check | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "| --- | " + " | ".join("---" for _ in seeds) + " |"]
    per_seed = [{what: (held, figures) for what, held, figures in check(recs)}
                for _, recs in runs]
    names = list(dict.fromkeys(w for run in per_seed for w in run))
    for what in names:
      cells = [("held" if run[what][0] else "**missed**") + f": {run[what][1]}"
               if what in run else "n/a" for run in per_seed]
      lines.append(f"| {what} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
