"""config.sweep.bases_from: a depth_seg sweep reuses a depth_recon sweep's
base models instead of training them again (tcr_jax/training/sweep.py)."""
import json
import os

import pytest

from tcr_jax import checkpoints
from tcr_jax.errors import UserError
from tcr_jax.training import sweep


def _fake_sweep(path, config, stages=("base_baseline_alpha0.05", "base_proposal_alpha0.05",
                                      "enhancement_baseline_alpha0.05")):
  """A workdir with config.json and finished stages (done.json and a file)."""
  os.makedirs(path, exist_ok=True)
  checkpoints.write_json(os.path.join(path, "config.json"), json.loads(config.to_json()))
  for name in stages:
    d = os.path.join(path, "stages", name)
    os.makedirs(os.path.join(d, "checkpoints"))
    with open(os.path.join(d, "checkpoints", "weights"), "w") as f:
      f.write(name)
    checkpoints.write_json(os.path.join(d, "done.json"), {"stage": name, "metrics": {}})


def test_finished_base_stages_are_copied_and_nothing_else(tmp_path, configs):
  recon = configs.smoke("depth_recon")
  seg = configs.smoke("depth_seg")
  _fake_sweep(tmp_path / "recon", recon)
  # An unfinished base stage is not copied; one this workdir has is kept.
  os.makedirs(tmp_path / "recon" / "stages" / "base_start_proposal_alpha0.05")
  _fake_sweep(tmp_path / "seg", seg, stages=("base_proposal_alpha0.05",))
  copied = sweep.adopt_bases(seg, str(tmp_path / "seg"), str(tmp_path / "recon"))
  assert copied == ["base_baseline_alpha0.05"]
  assert checkpoints.finished_stages(str(tmp_path / "seg")) == [
      "base_baseline_alpha0.05", "base_proposal_alpha0.05"]
  weights = tmp_path / "seg" / "stages" / "base_baseline_alpha0.05" / "checkpoints" / "weights"
  assert weights.read_text() == "base_baseline_alpha0.05"
  # A second run copies nothing.
  assert sweep.adopt_bases(seg, str(tmp_path / "seg"), str(tmp_path / "recon")) == []


def test_a_workdir_from_before_eval_split_measured_on_validation(tmp_path, configs):
  old = configs.smoke("depth_recon")
  del old.eval["split"]
  _fake_sweep(tmp_path / "recon", old)
  seg = configs.smoke("depth_seg")
  assert sweep.adopt_bases(seg, str(tmp_path / "seg"), str(tmp_path / "recon"))
  on_test = configs.smoke("depth_seg", **{"eval.split": "test"})
  with pytest.raises(UserError, match="its eval.split is 'validation', here 'test'"):
    sweep.adopt_bases(on_test, str(tmp_path / "seg2"), str(tmp_path / "recon"))


@pytest.mark.parametrize("field, value", [("sweep.beta", 0.5), ("seed", 3),
                                          ("train.base_steps", 7),
                                          ("model.latent_channels", 16)])
def test_a_sweep_with_other_base_models_is_refused(tmp_path, configs, field, value):
  _fake_sweep(tmp_path / "recon", configs.smoke("depth_recon"))
  seg = configs.smoke("depth_seg", **{field: value})
  with pytest.raises(UserError, match=f"its {field} is"):
    sweep.adopt_bases(seg, str(tmp_path / "seg"), str(tmp_path / "recon"))
  assert not (tmp_path / "seg").exists()


def test_bases_from_needs_a_workdir(tmp_path, configs):
  with pytest.raises(UserError, match="not a training workdir"):
    sweep.adopt_bases(configs.smoke("depth_seg"), str(tmp_path / "seg"), str(tmp_path))
