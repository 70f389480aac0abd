"""Training end to end on the :smoke config (CPU, 4 fake devices)."""
import functools
import json
import os
import time

import jax
import numpy as np
import pytest

from tcr_jax import checkpoints
from tcr_jax.codec import files
from tcr_jax.errors import UserError
from tcr_jax.tools import compression
from tcr_jax.training import sweep, train

from conftest import (assert_resumed_mid_stage, assert_same_records,
                      run_killed_then_resumed)

ALPHAS = "(0.05,)"
FIELDS = {"experiment", "method", "alpha", "beta", "bpp_base", "bpp_enhancement",
          "depth_rmse", "psnr_from_base", "psnr", "loss"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, configs):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  start = time.perf_counter()
  records = sweep.train_and_evaluate(configs.smoke(), workdir)
  return workdir, records, time.perf_counter() - start


def _load(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
def test_results_have_every_field(smoke_run):
  workdir, records, _ = smoke_run
  assert records == _load(workdir)
  kinds = {(r["layer"], r["method"]) for r in records}
  assert kinds == {("base", "baseline"), ("base", "proposal"),
                   ("enhancement", "baseline"), ("enhancement", "proposal"),
                   ("enhancement", "standalone")}
  for r in records:
    assert FIELDS <= set(r), r
    assert r["experiment"] == "depth_recon" and r["alpha"] == 0.05
    assert np.isfinite(r["loss"])
    assert r["actual_images"] == 2
    if r["layer"] == "base":
      assert r["bpp_enhancement"] is None and r["bpp_base"] > 0
      assert r["depth_rmse"] > 0 and np.isfinite(r["psnr_from_base"])
      assert r["beta"] == (0.0 if r["method"] == "baseline" else 0.01)
    else:
      assert r["bpp_enhancement"] > 0 and np.isfinite(r["psnr"])
      assert (r["bpp_base"] is None) == (r["method"] == "standalone")
  for name in ("bd_rate.md", "rd_base_task.png", "rd_enhancement.png",
               "previews/alpha0.05_proposal.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 100, name


@pytest.mark.slow
def test_actual_rates_are_the_sizes_of_real_files(smoke_run, configs):
  """bpp_actual_base is the size of the files `tcr-jax compress` writes for
  the first validation images, read back here with the stage's result."""
  workdir, records, _ = smoke_run
  base = next(r for r in records if r["layer"] == "base"
              and r["method"] == "proposal")
  _, (model, variables), _, _ = compression.load_models(
      workdir, "base_proposal_alpha0.05")
  from tcr_jax.data import scene_dataset
  images = scene_dataset(configs.smoke(), "validation").batch(range(2))["image"]
  bits = [8 * len(files.compress_layers(model, variables, img)) for img in images]
  pixels = images.shape[1] * images.shape[2]
  assert base["bpp_actual_base"] == pytest.approx(np.mean(bits) / pixels, rel=1e-12)
  # a file holds at least the estimated bits of its latent
  assert base["bpp_actual_base"] > base["bpp_base"]


@pytest.mark.slow
def test_checkpoints_keep_the_latest_and_the_best(smoke_run):
  workdir, _, _ = smoke_run
  stage = os.path.join(workdir, "stages", "base_proposal_alpha0.05")
  with checkpoints.manager(stage, read_only=True) as mngr:
    steps = mngr.all_steps()
    assert mngr.latest_step() == 6 and 1 <= len(steps) <= 2
    losses = {s: mngr.metrics(s)["loss"] for s in steps}
    # the stage's result: the lowest validation loss of those kept
    assert checkpoints.result_step(mngr) == min(losses, key=losses.get)
  assert checkpoints.read_done(stage)["steps"] == 6


def test_one_replica_writes_a_replicated_checkpoint(tmp_path, monkeypatch):
  """orbax's default off GPUs slices each replicated array among its
  replicas to save it, an eager op per slice and array (30 s of an 80 s
  :smoke sweep on 4 CPU devices); tcr_jax.checkpoints has one replica
  write it. The checkpoint still reads back whole."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  assert mesh.size == 4
  tree = jax.device_put({"params": {"w": jnp.arange(4000.0).reshape(40, 100)},
                         "batch_stats": {}}, NamedSharding(mesh, PartitionSpec()))
  slices, real = [], jax.lax.slice_in_dim
  monkeypatch.setattr(jax.lax, "slice_in_dim",
                      lambda *a, **k: slices.append(a) or real(*a, **k))
  with checkpoints.manager(str(tmp_path), async_save=False) as mngr:
    checkpoints.save(mngr, 1, tree, {"step": jnp.int32(1)},
                     metrics={"loss": 1.0, "select": 1.0})
  assert not slices
  back = checkpoints.load_variables(str(tmp_path), tree)
  np.testing.assert_array_equal(back["params"]["w"], tree["params"]["w"])


@pytest.mark.slow
def test_second_call_retrains_nothing(smoke_run, capsys, configs):
  workdir, records, _ = smoke_run
  stamps = {d: os.path.getmtime(os.path.join(workdir, "stages", d, "done.json"))
            for d in os.listdir(os.path.join(workdir, "stages"))}
  again = sweep.train_and_evaluate(configs.smoke(), workdir)
  assert again == records
  out = capsys.readouterr().out
  assert out.count("finished earlier") == 5 and "step 2/" not in out
  for d, t in stamps.items():
    assert os.path.getmtime(os.path.join(workdir, "stages", d, "done.json")) == t


def test_loss_decreases_over_a_few_steps(tmp_path, configs):
  config = configs.smoke(**{"data.hflip": False, "data.color_jitter": 0.0})
  # All 4 devices, as the sweeps of this file: the same compiled step.
  exp = train.Experiment(config, str(tmp_path))
  # beta 1: the reconstruction reward dominates, so the objective falls
  # smoothly; the tiny depth path (a 1x2 latent) jumps as latents re-round.
  stage = train.Stage("probe", "base", 8, {"alpha": 0.05, "beta": 1.0})
  state = exp.create_train_state(stage)
  batch = exp.loader.train_batch(stage.name, 0)
  # as the sweep's stages: the same compiled step
  hp = train.step_hp(stage, config.train.learning_rate)
  step = exp.train_step("base")
  losses, rec = [], []
  for _ in range(15):
    state, metrics = step(state, batch, hp, None)
    losses.append(float(metrics["loss"]))
    rec.append(float(metrics["rec_rmse255"]))
  assert int(state.step) == 15
  # Fitting one batch: the last losses are clearly below the first.
  assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
  assert rec[-1] < 0.9 * rec[0], rec


def test_sharded_step_equals_single_device_step(tmp_path, configs):
  """4 fake devices (batch sharded) give the 1-device loss and gradients.

  Gradients, not post-Adam parameters, are compared: Adam's first update is
  lr * sign(g), so parameters whose gradient is float noise move by +-lr
  either way.
  """
  assert jax.device_count() == 4
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    exp = train.Experiment(configs.smoke(), str(tmp_path), devices=devices)
    hp = {"alpha": np.float32(0.05), "beta": np.float32(0.01)}
    v = jax.device_put(exp.init_variables("base"), exp.replicated)
    loss_fn = exp.loss_fn("base")
    batch = exp.loader.train_batch("probe", 0)
    assert len(batch["image"].sharding.device_set) == len(devices)

    # Run once each: XLA's cheapest code generation compiles them sooner.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def grads(params, batch):
      f = lambda p: loss_fn({"params": p, "batch_stats": v["batch_stats"]},
                            batch, jax.random.PRNGKey(0), hp)
      (loss, (metrics, bs)), g = jax.value_and_grad(f, has_aux=True)(params)
      return loss, g, bs
    loss, g, bs = jax.device_get(grads(v["params"], batch))
    results.append((float(loss), g, bs))
  (l1, g1, bs1), (l4, g4, bs4) = results
  assert l4 == pytest.approx(l1, rel=1e-4)
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4 * scale)
  for a, b in zip(jax.tree.leaves(bs1), jax.tree.leaves(bs4)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_devices_is_refused(tmp_path, configs):
  with pytest.raises(UserError, match="divisible"):
    train.Experiment(configs.smoke(**{"train.batch_size": 6}), str(tmp_path))


@pytest.mark.slow
def test_preempted_run_ends_like_an_uninterrupted_one(smoke_run, tmp_path, root,
                                                      configs):
  """The proposal's two stages alone (a stage's numbers depend only on its
  name and inputs), SIGKILLed in the middle of the enhancement, after the
  base finished; started again: the full sweep's records of those stages."""
  _, records, _ = smoke_run
  workdir = str(tmp_path / "preempted")
  target = os.path.join(workdir, "stages", "enhancement_proposal_alpha0.05",
                        "checkpoints", "2")
  done = run_killed_then_resumed(
      ["--config=configs/depth_recon.py:smoke",
       f"--config.sweep.alphas={ALPHAS}", "--config.sweep.methods=('proposal',)",
       "--config.sweep.standalone=False", f"--workdir={workdir}"], root, target)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_resumed_mid_stage(done.stdout, "enhancement_proposal_alpha0.05",
                           configs.smoke().train.enhancement_steps)
  proposal = [r for r in records if r["method"] == "proposal"]
  assert len(proposal) == 2
  assert_same_records(_load(workdir), proposal)


@pytest.mark.slow
def test_depth_seg_smoke_runs_segmentation_enhancement(tmp_path, configs):
  config = configs.smoke("depth_seg", **{
      "sweep.methods": ("proposal",), "sweep.standalone": False,
      "train.base_steps": 2, "train.enhancement_steps": 2})
  records = sweep.train_and_evaluate(config, str(tmp_path))
  enh = [r for r in records if r["layer"] == "enhancement"]
  assert len(enh) == 1 and enh[0]["experiment"] == "depth_seg"
  assert 0.0 <= enh[0]["miou"] <= 1.0 and enh[0]["bpp_enhancement"] > 0
  assert "psnr" not in enh[0]
  assert os.path.getsize(tmp_path / "previews" / "alpha0.05_proposal.png") > 100


def test_paper_config_without_data_says_what_to_run(tmp_path, configs):
  config = configs.load("depth_seg")
  config.data.data_dir = str(tmp_path / "no_data")
  with pytest.raises(UserError, match="prepare-data.*:synthetic"):
    sweep.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(UserError, match="variant"):
    configs.load("depth_seg", "tiny")


@pytest.mark.slow
def test_probe_writes_a_record_per_base_target_and_family(smoke_run, capsys):
  """`tcr-jax probe` on the trained :smoke workdir (tcr_jax/tools/probe.py)."""
  from tcr_jax import cli
  workdir, records, _ = smoke_run
  argv = ["probe", workdir, "--steps", "4", "--train-images", "8",
          "--val-images", "4"]
  assert cli.main(argv) == 0
  with open(os.path.join(workdir, "v_information.json")) as f:
    probes = json.load(f)
  bases = {(r["method"], r["alpha"]) for r in records if r["layer"] == "base"}
  keys = {(r["method"], r["alpha"], r["target"], r["family"]) for r in probes}
  assert keys == {(m, a, t, f) for m, a in bases
                  for t in ("image", "disparity", "labels")
                  for f in ("linear", "conv")}
  for r in probes:
    assert r["interval"][0] <= r["bits"] <= r["interval"][1]
    assert r["bits"] == pytest.approx(r["h_empty"] - r["h_given"], abs=1e-6)
    assert r["train_images"] == 8 and r["val_images"] <= 4
    assert r["bpp_base"] is not None
  assert os.path.exists(os.path.join(workdir, "vinfo_image.png"))
  # A rerun of one target replaces its records and keeps the others.
  assert cli.main(argv + ["--targets", "image", "--families", "linear"]) == 0
  with open(os.path.join(workdir, "v_information.json")) as f:
    assert len(json.load(f)) == len(probes)


@pytest.mark.slow
def test_side_information_report_on_the_smoke_workdir(smoke_run, capsys, tmp_path):
  """`tcr-jax side-information`: a row per conditional enhancement."""
  from tcr_jax import cli
  workdir, records, _ = smoke_run
  assert cli.main(["side-information", workdir, "--images", "4",
                   "--batch", "4"]) == 0
  out = capsys.readouterr().out
  for r in records:
    if r["layer"] == "enhancement" and r["method"] != "standalone":
      assert f"| {r['method']} | {r['alpha']:g} |" in out
  assert cli.main(["side-information", str(tmp_path)]) == 2
  assert "no finished conditional enhancement" in capsys.readouterr().err
