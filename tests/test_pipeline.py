"""Reading a tiny prepared Cityscapes set (fake zips): batches, shares."""
import jax
import numpy as np
import pytest

from tcr_jax.data import cityscapes, pipeline, sampler
from tcr_jax.data.loader import Loader
from tcr_jax.errors import UserError

from conftest import FAKE_CITYSCAPES, load_config

H, W = FAKE_CITYSCAPES.H, FAKE_CITYSCAPES.W
write_zips, sample = FAKE_CITYSCAPES.write_zips, FAKE_CITYSCAPES.sample

TRAIN = [("aachen", f"{i:06d}", "000019") for i in range(5)]
VAL = [("lindau", "000000", "000019")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  import tensorflow_datasets as tfds
  root = tmp_path_factory.mktemp("pipeline")
  write_zips(str(root / "manual"), frames={"train": TRAIN, "val": VAL})
  builder = cityscapes.make_builder(str(root / "data"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(root / "manual")))
  return str(root / "data")


def make_config(data_dir, height=H, width=W, batch_size=4, seed=0):
  c = load_config("depth_seg", "smoke")
  c.data.name = "cityscapes"
  c.data.data_dir = data_dir
  c.data.height, c.data.width = height, width
  c.train.batch_size = batch_size
  c.seed = seed
  return c


def _name_of(batches, i):
  name = batches.source[int(i)]["file_name"]
  return name.decode() if isinstance(name, bytes) else str(name)


def test_batch_layout_and_values(data_dir):
  batches = pipeline.TfdsBatches(make_config(data_dir), "train")
  assert len(batches) == 5
  out = batches.batch([3, 0, 3])
  assert out["image"].shape == (3, H, W, 3) and out["image"].dtype == np.float32
  assert out["disparity"].shape == (3, H, W) and out["disparity"].dtype == np.float32
  assert out["valid"].dtype == bool and out["labels"].dtype == np.int32
  assert 0 <= out["image"].min() and out["image"].max() <= 1
  assert set(np.unique(out["labels"])) <= set(range(20))
  src = sample("train", tuple(_name_of(batches, 3).split("_")))
  train_ids = cityscapes.to_train_ids(src["label_ids"]).astype(np.int32)
  np.testing.assert_array_equal(out["labels"][0], np.where(train_ids == 255, 19, train_ids))
  assert (out["labels"][0] == 19).any()
  np.testing.assert_array_equal(out["image"][0] * 255, src["image"].astype(np.float32))
  np.testing.assert_array_equal(out["valid"][0], src["disparity"] > 0)
  again = batches.batch([3, 0, 3])
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  np.testing.assert_array_equal(out["image"][0], out["image"][2])


def test_resize_scales_disparity(data_dir):
  full = pipeline.TfdsBatches(make_config(data_dir), "validation").batch([0])
  half = pipeline.TfdsBatches(make_config(data_dir, H // 2, W // 2),
                              "validation").batch([0])
  assert half["image"].shape == (1, H // 2, W // 2, 3)
  # Nearest with half-pixel centres picks the odd rows and columns at x1/2.
  np.testing.assert_allclose(half["disparity"][0],
                             full["disparity"][0, 1::2, 1::2] / 2, rtol=1e-6)
  np.testing.assert_array_equal(half["valid"][0], full["valid"][0, 1::2, 1::2])
  assert set(np.unique(half["labels"])) <= set(np.unique(full["labels"]))


def test_not_prepared_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="prepare-data"):
    pipeline.TfdsBatches(make_config(str(tmp_path)), "train")


def test_global_indices_permute_each_epoch():
  steps = [sampler.global_indices(s, 4, 10, 7) for s in range(5)]
  flat = np.concatenate(steps)
  assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
  assert not np.array_equal(flat[:10], flat[10:20])
  # "infinite" datasets (the synthetic scenes) are read in order
  np.testing.assert_array_equal(sampler.global_indices(3, 4, sampler.INFINITE, 7),
                                np.arange(12, 16))


def test_loader_batches_are_deterministic_and_resumable(data_dir):
  config = make_config(data_dir)
  loader = Loader(config)
  first = [loader.host_train_batch("s", step) for step in range(3)]
  assert first[0]["image"].shape == (4, H, W, 3)
  assert first[0]["labels"].dtype == np.int32 and first[0]["valid"].dtype == bool
  again = Loader(config).host_train_batch("s", 2)  # a resumed run
  other = loader.host_train_batch("another stage", 0)
  for k in first[0]:
    np.testing.assert_array_equal(first[2][k], again[k])
  assert not np.array_equal(first[0]["image"], other["image"])
  # The unaugmented content is the global batch of that step, maybe flipped.
  idx = sampler.global_indices(2, 4, 5, sampler.stage_seed(config.seed, "data"))
  raw = pipeline.TfdsBatches(config, "train").batch(idx)
  for got, want in zip(first[2]["labels"], raw["labels"]):
    assert (np.array_equal(got, want) or np.array_equal(got, want[:, ::-1]))
  assert loader.reads == {"train": 3 * 4 + 4, "validation": 0}


def test_batches_made_ahead_are_the_batches_made_one_by_one(data_dir):
  config = make_config(data_dir)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  one_by_one = [Loader(config, mesh).train_batch("s", step) for step in range(2, 6)]
  loader = Loader(config, mesh)
  ahead = list(loader.train_batches("s", 2, 6))
  assert len(ahead) == 4
  for want, got in zip(one_by_one, ahead):
    for k in want:
      np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
  assert loader.reads["train"] == 4 * 4
  # Stopping early (an early stop) leaves at most two batches made ahead.
  early = Loader(config, mesh)
  batches = early.train_batches("s", 0, 100)
  next(batches)
  batches.close()
  assert early.reads["train"] <= 3 * 4


def test_process_shares_are_disjoint_and_augmented_alike(data_dir, monkeypatch):
  """2 processes read 3 + 2 of a batch of 5; together the very batch (and
  augmentation) one process reads alone."""
  config = make_config(data_dir, batch_size=5)
  whole = Loader(config).host_train_batch("s", 1)
  shards = []
  for p in range(2):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    loader = Loader(config)
    shards.append(loader.host_train_batch("s", 1))
    assert loader.reads["train"] == (3, 2)[p]
  assert [s["image"].shape[0] for s in shards] == [3, 2]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([s[k] for s in shards]), whole[k])
  idx = sampler.global_indices(1, 5, 5, sampler.stage_seed(config.seed, "data"))
  parts = [set(sampler.process_share(idx, p, 2).tolist()) for p in range(2)]
  assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(5))
