"""BD-rate and the RD report."""
import json
import math
import os

import numpy as np
import pytest

from tcr_jax.reporting import rd

RATES = [0.1, 0.2, 0.4, 0.8, 1.6]
PSNR = [28.0, 30.5, 33.0, 35.0, 36.5]


@pytest.mark.parametrize("method", rd.METHODS)
def test_identical_curves_give_zero(method):
  assert rd.bd_rate(RATES, PSNR, RATES, PSNR, method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", rd.METHODS)
def test_half_the_rate_gives_minus_fifty_percent(method):
  half = [r / 2 for r in RATES]
  assert rd.bd_rate(RATES, PSNR, half, PSNR, method) == pytest.approx(-50.0, abs=1e-6)
  assert rd.bd_rate(half, PSNR, RATES, PSNR, method) == pytest.approx(100.0, abs=1e-6)


@pytest.mark.parametrize("method", rd.METHODS)
def test_hand_computed_case(method):
  # Anchor: quality 30, 32, 34, 36 at rates 1, 2, 4, 8 (log2 R = (Q - 30) / 2).
  # Test: the same curve shifted by +1 dB, so at equal quality it needs
  # 2 ** (-1/2) of the anchor's rate: -29.289...%.
  anchor_r, anchor_q = [1, 2, 4, 8], [30, 32, 34, 36]
  test_q = [31, 33, 35, 37]
  expected = (2 ** -0.5 - 1) * 100
  assert rd.bd_rate(anchor_r, anchor_q, anchor_r, test_q, method) == pytest.approx(expected, abs=1e-6)


def test_lower_is_better_flag():
  # Depth RMSE: the test reaches the same RMSE at 80% of the rate.
  rmse = [9.0, 7.5, 6.0, 5.2]
  rates = [0.05, 0.1, 0.2, 0.4]
  test = [0.8 * r for r in rates]
  for m in rd.METHODS:
    assert rd.bd_rate(rates, rmse, test, rmse, m, higher_is_better=False) == pytest.approx(-20.0, abs=1e-6)
  # Without the flag, a distortion that falls with rate is refused.
  with pytest.raises(ValueError, match="higher_is_better=False"):
    rd.bd_rate(rates, rmse, test, rmse, "pchip")


def test_no_overlap_gives_none():
  assert rd.bd_rate([1, 2, 4], [30, 31, 32], [1, 2, 4], [33, 34, 35]) is None
  assert rd.bd_rate([1], [30], [1, 2], [30, 31]) is None


@pytest.mark.parametrize("method", rd.METHODS)
def test_bd_quality_of_shifted_curves(method):
  # A constant +1.5 dB at every rate is +1.5 dB whatever the fit.
  up = [q + 1.5 for q in PSNR]
  assert rd.bd_quality(RATES, PSNR, RATES, up, method) == pytest.approx(1.5, abs=1e-9)
  assert rd.bd_quality(RATES, PSNR, RATES, PSNR, method) == pytest.approx(0.0, abs=1e-9)
  # Quality linear in log2(rate), 2 dB per doubling: the same curve at half
  # the rate is 2 dB better at equal rate.
  rates, q = [1, 2, 4, 8], [30, 32, 34, 36]
  half = [r / 2 for r in rates]
  assert rd.bd_quality(rates, q, half, q, method) == pytest.approx(2.0, abs=1e-6)


def test_bd_quality_where_bd_rate_has_no_overlap():
  # The test better than the anchor at every rate by more than the anchor's
  # whole quality range: no BD-rate, a BD-quality.
  rates = [1, 2, 4]
  assert rd.bd_rate(rates, [30, 31, 32], rates, [33, 34, 35]) is None
  assert rd.bd_quality(rates, [30, 31, 32], rates, [33, 34, 35]) == pytest.approx(3.0)
  # Rate ranges apart: none.
  assert rd.bd_quality([1, 2], [30, 31], [4, 8], [30, 31]) is None
  with pytest.raises(ValueError, match="positive"):
    rd.bd_quality([0, 1], [30, 31], [1, 2], [30, 31])


def test_bad_input_is_refused():
  with pytest.raises(ValueError, match="positive"):
    rd.bd_rate([0, 1], [30, 31], [1, 2], [30, 31])
  with pytest.raises(ValueError, match="method"):
    rd.bd_rate(RATES, PSNR, RATES, PSNR, "akima")


def _records():
  recs = []
  for i, a in enumerate([0.01, 0.1, 1.0]):
    for method, gain in (("baseline", 1.0), ("proposal", 0.8)):
      bpp = 0.4 / (i + 1) * gain
      recs.append(dict(experiment="x", layer="base", method=method, alpha=a,
                       beta=0.0, bpp_base=bpp, bpp_enhancement=None,
                       depth_rmse=5.0 + i, psnr_from_base=30.0 - i,
                       psnr=None, loss=1.0))
      recs.append(dict(experiment="x", layer="enhancement", method=method,
                       alpha=a, beta=0.0, bpp_base=bpp, bpp_enhancement=0.5 / (i + 1),
                       depth_rmse=5.0 + i, psnr_from_base=30.0 - i,
                       psnr=35.0 - i, loss=1.0))
    recs.append(dict(experiment="x", layer="enhancement", method="standalone",
                     alpha=a, beta=None, bpp_base=None, bpp_enhancement=1.2 / (i + 1),
                     depth_rmse=None, psnr_from_base=None, psnr=35.0 - i, loss=1.0))
  return recs


def test_report_writes_table_and_plots(tmp_path):
  text = rd.write_report(_records(), str(tmp_path), "x")
  assert (tmp_path / "bd_rate.md").read_text() == text
  row = next(l for l in text.splitlines() if l.startswith("| base task"))
  assert "-20.00%" in row  # proposal needs 80% of the baseline's base rate
  assert row.count("no overlap") == 0 and len(row.split("|")) == 10
  for name in ("rd_base_task.png", "rd_base_reconstruction.png", "rd_enhancement.png",
               "rd_side_information.png"):
    assert (tmp_path / name).stat().st_size > 1000
  # R_e alone: the conditional enhancements spend 0.5/1.2 of the standalone's
  # at equal PSNR, whatever their base's rate; baseline and proposal alike.
  side = [l for l in text.splitlines() if l.startswith("| side information")]
  assert [l.split(" | ")[1:3] for l in side] == [
      ["standalone", "baseline"], ["standalone", "proposal"], ["baseline", "proposal"]]
  assert side[0].count("-58.33%") == 2 and side[1].count("-58.33%") == 2
  assert side[2].count("+0.00%") == 2



def test_report_says_how_each_stage_ended(tmp_path):
  for name, steps, trained, result in (("base_a", 100, 60, 30), ("base_b", 100, 100, 100),
                                       ("enh_c", 100, 100, 75)):
    os.makedirs(tmp_path / "stages" / name)
    (tmp_path / "stages" / name / "done.json").write_text(json.dumps(
        {"steps": steps, "trained_steps": trained, "result_step": result}))
  os.makedirs(tmp_path / "stages" / "unfinished")
  text = rd.write_report(_records(), str(tmp_path), "x")
  assert "| base_a | 100 | 60 | 30 | early stopping |" in text
  assert "| base_b | 100 | 100 | 100 | the cap, still improving |" in text
  assert "| enh_c | 100 | 100 | 75 | the cap |" in text
  assert "unfinished" not in text


def test_a_ceiling_measured_on_other_images_stays_out_of_the_report(tmp_path):
  records = [{**r, "split": "test"} for r in _records()]
  ceiling = {"layer": "reference", "method": "ceiling", "depth_rmse": 4.0,
             "depth_rmse_objects": 5.0}
  for split, shown in (("test", True), ("validation", False)):
    (tmp_path / "ceiling.json").write_text(json.dumps({**ceiling, "split": split}))
    text = rd.write_report(records, str(tmp_path), "x")
    assert ("(ceiling)" in text) == shown
    assert "every figure measured on the test images" in text or not shown


def test_rd_figure_draws_the_report_plots_side_by_side():
  import matplotlib
  backend = matplotlib.get_backend()
  fig = rd.rd_figure(_records(), "x")
  assert matplotlib.get_backend() == backend  # no backend switch (notebooks)
  axes = fig.get_axes()
  assert [ax.get_title() for ax in axes] == [
      "x: base task", "x: reconstruction from the base", "x: enhancement",
      "x: side information"]
  labels = [sorted(line.get_label() for line in ax.get_lines()) for ax in axes]
  assert labels == ([["baseline", "proposal"]] * 2
                    + [["baseline", "proposal", "standalone"]] * 2)
  assert axes[3].get_xlabel() == "bpp (enhancement)"
  base_task = {l.get_label(): l.get_xydata() for l in axes[0].get_lines()}
  assert base_task["proposal"][:, 1].tolist() == [7.0, 6.0, 5.0]  # sorted by rate

# Four points per curve where the test's first three qualities lie within
# 0.09 dB: its cubic fit of log-rate shoots far beyond float range over the
# overlap (one such pair in about 800 random ones).
DIVERGING = ([0.2030, 0.2045, 0.4574, 0.5012], [20.815, 24.140, 27.592, 30.961],
             [0.1359, 0.1868, 0.5895, 0.6682], [21.6174, 21.6588, 21.7027, 34.5158])


def test_a_diverging_cubic_fit_gives_a_reason_not_an_overflow():
  with pytest.raises(rd.BDRateUndefined, match="cubic fit diverges"):
    rd.bd_rate(*DIVERGING, "cubic")
  # the monotone interpolation has a number for the same curves
  assert np.isfinite(rd.bd_rate(*DIVERGING, "pchip"))


def test_report_survives_a_diverging_fit(tmp_path):
  ra, qa, rt, qt = DIVERGING
  recs = []
  for method, rates, quality in (("baseline", ra, qa), ("proposal", rt, qt)):
    for r, q in zip(rates, quality):
      recs.append(dict(experiment="x", layer="base", method=method, alpha=1.0,
                       beta=0.0, bpp_base=r, bpp_enhancement=None,
                       depth_rmse=1.0 / q, psnr_from_base=q, psnr=None, loss=1.0))
  text = rd.write_report(recs, str(tmp_path), "x")
  row = next(l for l in text.splitlines() if l.startswith("| reconstruction"))
  assert "cubic fit diverges" in row and "%" in row  # PCHIP still has a number
