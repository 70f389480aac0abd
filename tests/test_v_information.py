"""The V-information estimator (tcr_jax/tools/v_information.py) on cases whose
answer is known, and the probe CLI's refusals."""
import json
import math
import os

import numpy as np
import pytest

from tcr_jax import cli
from tcr_jax.tools import v_information as vi


def _gaussian(values, step=1.0 / 255.0, name="image"):
  return vi.Target(name, "gaussian", values.astype(np.float32),
                   np.ones(values.shape[:3], bool), step)


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_jointly_gaussian_scalars_give_half_log_one_over_one_minus_rho2(rho):
  """Fitted on 10,000 samples, scored on 100,000 more: with fewer the
  estimate's own sampling error (about 7% at rho 0.3 on 10,000 samples,
  1.6% on 100,000) would hide a 2% defect."""
  rng = np.random.default_rng(0)
  n_fit, n_val = 10_000, 100_000
  y = rng.normal(size=n_fit + n_val)
  z = rho * y + math.sqrt(1 - rho ** 2) * rng.normal(size=n_fit + n_val)
  y, z = y.reshape(-1, 1, 1, 1), z.reshape(-1, 1, 1, 1)
  r = vi.estimate("linear", y[:n_fit].astype(np.float32),
                  _gaussian(z[:n_fit], 1e-4), y[n_fit:].astype(np.float32),
                  _gaussian(z[n_fit:], 1e-4), steps=400, batch=256,
                  learning_rate=1e-2)
  truth = 0.5 * math.log2(1 / (1 - rho ** 2))
  assert r["interval"][0] <= truth <= r["interval"][1]
  assert r["bits"] == pytest.approx(truth, rel=0.02 if rho > 0.5 else 0.04)
  assert r["bits"] == pytest.approx(r["h_empty"] - r["h_given"])


def test_a_latent_that_is_the_target_leaves_only_the_floor():
  """Identity encoder on toy 8-bit images: H_V(Z | Y) is the floor's
  entropy, I_V = H_V(Z | 0) minus it."""
  rng = np.random.default_rng(1)
  img = np.round(np.clip(rng.normal(0.5, 0.2, (600, 8, 8, 3)), 0, 1) * 255) / 255
  img = img.astype(np.float32)
  r = vi.estimate("linear", img[:500], _gaussian(img[:500]), img[500:],
                  _gaussian(img[500:]), steps=2000, batch=32, learning_rate=1e-2)
  floor = 0.5 * math.log2(2 * math.pi * math.e / 12)
  assert r["floor_bits"] == pytest.approx(floor)
  assert r["h_given"] == pytest.approx(floor, abs=0.05)
  assert r["bits"] == pytest.approx(r["h_empty"] - floor, rel=0.05)
  assert r["bits"] > 6.0  # 8-bit values of standard deviation 0.2 * 255


@pytest.mark.parametrize("family", ["linear", "conv"])
def test_a_latent_independent_of_the_target_carries_nothing(family):
  rng = np.random.default_rng(2)
  img = rng.uniform(size=(400, 8, 8, 3)).astype(np.float32)
  noise = rng.normal(size=(400, 2, 2, 8)).astype(np.float32)
  r = vi.estimate(family, noise[:300], _gaussian(img[:300]), noise[300:],
                  _gaussian(img[300:]), steps=300, batch=32)
  lo, hi = r["interval"]
  assert lo <= 0.0 <= hi and hi - lo < 0.05
  assert r["h_empty"] > 5.0  # the target itself is far from empty


def test_labels_that_are_a_function_of_the_latent():
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 5, size=(600, 4, 4))
  latent = np.eye(5, dtype=np.float32)[labels]
  t = lambda a, b: vi.Target("labels", "categorical", labels[a:b],
                             np.ones((b - a, 4, 4), bool), classes=5)
  r = vi.estimate("linear", latent[:500], t(0, 500), latent[500:], t(500, 600),
                  steps=1000, batch=32, learning_rate=3e-2)
  assert r["h_given"] < 0.05
  assert r["bits"] == pytest.approx(math.log2(5), rel=0.05)


def test_the_empty_member_is_the_per_pixel_mean_and_variance():
  rng = np.random.default_rng(4)
  v = rng.normal(size=(50, 3, 4, 2)) * np.arange(1, 3) + np.arange(12).reshape(3, 4, 1)
  mask = rng.uniform(size=(50, 3, 4)) > 0.2
  t = vi.Target("disparity", "gaussian", v.astype(np.float32), mask, step=0.01)
  f0 = vi.empty_member(t)
  m = mask[..., None]
  mean = (v * m).sum(0) / m.sum(0)
  var = ((v - mean) ** 2 * m).sum(0) / m.sum(0)
  np.testing.assert_allclose(f0["offset"], mean, rtol=1e-5)
  np.testing.assert_allclose(np.exp(f0["log_var"]), var + 0.01 ** 2 / 12, rtol=1e-5)
  labels = np.array([[[0, 1]], [[0, 1]], [[1, 1]]])
  f0 = vi.empty_member(vi.Target("labels", "categorical", labels,
                                 np.ones((3, 1, 2), bool), classes=2))
  np.testing.assert_allclose(np.exp(f0["offset"][0, 0]), [3 / 5, 2 / 5], rtol=1e-6)


def test_masked_pixels_do_not_count():
  """Garbage outside the mask changes nothing."""
  rng = np.random.default_rng(5)
  y = rng.normal(size=(120, 1, 1, 4)).astype(np.float32)
  z = np.repeat(np.repeat(y[..., :1], 2, 1), 2, 2)
  mask = np.ones((120, 2, 2), bool)
  mask[:, 0, 0] = False
  dirty = z.copy()
  dirty[:, 0, 0] = 1e3 * rng.normal(size=(120, 1))
  run = lambda values: vi.estimate(
      "linear", y[:100], vi.Target("d", "gaussian", values[:100], mask[:100], 0.01),
      y[100:], vi.Target("d", "gaussian", values[100:], mask[100:], 0.01),
      steps=200, batch=32, learning_rate=1e-2)
  assert run(dirty)["bits"] == pytest.approx(run(z)["bits"], rel=1e-4)


def test_probe_without_trained_bases_is_one_line(tmp_path, capsys, configs):
  (tmp_path / "config.json").write_text(configs.smoke().to_json())
  assert cli.main(["probe", str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no finished base models" in err[0]
  assert not (tmp_path / "v_information.json").exists()
  assert cli.main(["probe", str(tmp_path / "missing")]) == 2
  assert "not a training workdir" in capsys.readouterr().err


def test_probe_refuses_a_detection_workdir(tmp_path, capsys, configs):
  (tmp_path / "config.json").write_text(configs.smoke("detection_recon").to_json())
  assert cli.main(["probe", str(tmp_path)]) == 2
  assert "depth base layers only" in capsys.readouterr().err


def test_report_table_and_plots(tmp_path):
  from tcr_jax.tools import probe
  records = [{"stage": f"base_{m}_alpha{a:g}", "method": m, "alpha": a,
              "bpp_base": b, "depth_rmse": d, "psnr_from_base": p,
              "family": "linear", "target": "image", "bits": i,
              "interval": [i - 0.1, i + 0.1]}
             for m, a, b, d, p, i in (("baseline", 0.1, 0.5, 0.7, 18.0, 0.4),
                                      ("proposal", 0.1, 0.6, 0.68, 20.0, 0.8))]
  text = probe.write_report(records, str(tmp_path), mean_image_psnr=15.0)
  assert "| proposal | 0.1 | 0.600 | 0.680 | 0.800 [0.700, 0.900] | 0.831 |" in text
  assert os.path.getsize(tmp_path / "vinfo_image.png") > 1000


def test_the_estimate_does_not_depend_on_the_latents_units():
  """The latent is standardized with the fitting images' statistics before
  the fit: a latent shifted by 50 and scaled by 200 (a codec whose latents
  are large integers) gives the same I_V as the original; without the
  standardization Adam's fixed step sizes make the fit of the scaled one
  a different, slower problem."""
  rng = np.random.default_rng(5)
  y = rng.normal(size=(600, 1, 1, 4)).astype(np.float32)
  z = y @ rng.normal(size=(4, 3)).astype(np.float32) * 0.1
  z = z + 0.05 * rng.normal(size=z.shape).astype(np.float32)
  t = lambda a, b: _gaussian(z[a:b], 1e-3)
  run = lambda lat: vi.estimate("linear", lat[:500], t(0, 500), lat[500:], t(500, 600),
                                steps=150, batch=32)["bits"]
  plain, scaled = run(y), run(y * 200.0 + 50.0)
  assert scaled == pytest.approx(plain, rel=1e-3)
  assert plain > 1.0  # the latent explains most of the target


def test_standardize_uses_the_fitting_statistics_and_keeps_constant_channels():
  fit = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
  f, other = vi.standardize(fit, np.array([[5.0, 7.0]], np.float32))
  np.testing.assert_allclose(f, [[-1.0, 0.0], [1.0, 0.0]])
  np.testing.assert_allclose(other, [[3.0, 2.0]])  # a constant channel: only shifted
