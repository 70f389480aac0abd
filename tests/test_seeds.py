"""tcr-jax compare-seeds: BD-rate signs across seeds and the demo's checks,
on results.json files the tests write."""
from __future__ import annotations

import copy
import json
import os

from tcr_jax import cli
from tcr_jax.reporting import poster, seeds

ALPHAS = (0.02, 0.08, 0.32, 1.28)


def _records(recon_gain: float = 1.0) -> list[dict]:
  """A sweep where everything behaves: rates fall with alpha, quality rises
  with rate, the proposal's base reconstructs `recon_gain` dB better."""
  recs = [{"layer": "reference", "method": "trivial",
           "constant_disparity_rmse": 1.7, "mean_disparity_rmse": 0.75,
           "mean_disparity_rmse_objects": 1.8, "mean_image_psnr": 15.0}]
  for i, a in enumerate(ALPHAS):
    for method, gain in (("baseline", 0.0), ("proposal", recon_gain)):
      bpp = 0.4 - 0.08 * i + (0.01 if method == "proposal" else 0.0)
      base = {"layer": "base", "method": method, "alpha": a,
              "bpp_base": bpp, "depth_rmse": 0.55 + 0.02 * i,
              "depth_rmse_objects": 1.0 + 0.05 * i,
              "psnr_from_base": 19.5 + gain - 0.5 * i}
      if method == "proposal":  # reward 0.1: a sixth of D_b
        base.update(beta=0.005, loss=a * bpp + base["depth_rmse"] + 0.1)
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
  regime = poster.regime_checks(_records())
  assert len(regime) == 7 and all(held for _, held, _ in regime), regime


def test_a_proposal_better_at_every_rate_has_a_bd_quality_only():
  """Base reconstruction ranges 3 dB apart do not overlap: no BD-rate, but a
  BD-quality."""
  held = {what: ok for what, ok, _ in seeds.checks(_records(recon_gain=3.0))}
  assert held["every BD-rate is a finite number"] is False
  assert held["every comparison has a finite BD-rate or BD-quality"] is True


def test_each_check_fails_on_its_own_defect():
  def failed(recs):
    return [what for what, held, _ in seeds.checks(recs) + poster.regime_checks(recs)
            if not held]

  def find(recs, layer, method, alpha):
    return next(r for r in recs if (r["layer"], r["method"], r.get("alpha"))
                == (layer, method, alpha))

  recs = _records()
  find(recs, "base", "baseline", 0.02)["depth_rmse"] = 0.76  # > the mean map
  assert failed(recs) == ["every base model's depth RMSE below the per-pixel "
                          "mean's", "baseline depth: rate falls as alpha "
                          "rises, quality rises with rate",
                          "every BD-rate is a finite number",
                          "every base model's depth RMSE at least 15% below the "
                          "per-pixel mean's",
                          # no depth BD-rate: the baseline's curve turns back
                          "the proposal's depth BD-rate against the baseline at "
                          "most +10% (PCHIP)"]
  recs = _records()
  find(recs, "base", "proposal", 1.28)["depth_rmse_objects"] = 1.3  # -28%
  assert failed(recs) == ["every base model's depth RMSE on people and vehicles "
                          "at least 30% below the per-pixel mean's"]
  recs = _records()
  find(recs, "base", "proposal", 0.32)["loss"] += 0.15  # reward 0.25 of 0.59
  assert failed(recs) == ["the proposal's reward at most 0.33 of its task term "
                          "at every alpha"]
  recs = _records()
  for r in recs:  # the proposal's base rates above all of the baseline's
    if r["layer"] != "reference" and r["method"] == "proposal":
      r["bpp_base"] += 0.2
  assert ("the two methods' base rates overlap by at least 50% of the narrower "
          "range") in failed(recs)
  recs = _records()
  for r in recs:  # the standalone enhancement as cheap as the conditional ones
    if r["layer"] == "enhancement" and r["method"] == "standalone":
      r["bpp_enhancement"] = 0.5 - 0.1 * ALPHAS.index(r["alpha"])
      r["psnr"] += 1.3
  assert ("side information: the proposal's conditional enhancement spends at "
          "least 25% less R_e than the standalone (PCHIP)") in failed(recs)
  recs = _records()
  for r in recs:  # the proposal's enhancement spends 20% more R_e
    if r["layer"] == "enhancement" and r["method"] == "proposal":
      r["bpp_enhancement"] *= 1.2
  assert ("side information: the proposal's conditional enhancement spends "
          "less R_e than the baseline's (PCHIP)") in failed(recs)
  recs = _records()
  for r in recs:  # the proposal's base spends 30% more for the same depth
    if r["layer"] == "base" and r["method"] == "proposal":
      r["bpp_base"] *= 1.3
  assert ("the proposal's depth BD-rate against the baseline at most +10% "
          "(PCHIP)") in failed(recs)
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
  # Mean and standard deviation over the seeds: the same value on both seeds
  # has that mean and no spread; the flipped enhancement has a spread.
  cells = [c.strip() for c in recon[0].strip("|").split("|")]
  assert cells[6] == f"{cells[4]} (0.00%)" and cells[4] == cells[5]
  enh = [c.strip() for c in rows[0].strip("|").split("|")]
  assert enh[4] != enh[5] and enh[6].endswith(")") and "(0.00" not in enh[6]
  assert "seed 0" in text and "seed 1" in text
  assert "**missed**" in text  # seed 1's enhancement falls under 22 dB
  regime = text.split("## The paper's regime")[1].splitlines()
  side = next(l for l in regime if l.startswith("| side information: the proposal's "
                                                "conditional enhancement spends less"))
  assert side.count("held") == 1 and side.count("**missed**") == 1  # seed 1 misses it
  figures = text.split("## The poster's figures")[1].split("##")[0].splitlines()
  five = next(l for l in figures if l.startswith("| 5: conditional reconstruction"))
  # seed 0: about -9%; seed 1: the proposal's enhancement 1.5 dB worse
  assert "| same sign, smaller: BD-rate -" in five and "| not shown: BD-rate +" in five


def test_report_refuses_a_workdir_without_results(tmp_path, capsys):
  assert cli.main(["compare-seeds", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "no results.json" in err
