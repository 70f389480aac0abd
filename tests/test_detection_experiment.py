"""The detection experiment (configs/detection_recon.py): the model's
canvas handling, its objectives, a :smoke sweep, resumption after a kill,
and tcr-jax compress / decompress with a detection workdir."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax import bases
from tcr_jax.codec import entropy
from tcr_jax.model import canvas, models_detection, objectives
from tcr_jax.tools import compression
from tcr_jax.training import sweep

from conftest import (assert_resumed_mid_stage, assert_same_records,
                      run_killed_then_resumed)

FIELDS = {"experiment", "layer", "method", "alpha", "beta", "bpp_base",
          "bpp_enhancement", "map", "map50", "psnr_from_base", "psnr", "loss",
          "bpp_actual_base", "bpp_actual_enhancement", "actual_images", "split"}


def test_normalize_canvas_is_torchvisions_padded_batch():
  x = jnp.full((2, 40, 70, 3), 0.5)
  sizes = jnp.array([[40, 70], [20, 30]])
  out, got = canvas.normalize_canvas(x, sizes)
  assert out.shape == (2, 64, 96, 3) and got.tolist() == sizes.tolist()
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(out[0, 0, 0], (0.5 - mean) / std, rtol=1e-6)
  assert float(jnp.abs(out[0, 40:]).max()) == 0 and float(jnp.abs(out[1, :, 30:]).max()) == 0
  assert float(jnp.abs(out[1, 20:]).max()) == 0 and float(jnp.abs(out[1, :20, :30]).min()) > 0
  np.testing.assert_allclose(canvas.denormalize(out[0, :40, :70]), x[0],
                             atol=1e-6)


def test_bits_within_count_each_images_footprint_only():
  canvas = (128, 192)
  # y at stride 16 (8 x 12), z at stride 64 (2 x 3).
  lik = {"y": jnp.full((2, 8, 12, 3), 0.5), "z": jnp.full((2, 2, 3, 2), 0.25)}
  sizes = jnp.array([[128, 192], [40, 70]])
  bits = np.asarray(entropy.bits_within(lik, sizes, canvas))
  # image 0: everything; image 1: padded to 64 x 96 -> y 4 x 6, z 1 x 2.
  assert bits[0] == pytest.approx(8 * 12 * 3 + 2 * 3 * 2 * 2)
  assert bits[1] == pytest.approx(4 * 6 * 3 + 1 * 2 * 2 * 2)
  np.testing.assert_allclose(bits[0], entropy.bits(lik)[0])
  bpp = objectives.bpp_per_image(lik, sizes, canvas)
  assert float(bpp[1]) == pytest.approx(bits[1] / (40 * 70))


def test_reconstruction_terms_ignore_the_canvas_padding():
  rng = np.random.default_rng(0)
  x = jnp.asarray(0.9 * rng.random((2, 32, 64, 3)), jnp.float32)
  sizes = jnp.array([[32, 64], [16, 40]])
  noisy = x + 0.01
  garbage = noisy.at[1, 16:].set(5.0).at[1, :, 40:].set(-3.0)
  a = objectives.normalized_rmse_255_per_image(x, noisy, sizes)
  b = objectives.normalized_rmse_255_per_image(x, garbage, sizes)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  # 0.01 everywhere, divided by each channel's std, RMS over channels.
  want = 255 * 0.01 * np.sqrt(np.mean(1 / np.array([0.229, 0.224, 0.225]) ** 2))
  np.testing.assert_allclose(a, want, rtol=1e-4)
  psnr = objectives.masked_psnr(x, garbage, sizes)
  np.testing.assert_allclose(psnr, 40.0, atol=0.05)


def test_detection_enhancement_codes_at_the_base_latent_size(configs):
  config = configs.smoke("detection_recon")
  task = bases.for_config(config)
  base, enh = task.base_model(), task.enhancement_model()
  assert isinstance(base, models_detection.DetectionBase)
  assert not enh.half_resolution and enh.normalize_input
  for h, w in ((64, 128), (50, 70)):
    assert enh.latent_shape(h, w) == base.latent_shape(h, w)
  x = jnp.zeros((1, 50, 70, 3))
  y_b = jax.eval_shape(lambda: base.init_with_output(
      jax.random.key(0), x, method="encode")[0][0])
  assert y_b.shape == base.latent_shape(50, 70)
  out = jax.eval_shape(lambda: enh.init_with_output(
      jax.random.key(0), x, jnp.zeros(y_b.shape))[0])
  assert out["y_hat"].shape == y_b.shape and out["x_hat"].shape == (1, 50, 70, 3)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, configs):
  workdir = str(tmp_path_factory.mktemp("det_smoke"))
  return workdir, sweep.train_and_evaluate(configs.smoke("detection_recon"),
                                           workdir)


@pytest.mark.slow
def test_smoke_sweep_writes_every_field(smoke_run):
  workdir, records = smoke_run
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == records
  assert {(r["layer"], r["method"]) for r in records} == {
      ("base", "baseline"), ("base", "proposal"), ("enhancement", "baseline"),
      ("enhancement", "proposal"), ("enhancement", "standalone")}
  for r in records:
    assert set(r) == FIELDS, set(r) ^ FIELDS
    assert r["experiment"] == "detection_recon" and np.isfinite(r["loss"])
    assert r["actual_images"] == 2 and r["split"] == "validation"
    if r["layer"] == "base":
      assert r["bpp_base"] > 0 and 0 <= r["map50"] <= 1 and 0 <= r["map"] <= r["map50"]
      assert np.isfinite(r["psnr_from_base"]) and r["bpp_actual_base"] > r["bpp_base"]
      assert r["beta"] == (0.0 if r["method"] == "baseline" else 0.01)
    else:
      assert r["bpp_enhancement"] > 0 and np.isfinite(r["psnr"])
      assert (r["bpp_base"] is None) == (r["method"] == "standalone")
      if r["method"] != "standalone":  # the base's metrics come along
        base = next(b for b in records if b["layer"] == "base"
                    and b["method"] == r["method"])
        assert (r["map"], r["psnr_from_base"]) == (base["map"], base["psnr_from_base"])
  report = open(os.path.join(workdir, "bd_rate.md")).read()
  assert "mAP vs base bpp" in report
  for name in ("rd_base_task.png", "rd_enhancement.png",
               "previews/alpha0.05_proposal.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 100, name


@pytest.mark.slow
def test_preempted_detection_run_ends_like_an_uninterrupted_one(smoke_run,
                                                                tmp_path, root,
                                                                configs):
  """The proposal's two stages alone (a stage's numbers depend only on its
  name and inputs), killed in the middle of the base: the same records as
  the full sweep's. A checkpoint every step (the numbers do not depend on
  it): the kill at the first lands before the stage's end, where one at
  step 2 of 4 could arrive after the last (the :smoke detector's steps
  take a fraction of a second)."""
  _, records = smoke_run
  workdir = str(tmp_path / "preempted")
  target = os.path.join(workdir, "stages", "base_proposal_alpha0.05",
                        "checkpoints", "1")
  done = run_killed_then_resumed(
      ["--config=configs/detection_recon.py:smoke",
       "--config.sweep.alphas=(0.05,)", "--config.sweep.methods=('proposal',)",
       "--config.sweep.standalone=False", "--config.train.checkpoint_every=1",
       f"--workdir={workdir}"], root, target)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_resumed_mid_stage(done.stdout, "base_proposal_alpha0.05",
                           configs.smoke("detection_recon").train.base_steps)
  with open(os.path.join(workdir, "results.json")) as f:
    assert_same_records(json.load(f),
                        [r for r in records if r["method"] == "proposal"])


@pytest.mark.slow
def test_compress_decompress_with_a_detection_workdir(smoke_run, tmp_path):
  from PIL import Image
  from tcr_jax import cli
  from tcr_jax.data.synthetic import SyntheticScenes
  workdir, _ = smoke_run
  rgb = SyntheticScenes("validation", 50, 100, seed=5)[0]["image"]
  path = tmp_path / "scene.png"
  Image.fromarray(rgb).save(path)
  out_file = str(tmp_path / "a.tcr")
  assert cli.main(["compress", "--workdir", workdir, "--input", str(path),
                   "--output", out_file]) == 0
  again = str(tmp_path / "b.tcr")
  assert cli.main(["compress", "--workdir", workdir, "--input", str(path),
                   "--output", again]) == 0
  data = open(out_file, "rb").read()
  assert data == open(again, "rb").read()
  # The smoke config resizes as its detector reads (min 64, max 128): 50x100
  # -> 64x128.
  config, (bm, bv), (em, ev), _ = compression.load_models(workdir)
  coded = bases.for_config(config).coded_input(rgb)
  assert coded.shape == (64, 128, 3)
  x = jnp.asarray(coded[None], jnp.float32) / 255
  y_b, _ = jax.jit(lambda v, x: bm.apply(v, x, method="encode"))(bv, x)
  y_e, _ = jax.jit(lambda v, x, s: em.apply(v, x, s, method="encode"))(ev, x, y_b)
  base_out = jax.jit(lambda v, y: bm.apply(v, y, (64, 128), method="outputs"))(bv, y_b)
  enh_out = jax.jit(lambda v, y: em.apply(v, y, (64, 128), method="outputs"))(ev, y_e)
  to_u8 = lambda a: (np.clip(np.asarray(a)[0], 0, 1) * 255).round().astype(np.int64)
  for layers, want in (("base", to_u8(base_out["x_rec"])),
                       ("all", to_u8(enh_out["x_hat"]))):
    out_dir = tmp_path / layers
    assert cli.main(["decompress", "--workdir", workdir, "--input", out_file,
                     "--output-dir", str(out_dir), "--layers", layers]) == 0
    rec = np.asarray(Image.open(out_dir / "reconstruction.png")).astype(np.int64)
    assert rec.shape == (64, 128, 3)
    assert np.abs(rec - want).max() <= 1  # rounding of float noise
    listing = json.loads((out_dir / "detections.json").read_text())
    assert (listing["height"], listing["width"]) == (64, 128)
    scores = np.asarray(base_out["detections"]["scores"])[0]
    assert len(listing["detections"]) == int((scores > 0).sum())


@pytest.mark.parametrize("variant", ["", "authors", "synthetic", "smoke"])
def test_every_variant_validates(variant, configs):
  from tcr_jax import configs_lib
  c = configs.load("detection_recon", variant)
  configs_lib.validate(c)
  assert c.task.base == "detection" and c.train.base_select == "map"
  assert c.data.height % 32 == 0 and c.data.width % 32 == 0
  if variant in ("", "authors"):
    assert (c.data.name, c.data.min_size, c.data.max_size) == ("coco", 800, 1333)
    assert c.train.batch_size == 4 and c.train.base_grad_clip == 1.0
    assert c.train.base_patience == 3 and c.data.color_jitter == 0
    assert c.sweep.beta == (0.1 if variant else 0.01)
    assert c.entropy_model == ("context" if variant else "hyperprior")


def test_bad_detection_fields_are_one_line_errors(configs):
  from tcr_jax import configs_lib
  from tcr_jax.errors import UserError
  for key, value, words in (("task.crowd_eval", "keep", "crowd_eval"),
                            ("train.base_select", "depth_rmse", "base_select"),
                            ("task.trainable_backbone_layers", 7, "0..5"),
                            ("task.detector.width", 0.0, "detector.width"),
                            ("init.detection_head", "/w", "detector.width=1")):
    c = configs.smoke("detection_recon", **{key: value})
    with pytest.raises(UserError, match=words):
      configs_lib.validate(c)


def test_detection_head_checkpoint_goes_into_the_base(tmp_path, configs):
  """config.init.detection_head: an import-torchvision checkpoint of
  fasterrcnn_resnet50_fpn_v2 replaces the base's detector variables (of
  torchvision's width: the :smoke config's detector is narrower)."""
  from tcr_jax.tasks import FasterRCNN, checkpoint_io
  from tcr_jax.tasks import torchvision_import as ti
  config = configs.smoke("detection_recon", **{"task.detector.width": 1.0})
  base = bases.for_config(config).base_model()
  shapes = jax.eval_shape(base.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  head = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype),
                      ti.abstract_variables(FasterRCNN()))
  checkpoint_io.write_checkpoint(str(tmp_path / "h"), head, {
      "arch": "fasterrcnn_resnet50_fpn_v2", "num_classes": 91, "aux_loss": False})
  loaded = checkpoint_io.load_into(variables, ("head",), str(tmp_path / "h"),
                                   "fasterrcnn_resnet50_fpn_v2")
  assert all(np.all(np.asarray(x) == 0.5)
             for x in jax.tree.leaves(loaded["params"]["head"]))
  assert all(np.all(np.asarray(x) == 0)
             for x in jax.tree.leaves(loaded["params"]["g_a"]))
