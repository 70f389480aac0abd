"""config.eval.split: figures on test scenes that no choice saw.

The :reproduction variant stops early and picks each stage's result on the
validation scenes and reports every figure on the test scenes."""
import jax
import numpy as np
import pytest

from tcr_jax import checkpoints, configs_lib
from tcr_jax.data.loader import Loader
from tcr_jax.data.synthetic import SyntheticScenes
from tcr_jax.errors import UserError
from tcr_jax.training import train


def test_test_scenes_are_neither_training_nor_validation_scenes():
  test = SyntheticScenes("test", 32, 64)
  assert len(test) == len(SyntheticScenes("validation", 32, 64)) == 500
  first = test[0]["image"]
  for split in ("train", "validation"):
    assert not np.array_equal(first, SyntheticScenes(split, 32, 64)[0]["image"])
  np.testing.assert_array_equal(first, SyntheticScenes("test", 32, 64)[0]["image"])


def test_loader_reads_the_report_split(configs):
  plain = Loader(configs.smoke())
  assert plain.report_split == "validation" and plain.report_data is plain.val_data
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  loader = Loader(configs.smoke(**{"eval.split": "test"}), mesh)
  assert loader.report_split == "test"
  batch = next(loader.val_batches(2, "test"))
  want = SyntheticScenes("test", 64, 128)[1]["image"].astype(np.float32) / 255
  np.testing.assert_array_equal(np.asarray(batch["image"])[1], want)
  assert loader.reads["test"] == loader.config.eval.batch_size
  assert loader.reads["validation"] == 0


def test_reproduction_config_and_bad_splits(configs):
  c = configs.load("depth_recon", "reproduction")
  configs_lib.validate(c)
  assert c.eval.split == "test" and c.train.lr_schedule == "constant"
  assert c.train.base_patience > 0 and c.train.enhancement_patience > 0
  assert configs.load("depth_seg", "reproduction").task.enhancement == "segmentation"
  bad = configs.smoke(**{"eval.split": "tset"})
  with pytest.raises(UserError, match="eval.split='tset'"):
    configs_lib.validate(bad)
  cityscapes = configs.load("depth_recon")
  cityscapes.eval.split = "test"
  with pytest.raises(UserError, match="cityscapes has none"):
    configs_lib.validate(cityscapes)
  with pytest.raises(UserError, match="depth experiments"):
    configs.load("detection_recon", "reproduction")
  # The narrower segmentation head: a width in (0, 1], and torchvision's
  # weights only at width 1.
  seg = configs.load("depth_seg", "reproduction")
  assert seg.task.segmentation_width < 1 and seg.train.enhancement_steps < c.train.enhancement_steps
  for width in (0.0, 1.5):
    bad = configs.smoke("depth_seg", **{"task.segmentation_width": width})
    with pytest.raises(UserError, match="segmentation_width"):
      configs_lib.validate(bad)
  seg.init.segmentation_backbone = "ckpt/resnet50"
  with pytest.raises(UserError, match="need config.task.segmentation_width=1"):
    configs_lib.validate(seg)


@pytest.mark.slow
def test_stage_stops_on_validation_and_reports_on_test(tmp_path, configs):
  """Evaluations during training read the validation scenes; the stage's
  figures (done.json, results.json) are those of the test scenes."""
  config = configs.smoke(**{"eval.split": "test", "train.base_steps": 2})
  exp = train.Experiment(config, str(tmp_path), devices=jax.devices()[:1])
  calls = []
  evaluate = exp.evaluator.evaluate

  def spy(stage, variables, count, keep_outputs=0, split="validation"):
    calls.append(split)
    return evaluate(stage, variables, count, keep_outputs, split)

  exp.evaluator.evaluate = spy
  stage = train.Stage("base", "base", 2, {"alpha": 0.05, "beta": 0.0})
  variables, metrics = train.run_stage(exp, stage, lambda _: _NullWriter())
  assert calls == ["validation", "test"]
  on_test, _ = evaluate(stage, variables, exp.eval_images, split="test")
  on_validation, _ = evaluate(stage, variables, exp.eval_images)
  assert metrics["depth_rmse"] == pytest.approx(on_test["depth_rmse"])
  assert metrics["depth_rmse"] != pytest.approx(on_validation["depth_rmse"])
  path = str(tmp_path / "stages" / "base" / "done.json")
  done = checkpoints.read_json(path)
  assert done["split"] == "test"
  assert done["metrics"]["depth_rmse"] == pytest.approx(on_test["depth_rmse"])
  # A finished stage measured on other images is not mixed into this run's.
  checkpoints.write_json(path, {**done, "split": "validation"})
  with pytest.raises(UserError, match="measured on the validation images"):
    train.run_stage(exp, stage, lambda _: _NullWriter())


class _NullWriter:
  def write_scalars(self, *args, **kwargs):
    pass

  def flush(self):
    pass
