"""Detection data: torchvision's resize rule, the canvas layout, flips,
grouped sampling, and COCO 2017 built offline from fake archives."""
import numpy as np
import pytest

from tcr_jax.data import detection, sampler
from tcr_jax.errors import UserError

from conftest import FAKE_COCO


@pytest.mark.parametrize("h,w,want", [
    (480, 640, (800, 1066)), (640, 480, (1066, 800)), (427, 640, (800, 1199)),
    (200, 1000, (266, 1333)), (500, 500, (800, 800))])
def test_resize_rule_is_torchvisions(h, w, want):
  # scale = min(800 / short, 1333 / long), output floor(side * scale)
  assert detection.resized_size(h, w, 800, 1333) == want
  land, port = detection.canvases(800, 1333)
  assert land == (800, 1344) and port == (1344, 800)
  canvas = port if h > w else land
  assert want[0] <= canvas[0] and want[1] <= canvas[1]


def test_letterbox_layout_masks_crowd_and_degenerate_boxes():
  image = np.full((30, 40, 3), 255, np.uint8)
  boxes = [[0, 0, 20, 10], [5, 5, 5, 20], [10, 10, 30, 30], [35, 2, 60, 12]]
  ex = detection.letterbox(image, boxes, [1, 2, 3, 4], [False, False, True, False],
                           (64, 96), 5, min_size=60, max_size=90, image_id=9)
  assert ex["image_size"].tolist() == [60, 80]
  assert ex["orig_size"].tolist() == [30, 40]
  assert ex["image"].shape == (64, 96, 3)
  assert ex["image"][:60, :80].min() == 1.0 and ex["image"][60:].max() == 0
  assert ex["image"][:, 80:].max() == 0
  # Non-crowd boxes first, scaled x2, clipped to the image; the zero-width
  # and the crowd box are masked out, the padding rows too.
  assert ex["labels"].tolist() == [1, 2, 4, 3, 0]
  np.testing.assert_allclose(ex["boxes"][0], [0, 0, 40, 20])
  np.testing.assert_allclose(ex["boxes"][2], [70, 4, 80, 24])
  assert ex["box_mask"].tolist() == [True, False, True, False, False]
  assert ex["crowd"].tolist() == [False, False, False, True, False]
  with pytest.raises(UserError, match="does not fit"):
    detection.letterbox(image, boxes, [1] * 4, [False] * 4, (32, 32), 5, 60, 90)


def test_flips_stay_within_each_image():
  image = np.zeros((20, 30, 3), np.uint8)
  image[:, :5] = 255
  ex = detection.letterbox(image, [[0, 0, 5, 20]], [1], [False], (32, 64), 2)
  batch = detection.stack([ex, ex])
  out = detection.flip_batch(batch, np.array([True, False]))
  assert out["image"][0, :20, 25:30].min() == 1 and out["image"][0, :20, :25].max() == 0
  assert out["image"][0, :, 30:].max() == 0  # the padding stays at the right
  np.testing.assert_allclose(out["boxes"][0, 0], [25, 0, 30, 20])
  np.testing.assert_array_equal(out["boxes"][1], batch["boxes"][1])
  np.testing.assert_array_equal(out["boxes"][0, 1], batch["boxes"][0, 1])


def test_grouped_indices_never_mix_groups_and_cover_each_epoch():
  groups = np.array([0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 1])  # 6 of 0, 5 of 1
  seen = []
  per_epoch = 6 // 2 + 5 // 2
  for step in range(per_epoch):
    idx = sampler.grouped_indices(step, 2, groups, seed=3)
    assert len(set(groups[idx])) == 1
    seen += idx.tolist()
  assert len(set(seen)) == len(seen) == 2 * per_epoch  # no repeats in an epoch
  np.testing.assert_array_equal(sampler.grouped_indices(4, 2, groups, 3),
                                sampler.grouped_indices(4, 2, groups, 3))
  nxt = [tuple(sampler.grouped_indices(per_epoch + s, 2, groups, 3))
         for s in range(per_epoch)]
  assert nxt != [tuple(seen[2 * s:2 * s + 2]) for s in range(per_epoch)]
  with pytest.raises(ValueError, match="no group"):
    sampler.grouped_indices(0, 8, groups, 0)


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  from tcr_jax.data.prepare import prepare_data
  root = tmp_path_factory.mktemp("coco")
  images = FAKE_COCO.write_zips(str(root / "manual"))
  summary = prepare_data("coco", str(root / "manual"), str(root / "data"))
  return str(root / "data"), images, summary


def _config(data_dir, configs):
  c = configs.load("detection_recon", "smoke")
  c.data.name = "coco"
  c.data.data_dir = data_dir
  c.data.min_size, c.data.max_size = 64, 96
  c.data.max_boxes = 4
  c.train.batch_size = 2
  c.eval.batch_size = 2
  return c


def test_prepare_data_builds_coco_from_the_three_archives(coco_dir, configs):
  data_dir, images, summary = coco_dir
  assert summary["splits"] == {"train": 6, "validation": 3}
  from tcr_jax.data import coco, detection_dataset
  train = detection_dataset(_config(data_dir, configs), "train")
  # ids 15 (no annotations) and 16 (area 300) are filtered out.
  kept = sorted(int(train.source[int(i)]["image_id"]) for i in train.keep)
  assert kept == [11, 12, 13, 14]
  assert len(train) == 4
  by_id = {int(train.source[int(k)]["image_id"]): n for n, k in enumerate(train.keep)}
  assert train.groups[by_id[12]] == 1 and train.groups[by_id[11]] == 0
  out = train.batch([by_id[12], by_id[14]])  # two portrait images
  assert out["image"].shape == (2, 96, 64, 3)
  # 80x60 -> scale min(64 / 60, 96 / 80) = 1.0667 -> 85x64
  assert out["image_size"][0].tolist() == [85, 64]
  assert out["orig_size"][0].tolist() == [80, 60]
  np.testing.assert_allclose(out["boxes"][0, 0],
                             np.array([10, 10, 50, 60]) * np.array([64 / 60, 85 / 80] * 2),
                             rtol=1e-5)
  assert out["labels"][0].tolist() == [18, 1, 0, 0]
  assert out["box_mask"][0].tolist() == [True, False, False, False]
  assert out["crowd"][0].tolist() == [False, True, False, False]
  assert out["image_id"].tolist() == [12, 14]
  # Pixels: the JPEG decoded and resized bilinearly (PIL), then / 255.
  from PIL import Image
  want = np.asarray(Image.fromarray(images[12]).resize(
      (64, 85), Image.Resampling.BILINEAR)).astype(np.float32) / 255
  np.testing.assert_allclose(out["image"][0, :85, :64], want, atol=1e-6)
  assert out["image"][0, 85:].max() == 0
  with pytest.raises(ValueError, match="mixes"):
    train.batch([by_id[11], by_id[12]])
  # The degenerate box of image 13 (0.5 px wide) stays out of the targets.
  out = train.batch([by_id[13]])
  assert out["box_mask"][0].tolist() == [True, True, False, False]
  assert coco.INDEX.format(split="train")


def test_loader_batches_stay_on_one_canvas(coco_dir, configs):
  import jax
  from tcr_jax.training import sharding
  from tcr_jax.data.loader import Loader
  data_dir, _, _ = coco_dir
  from tcr_jax import bases
  config = _config(data_dir, configs)
  loader = Loader(config, sharding.data_mesh(jax.devices()[:2]),
                  bases.for_config(config).dataset)
  for step in range(4):
    b = loader.host_train_batch("base", step)
    assert b["image"].shape[1:3] in ((64, 96), (96, 64))
    sizes = b["image_size"]
    assert np.all(sizes[:, 0] <= b["image"].shape[1])
  val = list(loader.val_batches(3))
  shapes = sorted(tuple(v["image"].shape) for v in val)
  assert shapes == [(2, 64, 96, 3), (2, 96, 64, 3)]
  weights = sorted(float(np.asarray(v["weight"]).sum()) for v in val)
  assert weights == [1.0, 2.0]


def test_prepare_data_coco_names_what_is_missing(tmp_path):
  from tcr_jax.data.prepare import prepare_data
  FAKE_COCO.write_zips(str(tmp_path / "m"), drop=("val2017.zip",))
  with pytest.raises(UserError, match="val2017.zip not found") as err:
    prepare_data("coco", str(tmp_path / "m"), str(tmp_path / "d"))
  assert "\n" not in str(err.value) and "cocodataset.org" in str(err.value)
  (tmp_path / "m" / "val2017.zip").write_bytes(b"not a zip")
  with pytest.raises(UserError, match="not a valid zip"):
    prepare_data("coco", str(tmp_path / "m"), str(tmp_path / "d"))


def test_unprepared_coco_says_what_to_run(tmp_path, configs):
  from tcr_jax.data import detection_dataset
  c = _config(str(tmp_path / "nothing"), configs)
  with pytest.raises(UserError, match="prepare-data --dataset coco.*:synthetic"):
    detection_dataset(c, "train")


def test_synthetic_scenes_in_the_detection_layout(configs):
  from tcr_jax import bases
  c = configs.load("detection_recon", "smoke")
  data = bases.for_config(c).dataset("validation")
  b = data.batch([0, 1, 2])
  assert b["image"].shape == (3, 64, 128, 3)
  assert (b["image_size"] == [64, 128]).all() and (b["orig_size"] == [64, 128]).all()
  assert b["boxes"].shape == (3, c.data.max_boxes, 4)
  assert set(np.unique(b["labels"][b["box_mask"]])) <= {1, 3}
  assert b["box_mask"].any()
  m = b["box_mask"]
  assert np.all(b["boxes"][m][:, 2] > b["boxes"][m][:, 0])
  assert not b["crowd"].any() and b["image_id"].tolist() == [0, 1, 2]
