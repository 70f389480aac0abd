"""The design's proof: a fourth base task from tests/ alone (tests/toy_base.py
and its config tests/toy_recon_config.py) runs a :smoke sweep end to end,
is coded to a file and decoded, with no edit to tcr_jax."""
import json
import os

import numpy as np
import pytest

from tcr_jax import cli, configs_lib
from tcr_jax.errors import UserError
from tcr_jax.training import sweep

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(**overrides):
  c = configs_lib.load_config(os.path.join(HERE, "toy_recon_config.py") + ":smoke")
  c.sweep.alphas = (0.05,)
  c.sweep.methods = ("proposal",)
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


@pytest.mark.slow  # a sweep end to end
def test_a_toy_base_task_runs_a_sweep_and_codes_files(tmp_path):
  workdir = str(tmp_path / "w")
  records = sweep.train_and_evaluate(_config(), workdir)
  base = [r for r in records if r["layer"] == "base"]
  enh = [r for r in records if r["layer"] == "enhancement"]
  assert [r["method"] for r in base] == ["proposal"]
  assert {r["method"] for r in enh} == {"proposal", "standalone"}
  # The toy's own metric reached results.json, the depth task's did not.
  assert 0.0 <= base[0]["object_iou"] <= 1.0
  assert "depth_rmse" not in base[0] and "map" not in base[0]
  assert all(np.isfinite(r["psnr"]) and r["bpp_enhancement"] > 0 for r in enh)
  assert base[0]["bpp_actual_base"] > 0
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f) == records
  # The toy draws its own previews.
  assert os.listdir(os.path.join(workdir, "previews")) == ["alpha0.05_proposal.png"]
  # The evaluator was the toy's: its loss is L_b with the toy's D_b.
  done = json.load(open(os.path.join(workdir, "stages",
                                     "base_proposal_alpha0.05", "done.json")))
  assert set(done["metrics"]) >= {"object_iou", "loss", "bpp_base"}
  # tcr-jax compress / decompress ask the task what to write.
  from PIL import Image
  image = tmp_path / "in.png"
  Image.fromarray(np.full((64, 128, 3), 90, np.uint8)).save(image)
  out = str(tmp_path / "a.tcr")
  assert cli.main(["compress", "--workdir", workdir, "--input", str(image),
                   "--output", out, "--checkpoint", "base_proposal_alpha0.05"]) == 0
  assert cli.main(["decompress", "--workdir", workdir, "--input", out,
                   "--output-dir", str(tmp_path / "d")]) == 0
  assert sorted(os.listdir(tmp_path / "d")) == ["objects.png", "reconstruction.png"]
  assert Image.open(tmp_path / "d" / "objects.png").size == (128, 64)


def test_an_unknown_base_task_is_one_line(tmp_path):
  c = _config()
  c.task.base = "no_such_task_module"
  with pytest.raises(UserError, match="config.task.base='no_such_task_module'; "
                     "expected one of 'depth', 'detection'"):
    configs_lib.validate(c)
  c.task.base = "json"  # importable, but no Task
  with pytest.raises(UserError, match="module json has no Task class"):
    configs_lib.validate(c)
  c.task.base = "toy_base"
  c.train.base_select = "depth_rmse"  # not one of the toy's metrics
  with pytest.raises(UserError, match="config.train.base_select='depth_rmse'; "
                     "expected one of 'loss', 'bpp_base', 'object_iou'"):
    configs_lib.validate(c)
  assert not os.listdir(tmp_path)
