"""The train-step benchmark runs and reports what it promises."""
import json

import pytest

from tcr_jax import bench


@pytest.mark.slow
def test_train_step_benchmark_reports_its_keys(capsys):
  code = bench.main(["train-step", "--config=configs/depth_recon.py:smoke",
                     "--batch", "2", "--height", "64", "--width", "128",
                     "--steps", "2"])
  assert code == 0
  row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("images_per_s", "step_ms", "peak_gib", "batch", "height",
              "width", "backend"):
    assert key in row
  assert row["backend"] == "cpu" and row["batch"] == 2
  assert row["images_per_s"] > 0 and row["step_ms"] > 0


def test_bad_config_is_one_line_error(capsys):
  assert bench.main(["train-step", "--config=configs/nope.py"]) == 2
  assert "not found" in capsys.readouterr().err
