"""The Cityscapes tfds builder on tiny fake zips in the official layout."""
import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from tcr_jax.data import cityscapes
from tcr_jax.errors import UserError

from conftest import FAKE_CITYSCAPES

H, W = FAKE_CITYSCAPES.H, FAKE_CITYSCAPES.W
write_zips, sample = FAKE_CITYSCAPES.write_zips, FAKE_CITYSCAPES.sample
FRAMES = FAKE_CITYSCAPES.FRAMES


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("cityscapes")
  src = write_zips(str(root / "manual"))
  builder = cityscapes.make_builder(str(root / "data"))
  import tensorflow_datasets as tfds
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root / "manual")))
  return builder, src


def test_label_table_matches_cityscapes_scripts():
  ids = np.arange(34, dtype=np.uint8)
  train = cityscapes.to_train_ids(ids)
  assert sorted(train[train != 255].tolist()) == list(range(19))
  assert train[7] == 0 and train[26] == 13 and train[33] == 18
  assert train[0] == train[6] == train[29] == train[30] == 255


def test_decode_disparity():
  d, v = cityscapes.decode_disparity(np.array([0, 1, 257, 65535], np.uint16))
  np.testing.assert_array_equal(v, [False, True, True, True])
  np.testing.assert_allclose(d, [0.0, 0.0, 1.0, 65534 / 256])


def test_split_counts(built):
  builder, _ = built
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.splits["validation"].num_examples == 2


@pytest.mark.parametrize("split", ["train", "validation"])
def test_values_match_source(built, split):
  builder, src = built
  source = builder.as_data_source(split=split)
  names = set()
  for i in range(len(source)):
    ex = source[i]
    name = ex["file_name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    names.add(name)
    s = src[name]
    np.testing.assert_array_equal(ex["image"], s["image"])
    np.testing.assert_array_equal(
        ex["segmentation"][..., 0], cityscapes.to_train_ids(s["label_ids"]))
    raw = cityscapes.read_disparity_png(ex["disparity_png"])
    np.testing.assert_array_equal(raw, s["disparity"])
    disparity, valid = cityscapes.decode_disparity(raw)
    p = s["disparity"].astype(np.float64)
    np.testing.assert_array_equal(valid, p > 0)
    np.testing.assert_allclose(disparity[p > 0], (p[p > 0] - 1) / 256)
    assert not valid[0].any()
  folder = cityscapes.SPLITS[split]
  assert names == {"_".join(k) for k in FRAMES[folder]}


def test_missing_zip_names_zip_and_url(tmp_path):
  write_zips(str(tmp_path))
  os.remove(tmp_path / cityscapes.ZIPS["disparity"])
  with pytest.raises(UserError) as err:
    cityscapes.check_manual_dir(str(tmp_path))
  msg = str(err.value)
  assert cityscapes.ZIPS["disparity"] in msg and cityscapes.DOWNLOAD_URL in msg
  assert "\n" not in msg


def test_missing_partner_is_a_user_error(tmp_path):
  write_zips(str(tmp_path), frames={"train": FRAMES["train"][:2]},
             drop_disparity=1)
  paths = cityscapes.check_manual_dir(str(tmp_path))
  with pytest.raises(UserError, match="disparity_trainvaltest.zip"):
    list(cityscapes.generate_examples(paths, "train"))


def test_truncated_zip_is_a_user_error(tmp_path):
  write_zips(str(tmp_path))
  (tmp_path / cityscapes.ZIPS["labels"]).write_bytes(b"PK\x03\x04 truncated")
  with pytest.raises(UserError, match="download gtFine_trainvaltest.zip again"):
    cityscapes.check_manual_dir(str(tmp_path))


def test_prepare_data_cityscapes(tmp_path):
  from tcr_jax.data.prepare import prepare_data
  write_zips(str(tmp_path / "manual"), frames={"train": FRAMES["train"][:1],
                                               "val": FRAMES["val"][:1]})
  out = prepare_data("cityscapes", str(tmp_path / "manual"), str(tmp_path / "data"))
  assert out["splits"] == {"train": 1, "validation": 1}
  with pytest.raises(UserError, match="leftImg8bit_trainvaltest.zip"):
    prepare_data("cityscapes", str(tmp_path / "empty"), str(tmp_path / "data2"))


@pytest.mark.slow
def test_smoke_training_on_fake_cityscapes(tmp_path, configs):
  """The paper config's data path end to end: zips -> prepare-data -> train."""
  from tcr_jax import cli
  from tcr_jax.training import sweep
  write_zips(str(tmp_path / "manual"))
  assert cli.main(["prepare-data", "--dataset", "cityscapes", "--manual-dir",
                   str(tmp_path / "manual"), "--data-dir",
                   str(tmp_path / "tfds")]) == 0
  config = configs.smoke(**{"data.name": "cityscapes",
                           "data.data_dir": str(tmp_path / "tfds"),
                           "data.eval_images": 2, "eval.batch_size": 4,
                           "train.base_steps": 2, "train.enhancement_steps": 2})
  config.sweep.methods = ("baseline",)
  config.sweep.standalone = False
  records = sweep.train_and_evaluate(config, str(tmp_path / "work"))
  assert [r["layer"] for r in records] == ["base", "enhancement"]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert records[0]["depth_rmse"] > 0 and records[1]["bpp_enhancement"] > 0
