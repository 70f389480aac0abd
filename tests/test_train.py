"""Training end to end on the :smoke config (CPU, 4 fake devices)."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcr_jax import configs_lib, train
from tcr_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALPHAS = "(0.05,)"
FIELDS = {"experiment", "method", "alpha", "beta", "bpp_base", "bpp_enhancement",
          "depth_rmse", "psnr_from_base", "psnr", "loss"}


def load(experiment, variant=""):
  return configs_lib.load_config(
      os.path.join(ROOT, "configs", f"{experiment}.py") + (f":{variant}" if variant else ""))


def smoke_config(**overrides):
  config = load("depth_recon", "smoke")
  config.sweep.alphas = (0.05,)
  for k, v in overrides.items():
    node = config
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  start = time.perf_counter()
  records = train.train_and_evaluate(smoke_config(), workdir)
  return workdir, records, time.perf_counter() - start


def _load(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


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
      # A real file: within a few percent of the estimate plus the header.
      assert r["bpp_actual_base"] > 0
      assert r["bpp_enhancement"] is None and r["bpp_base"] > 0
      assert r["depth_rmse"] > 0 and np.isfinite(r["psnr_from_base"])
      assert r["beta"] == (0.0 if r["method"] == "baseline" else 0.01)
    else:
      assert r["bpp_actual_enhancement"] > 0
      assert r["bpp_enhancement"] > 0 and np.isfinite(r["psnr"])
      assert (r["bpp_base"] is None) == (r["method"] == "standalone")
  for name in ("bd_rate.md", "rd_base_task.png", "rd_enhancement.png",
               "previews/alpha0.05_proposal.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 100, name


def test_checkpoints_are_written(smoke_run):
  workdir, _, _ = smoke_run
  stage = os.path.join(workdir, "stages", "base_proposal_alpha0.05")
  assert os.listdir(os.path.join(stage, "checkpoints")) == ["6"]  # latest kept
  assert len(os.listdir(os.path.join(stage, "best"))) == 1
  assert os.path.isdir(os.path.join(stage, "final"))
  with open(os.path.join(stage, "done.json")) as f:
    assert json.load(f)["steps"] == 6


def test_second_call_retrains_nothing(smoke_run, capsys):
  workdir, records, first_seconds = smoke_run
  stamps = {d: os.path.getmtime(os.path.join(workdir, "stages", d, "done.json"))
            for d in os.listdir(os.path.join(workdir, "stages"))}
  start = time.perf_counter()
  again = train.train_and_evaluate(smoke_config(), workdir)
  assert again == records
  out = capsys.readouterr().out
  assert out.count("finished earlier") == 5 and "step 2/" not in out
  for d, t in stamps.items():
    assert os.path.getmtime(os.path.join(workdir, "stages", d, "done.json")) == t


def test_loss_decreases_over_a_few_steps(tmp_path):
  config = smoke_config(**{"data.hflip": False, "data.color_jitter": 0.0})
  trainer = train.Trainer(config, str(tmp_path), devices=jax.devices()[:1])
  # beta 1: the reconstruction reward dominates, so the objective falls
  # smoothly; the tiny depth path (a 1x2 latent) jumps as latents re-round.
  stage = train.Stage("probe", "base", 8, {"alpha": 0.05, "beta": 1.0})
  variables = trainer.init_variables("base")
  tx = trainer.optimizer("base")
  state = jax.device_put({"params": variables["params"],
                          "batch_stats": variables["batch_stats"],
                          "opt_state": tx.init(variables["params"]),
                          "step": jnp.int32(0), "rng": jax.random.PRNGKey(0),
                          "best_val": jnp.float32(np.inf)}, trainer.replicated)
  batch = trainer.train_batch(stage, 0)
  hp = train._hp_arrays(stage.hp)
  step = trainer.train_step_fn("base")
  losses, rec = [], []
  for _ in range(15):
    state, metrics = step(state, batch, hp, None)
    losses.append(float(metrics["loss"]))
    rec.append(float(metrics["rec_rmse255"]))
  # Fitting one batch: the last losses are clearly below the first.
  assert np.mean(losses[-3:]) < 0.9 * losses[0], losses
  assert rec[-1] < 0.9 * rec[0], rec


def test_sharded_step_equals_single_device_step(tmp_path):
  """4 fake devices (batch sharded) give the 1-device loss and gradients.

  Gradients, not post-Adam parameters, are compared: Adam's first update is
  lr * sign(g), so parameters whose gradient is float noise move by +-lr
  either way.
  """
  assert jax.device_count() == 4
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    trainer = train.Trainer(smoke_config(), str(tmp_path), devices=devices)
    stage = train.Stage("probe", "base", 1, {"alpha": 0.05, "beta": 0.01})
    v = jax.device_put(trainer.init_variables("base"), trainer.replicated)
    objective = trainer._objective("base", train=True)
    batch = trainer.train_batch(stage, 0)
    assert len(batch["image"].sharding.device_set) == len(devices)

    @jax.jit
    def grads(params, batch):
      f = lambda p: objective({"params": p, "batch_stats": v["batch_stats"]},
                              None, batch, jax.random.PRNGKey(0),
                              train._hp_arrays(stage.hp))
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


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
  with pytest.raises(UserError, match="divisible"):
    train.Trainer(smoke_config(**{"train.batch_size": 6}), str(tmp_path))


def test_preempted_run_ends_like_an_uninterrupted_one(smoke_run, tmp_path):
  """SIGKILL in the middle of a stage, start again: same results.json."""
  _, records, _ = smoke_run
  workdir = str(tmp_path / "preempted")
  cmd = [sys.executable, "-m", "tcr_jax.main",
         "--config=configs/depth_recon.py:smoke",
         f"--config.sweep.alphas={ALPHAS}", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  target = os.path.join(workdir, "stages", "enhancement_baseline_alpha0.05",
                        "checkpoints", "2")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 900
  while not os.path.isdir(target) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert os.path.isdir(target), "the run ended before it could be interrupted"
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "resuming at step" in done.stdout
  resumed = _load(workdir)
  assert len(resumed) == len(records)
  for a, b in zip(resumed, records):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
      else:
        assert a[k] == b[k]


def test_depth_seg_smoke_runs_segmentation_enhancement(tmp_path):
  config = load("depth_seg", "smoke")
  config.sweep.alphas = (0.05,)
  config.sweep.methods = ("proposal",)
  config.sweep.standalone = False
  config.train.base_steps = 2
  config.train.enhancement_steps = 2
  records = train.train_and_evaluate(config, str(tmp_path))
  enh = [r for r in records if r["layer"] == "enhancement"]
  assert len(enh) == 1 and enh[0]["experiment"] == "depth_seg"
  assert 0.0 <= enh[0]["miou"] <= 1.0 and enh[0]["bpp_enhancement"] > 0
  assert "psnr" not in enh[0]
  assert os.path.getsize(tmp_path / "previews" / "alpha0.05_proposal.png") > 100


def test_paper_config_without_data_says_what_to_run(tmp_path):
  config = load("depth_seg")
  config.data.data_dir = str(tmp_path / "no_data")
  with pytest.raises(UserError, match="prepare-data.*:synthetic"):
    train.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(UserError, match="variant"):
    load("depth_seg", "tiny")
