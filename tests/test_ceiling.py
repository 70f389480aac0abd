"""`tcr-jax ceiling` (tcr_jax/tools/ceiling.py): the depth head on uncompressed
images, and the report that sets it next to the base models."""
import json
import os

import numpy as np
import pytest

from tcr_jax import checkpoints, cli
from tcr_jax.reporting import rd
from tcr_jax.tools import ceiling


def _workdir(tmp_path, configs, **overrides):
  c = configs.smoke(**overrides)
  workdir = str(tmp_path / "w")
  os.makedirs(workdir)
  checkpoints.write_json(os.path.join(workdir, "config.json"), json.loads(c.to_json()))
  return workdir


@pytest.mark.slow
def test_the_ceiling_learns_and_is_written_where_the_report_finds_it(tmp_path, configs, capsys):
  workdir = _workdir(tmp_path, configs, **{"data.eval_images": 8,
                                           "train.learning_rate": 3e-3})
  assert cli.main(["ceiling", workdir, "--steps", "60", "--eval-every", "20"]) == 0
  record = ceiling.load(workdir)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == record
  assert record["method"] == "ceiling" and record["trained_steps"] == 60
  assert record["best_step"] in (20, 40, 60)
  assert np.isfinite(record["depth_rmse"]) and record["depth_rmse"] > 0
  # Trained, the head beats its start (which predicts about 0 px).
  from tcr_jax import data
  c = checkpoints.workdir_config(workdir)
  val = data.scene_dataset(c, "validation").batch(range(8))
  zero_rmse = float(np.sqrt(np.mean(val["disparity"][val["valid"]] ** 2)))
  assert record["depth_rmse"] < 0.8 * zero_rmse
  # The report lists it among the references.
  text = rd.write_report([], workdir, "depth_recon")
  assert f"{record['depth_rmse']:.3f}" in text and "ceiling" in text


@pytest.mark.slow
def test_patience_stops_the_ceiling_early(tmp_path, configs):
  workdir = _workdir(tmp_path, configs, **{"data.eval_images": 4,
                                           "train.learning_rate": 0.0})
  # A learning rate of 0: no evaluation improves on the first; patience 2
  # stops it after the third.
  assert cli.main(["ceiling", workdir, "--steps", "50", "--eval-every", "5",
                   "--patience", "2"]) == 0
  record = ceiling.load(workdir)
  assert record["best_step"] == 5 and record["trained_steps"] == 15


def test_ceiling_refusals(tmp_path, capsys):
  assert cli.main(["ceiling", str(tmp_path)]) == 2
  assert "not a training workdir" in capsys.readouterr().err
