"""poster.figures: each of the poster's figures read off records the tests
write, and each verdict turned by the defect it guards against."""
from __future__ import annotations

import pytest

from tcr_jax.reporting import poster, rd
from test_seeds import ALPHAS, _records


def _figures(recs) -> dict[str, dict]:
  return {f["figure"].split(":")[0]: f for f in poster.figures(recs)}


def _set(recs, layer, method, key, fn):
  for r in recs:
    if r["layer"] == layer and r["method"] == method:
      r[key] = fn(r)


def test_a_sweep_that_behaves_shows_figures_3_4_5():
  recs = _records()
  _set(recs, "enhancement", "proposal", "psnr", lambda r: r["psnr"] + 0.5)
  figs = _figures(recs)
  assert sorted(figs) == ["3", "4", "5"]
  assert all(f["verdict"] == poster.SHOWN for f in figs.values()), figs
  assert "-22%" in figs["5"]["poster"]
  # Figure 4 gives the gain at the same alpha: the records' 1 dB.
  assert figs["4"]["here"].startswith("+1.0 to +1.0 dB")


def test_each_figure_turns_on_its_own_defect():
  recs = _records()
  _set(recs, "base", "proposal", "bpp_base", lambda r: r["bpp_base"] * 1.3)
  figs = _figures(recs)
  assert figs["3"]["verdict"] == poster.NOT_SHOWN  # 30% more rate for the same depth
  recs = _records()
  _set(recs, "base", "baseline", "depth_rmse", lambda r: 0.7)  # -7% vs the mean map
  _set(recs, "base", "proposal", "depth_rmse", lambda r: 0.7)
  assert _figures(recs)["3"]["verdict"] == poster.NOT_SHOWN
  recs = _records(recon_gain=-0.5)
  assert _figures(recs)["4"]["verdict"] == poster.NOT_SHOWN
  recs = _records()
  _set(recs, "enhancement", "proposal", "psnr", lambda r: r["psnr"] - 1.5)
  five = _figures(recs)["5"]
  assert five["verdict"] == poster.NOT_SHOWN and "BD-rate +" in five["here"]


def test_figure_5_tells_a_small_saving_and_disagreeing_fits_apart():
  """The poster's -22%: a saving under half of it is "same sign, smaller";
  PCHIP and cubic fits of opposite signs are "inconclusive"."""
  recs = _records()  # the proposal's enhancement 0.3 dB better: about -9%
  five = _figures(recs)["5"]
  bd = [c for c in rd.comparisons(recs) if c["title"].startswith("enhancement:")][0]["bd"]
  assert -11 < bd["pchip"] < 0 and -11 < bd["cubic"] < 0, bd
  assert five["verdict"] == poster.SMALLER
  curve = {"bd": {"pchip": -3.0, "cubic": 4.0}, "bdq": {"pchip": 0.5},
           "anchor_curve": ([0.1, 0.2], [20.0, 23.0]),
           "test_curve": ([0.1, 0.2], [20.0, 23.5]), "higher_is_better": True}
  assert poster._gain(curve) == 0.0
  curve["bd"] = {"pchip": "no overlap", "cubic": "no overlap"}
  assert poster._gain(curve) == pytest.approx(0.5)
  curve["bdq"] = {"pchip": 0.01}  # within float noise of a 21.5 dB curve
  assert poster._gain(curve) is None


def test_flat_depth_is_judged_by_its_bd_quality():
  """Depth flat in rate has no BD-rate; within the tolerance of the
  baseline's depth at equal rate the figure still shows, beyond it not."""
  recs = _records()
  _set(recs, "base", "baseline", "depth_rmse", lambda r: 0.55)
  _set(recs, "base", "proposal", "depth_rmse", lambda r: 0.555)  # 0.9% worse
  three = _figures(recs)["3"]
  assert not isinstance(rd.comparisons(recs)[0]["bd"]["pchip"], float)
  assert three["verdict"] == poster.SHOWN and "no BD-rate" in three["here"]
  _set(recs, "base", "proposal", "depth_rmse", lambda r: 0.57)  # 3.6% worse
  assert _figures(recs)["3"]["verdict"] == poster.NOT_SHOWN


def test_segmentation_is_figure_6_and_a_missing_number_says_so():
  recs = _records()
  for r in recs:
    if r["layer"] == "enhancement":
      r["miou"] = r.pop("psnr") / 100
  figs = _figures(recs)
  assert "6" in figs and "5" not in figs and "-26%" in figs["6"]["poster"]
  _set(recs, "enhancement", "proposal", "miou", lambda r: r["miou"] + 0.05)
  six = _figures(recs)["6"]  # no mIoU overlap: judged by its BD-quality
  assert six["verdict"] == poster.NO_RATE and "no BD-rate (no overlap)" in six["here"]
  _set(recs, "enhancement", "proposal", "bpp_enhancement", lambda r: r["bpp_enhancement"] + 5)
  assert _figures(recs)["6"]["verdict"] == poster.NO_NUMBER  # nor a rate overlap


def test_curves_flat_in_rate_give_no_number():
  """mIoU that moves by 0.01 whatever the rate: BD-rates fitted to it are
  noise, so Figure 6 has no number (and says why)."""
  recs = _records()
  for r in recs:
    if r["layer"] == "enhancement":
      shift = {"baseline": 0.0, "proposal": 0.004, "standalone": -0.002}[r["method"]]
      r["miou"] = 0.24 + shift + 0.002 * (r.pop("psnr") > 22.0)
  six = _figures(recs)["6"]
  assert six["verdict"] == poster.NO_NUMBER and "flat in rate" in six["here"]


@pytest.mark.parametrize("drop", ["baseline", "proposal"])
def test_a_method_missing_leaves_its_figures_out(drop):
  recs = [r for r in _records() if r.get("method") != drop]
  assert poster.figures(recs) == []


def test_report_lines_carry_figures_and_regime():
  text = "\n".join(poster.report_lines(_records()))
  assert text.count("| shown |") == 2 and "| same sign, smaller |" in text
  assert "The paper's regime" in text and "**no**" not in text
  recs = _records()
  recs[0]["mean_disparity_rmse"] = 0.6  # every base now above the mean map
  assert "**no**" in "\n".join(poster.report_lines(recs))


def test_flat_depth_with_a_bd_rate_is_judged_at_equal_rate():
  """Depth within 0.2% whatever the rate: a finite BD-rate fitted to it is
  noise (here +25%); the figure is judged by the BD-quality instead."""
  recs = _records()
  for method, values in (("baseline", (0.500, 0.502, 0.503, 0.505)),
                         ("proposal", (0.501, 0.503, 0.504, 0.5045))):
    for r in recs:
      if r["layer"] == "base" and r["method"] == method:
        r["depth_rmse"] = values[ALPHAS.index(r["alpha"])]
  task = next(c for c in rd.comparisons(recs) if c["title"].startswith("base task"))
  assert isinstance(task["bd"]["pchip"], float) and task["bd"]["pchip"] > 10
  assert _figures(recs)["3"]["verdict"] == poster.SHOWN


def test_figure_4_in_db_is_not_flat_and_a_trailing_alpha_is_not_ahead():
  """A base PSNR spanning under 5% of its mean still has Figure 4 (BD-quality
  reads it at equal rate); a proposal behind at one alpha is not ahead."""
  recs = _records()
  for method, shift in (("baseline", 0.0), ("proposal", 1.5)):
    for r in recs:
      if r["layer"] == "base" and r["method"] == method:
        r["psnr_from_base"] = 19.4 - 0.25 * ALPHAS.index(r["alpha"]) + shift
  assert _figures(recs)["4"]["verdict"] == poster.SHOWN
  next(r for r in recs if r["layer"] == "base" and r["method"] == "proposal"
       and r["alpha"] == ALPHAS[-1])["psnr_from_base"] = 18.0
  assert _figures(recs)["4"]["verdict"] == poster.NOT_SHOWN


def test_detection_records_judge_map_and_the_detection_claim():
  recs = [r for r in _records() if r["layer"] != "reference"]
  for r in recs:
    if r["layer"] == "base":
      r["map"] = 0.30 - 0.02 * ALPHAS.index(r["alpha"])
      r.pop("depth_rmse"), r.pop("depth_rmse_objects")
  figs = _figures(recs)
  assert "-10% (detection base)" in figs["5"]["poster"]
  assert figs["3"]["verdict"] == poster.SHOWN  # equal mAP at equal rate
  for r in recs:
    if r["layer"] == "base" and r["method"] == "proposal":
      r["map"] *= 0.8
  assert _figures(recs)["3"]["verdict"] == poster.NOT_SHOWN
  assert not any("depth" in what for what, _, _ in poster.regime_checks(recs))
