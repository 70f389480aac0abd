"""tcr-jax compare-seeds: BD-rate signs across seeds and the demo's checks,
on results.json files the tests write."""
from __future__ import annotations

import copy
import json
import os

from tcr_jax import cli, seeds

ALPHAS = (0.02, 0.08, 0.32, 1.28)


def _records(recon_gain: float = 1.0) -> list[dict]:
  """A sweep where everything behaves: rates fall with alpha, quality rises
  with rate, the proposal's base reconstructs `recon_gain` dB better."""
  recs = [{"layer": "reference", "method": "trivial",
           "constant_disparity_rmse": 1.7, "mean_disparity_rmse": 0.70,
           "mean_image_psnr": 15.0}]
  for i, a in enumerate(ALPHAS):
    for method, gain in (("baseline", 0.0), ("proposal", recon_gain)):
      bpp = 0.4 - 0.08 * i + (0.01 if method == "proposal" else 0.0)
      base = {"layer": "base", "method": method, "alpha": a,
              "bpp_base": bpp, "depth_rmse": 0.55 + 0.02 * i,
              "psnr_from_base": 19.5 + gain - 0.5 * i}
      recs.append(base)
      recs.append({**base, "layer": "enhancement",
                   "bpp_enhancement": 0.5 - 0.1 * i,
                   "psnr": 23.0 + 0.3 * gain - 0.8 * i})
    recs.append({"layer": "enhancement", "method": "standalone", "alpha": a,
                 "bpp_base": None, "bpp_enhancement": 0.8 - 0.15 * i,
                 "psnr": 22.0 - 0.8 * i})
  return recs


def _write(path, records, seed):
  os.makedirs(path)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(records, f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"seed": seed}, f)
  return str(path)


def test_checks_hold_on_a_well_behaved_sweep():
  results = seeds.checks(_records())
  assert len(results) == 13  # 3 references, 7 curves, mechanism, 2 finite
  assert all(held for _, held, _ in results), results


def test_a_proposal_better_at_every_rate_has_a_bd_quality_only():
  """Base reconstruction ranges 3 dB apart do not overlap: no BD-rate, but a
  BD-quality."""
  held = {what: ok for what, ok, _ in seeds.checks(_records(recon_gain=3.0))}
  assert held["every BD-rate is a finite number"] is False
  assert held["every comparison has a finite BD-rate or BD-quality"] is True


def test_each_check_fails_on_its_own_defect():
  def failed(recs):
    return [what for what, held, _ in seeds.checks(recs) if not held]

  def find(recs, layer, method, alpha):
    return next(r for r in recs if (r["layer"], r["method"], r.get("alpha"))
                == (layer, method, alpha))

  recs = _records()
  find(recs, "base", "baseline", 0.02)["depth_rmse"] = 0.71  # > the mean map
  assert failed(recs) == ["every base model's depth RMSE below the per-pixel "
                          "mean's", "baseline depth: rate falls as alpha "
                          "rises, quality rises with rate",
                          "every BD-rate is a finite number"]
  recs = _records(recon_gain=-0.5)  # the proposal's base reconstructs worse
  assert "proposal's reconstruction from the base beats the baseline's at " \
         "every alpha" in failed(recs)
  assert any(w.startswith("proposal's reconstruction from the base at its "
                          "highest rate") for w in failed(recs))
  recs = _records()
  for r in recs:  # the proposal's enhancement tops out at 21.9 dB
    if r["layer"] == "enhancement" and r["method"] == "proposal":
      r["psnr"] -= 23.6 - 21.9
  assert any("22 dB" in w for w in failed(recs))
  recs = _records()
  find(recs, "base", "baseline", 0.08)["bpp_base"] = 0.45  # > alpha 0.02's
  assert ("baseline reconstruction from the base: rate falls as alpha rises, "
          "quality rises with rate") in failed(recs)


def test_report_gives_every_seed_and_whether_signs_held(tmp_path, capsys):
  a = _write(tmp_path / "s0", _records(), 0)
  flipped = copy.deepcopy(_records())
  for r in flipped:  # seed 1: the proposal's enhancement worse than baseline's
    if r["layer"] == "enhancement" and r["method"] == "proposal":
      r["psnr"] -= 1.5
  b = _write(tmp_path / "s1", flipped, 1)
  out = tmp_path / "seeds.md"
  assert cli.main(["compare-seeds", a, b, "--output", str(out)]) == 0
  text = out.read_text()
  assert capsys.readouterr().out == text
  rows = [l for l in text.splitlines() if l.startswith("| enhancement: PSNR "
                                                      "(dB) vs total bpp (base")]
  assert len(rows) == 4 and all(r.endswith("| no |") for r in rows)
  recon = [l for l in text.splitlines()
           if l.startswith("| reconstruction from the base")]
  assert len(recon) == 4
  assert all(r.endswith("| yes (-) |") for r in recon if "BD-rate" in r)
  assert all(r.endswith("| yes (+) |") for r in recon if "BD-quality" in r)
  assert "seed 0" in text and "seed 1" in text
  assert "**missed**" in text  # seed 1's enhancement falls under 22 dB


def test_report_refuses_a_workdir_without_results(tmp_path, capsys):
  assert cli.main(["compare-seeds", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no results.json" in err
