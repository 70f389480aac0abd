"""Tests of the procedural street-scene dataset and its contact sheet."""
import numpy as np
import pytest
from PIL import Image

from tcr_jax.data import preview
from tcr_jax.data import synthetic
from tcr_jax.data.synthetic import SyntheticScenes
from tcr_jax.errors import UserError

KEYS = ("image", "disparity", "disparity_valid", "segmentation", "boxes",
        "box_labels", "num_boxes")
SIZES = [(32, 64), (96, 160)]
ROAD, SKY, PERSON, CAR = 0, 10, 11, 13
CLASS_OF_COCO = {synthetic.COCO_PERSON: PERSON, synthetic.COCO_CAR: CAR}


@pytest.fixture(scope="module")
def samples():
  """A few validation samples per size, rendered once."""
  return {size: [SyntheticScenes("validation", *size)[i] for i in range(8)]
          for size in SIZES}


def _assert_same(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_deterministic_per_seed_split_and_index():
  ds = SyntheticScenes("train", 32, 64, seed=0)
  first = ds[3]
  ds[5]                                   # reuses the thread's buffers
  _assert_same(first, ds[3])
  _assert_same(first, SyntheticScenes("train", 32, 64, seed=0)[3])
  assert not np.array_equal(first["image"], ds[4]["image"])
  other_seed = SyntheticScenes("train", 32, 64, seed=1)[3]
  assert not np.array_equal(first["image"], other_seed["image"])


def test_outputs_do_not_alias_between_samples():
  ds = SyntheticScenes("train", 32, 64)
  a = ds[0]
  kept = {k: np.copy(v) for k, v in a.items()}
  ds[1]
  _assert_same(a, kept)


def test_train_and_validation_are_disjoint():
  train = SyntheticScenes("train", 32, 64)
  val = SyntheticScenes("validation", 32, 64)
  train_images = {train[i]["image"].tobytes() for i in range(20)}
  for i in range(20):
    image = val[i]["image"]
    assert not np.array_equal(image, train[i]["image"])
    assert image.tobytes() not in train_images


@pytest.mark.parametrize("size", SIZES)
def test_keys_shapes_dtypes_and_ranges(samples, size):
  h, w = size
  bound = synthetic.max_disparity(h, w)
  for s in samples[size]:
    assert set(s) == set(KEYS)
    assert s["image"].shape == (h, w, 3) and s["image"].dtype == np.uint8
    disp = s["disparity"]
    assert disp.shape == (h, w) and disp.dtype == np.float32
    assert np.isfinite(disp).all()
    assert disp.min() >= 0 and disp.max() <= bound
    valid = s["disparity_valid"]
    assert valid.shape == (h, w) and valid.dtype == np.bool_
    seg = s["segmentation"]
    assert seg.shape == (h, w) and seg.dtype == np.uint8
    np.testing.assert_array_equal(valid, seg != SKY)
    assert (disp[valid] > 0).all()
    assert set(np.unique(seg)) <= set(range(19)) | {synthetic.IGNORE_INDEX}
    assert s["boxes"].shape == (synthetic.MAX_BOXES, 4)
    assert s["boxes"].dtype == np.float32
    assert s["box_labels"].shape == (synthetic.MAX_BOXES,)
    assert s["box_labels"].dtype == np.int32
    assert s["num_boxes"].dtype == np.int32 and s["num_boxes"].shape == ()


def test_disparity_scales_with_width():
  # Nearby road is ~100 px at 1024x2048 (checked here at 1/8 of that).
  bottoms = [SyntheticScenes("validation", 128, 256)[i]["disparity"][-1]
             for i in range(4)]
  assert 8 <= np.median(bottoms) <= 17
  assert synthetic.max_disparity(1024, 2048) == pytest.approx(
      8 * synthetic.max_disparity(128, 256))


@pytest.mark.parametrize("size", SIZES)
def test_road_disparity_grows_linearly_downwards(samples, size):
  checked = 0
  for s in samples[size]:
    road = s["segmentation"] == ROAD
    rows = np.flatnonzero(road.any(axis=1))
    if len(rows) < 3:
      continue
    per_row = np.array([np.median(s["disparity"][r][road[r]]) for r in rows])
    assert (np.diff(per_row) > 0).all()
    # A plane: the disparity is linear in the row.
    slope, offset = np.polyfit(rows, per_row, 1)
    np.testing.assert_allclose(slope * rows + offset, per_row, atol=1e-3)
    checked += 1
  assert checked >= 4


@pytest.mark.parametrize("size", SIZES)
def test_objects_are_nearer_than_the_road_behind_them(samples, size):
  checked = 0
  for s in samples[size]:
    road = s["segmentation"] == ROAD
    for box, label in zip(s["boxes"][:s["num_boxes"]],
                          s["box_labels"][:s["num_boxes"]]):
      x0, y0, x1, y1 = box.astype(int)
      cls = s["segmentation"][y0:y1, x0:x1] == CLASS_OF_COCO[int(label)]
      disp = s["disparity"][y0:y1, x0:x1][cls]
      # One upright object stands at one depth: a single disparity value
      # covers a good part of its box.
      _, counts = np.unique(disp, return_counts=True)
      assert counts.max() >= synthetic.MIN_BOX_FILL * cls.size
      # It stands on the road at its base, at or below its lowest visible
      # row: the road seen in the rows it spans is farther away.
      rows = road[y0:y1]
      if rows.any():
        assert disp.max() > s["disparity"][y0:y1][rows].max()
        checked += 1
  assert checked >= 5


@pytest.mark.parametrize("size", SIZES)
def test_boxes(samples, size):
  h, w = size
  for s in samples[size]:
    n = int(s["num_boxes"])
    assert 0 <= n <= synthetic.MAX_BOXES
    boxes, labels = s["boxes"], s["box_labels"]
    assert (boxes[n:] == 0).all() and (labels[n:] == 0).all()
    for box, label in zip(boxes[:n], labels[:n]):
      x0, y0, x1, y1 = box
      assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
      assert box.tolist() == np.round(box).tolist()
      assert int(label) in CLASS_OF_COCO
      inside = s["segmentation"][int(y0):int(y1), int(x0):int(x1)]
      fill = np.mean(inside == CLASS_OF_COCO[int(label)])
      assert fill >= synthetic.MIN_BOX_FILL
      assert (inside == CLASS_OF_COCO[int(label)]).sum() >= (
          synthetic.MIN_BOX_PIXELS)


def test_scenes_vary():
  ds = SyntheticScenes("train", 128, 256)
  with_car = with_person = 0
  classes = set()
  boxes, ignored = [], []
  for i in range(20):
    s = ds[i]
    labels = s["box_labels"][:s["num_boxes"]]
    with_car += (labels == synthetic.COCO_CAR).any()
    with_person += (labels == synthetic.COCO_PERSON).any()
    classes |= set(np.unique(s["segmentation"]).tolist())
    boxes.append(int(s["num_boxes"]))
    ignored.append(np.mean(s["segmentation"] == synthetic.IGNORE_INDEX))
  assert with_car >= 5 and with_person >= 5
  assert len(set(boxes)) >= 4
  assert np.mean(ignored) < 0.02       # "ignore" is used sparingly
  needed = {0, 1, 2, 8, 10, 11, 13}  # road sidewalk building veg sky person car
  assert needed <= classes


def test_length_and_bad_arguments():
  val = SyntheticScenes("validation", 32, 64)
  assert len(val) == synthetic.VALIDATION_SIZE
  assert len(SyntheticScenes("train", 32, 64)) >= 2**31 - 1
  val[synthetic.VALIDATION_SIZE - 1]
  with pytest.raises(IndexError):
    val[synthetic.VALIDATION_SIZE]
  with pytest.raises(UserError):
    val[-1]
  with pytest.raises(UserError):
    SyntheticScenes("tset")
  for h, w in ((8, 64), (32, 15), (0, 64), (32.0, 64), ("32", 64)):
    with pytest.raises(UserError):
      SyntheticScenes("train", h, w)
  with pytest.raises(UserError):
    SyntheticScenes("train", 32, 64, seed=-1)


def test_batch_stacks_samples():
  ds = SyntheticScenes("validation", 32, 64)
  batch = ds.batch([2, 0, 5])
  assert set(batch) == set(KEYS)
  assert batch["image"].shape == (3, 32, 64, 3)
  assert batch["boxes"].shape == (3, synthetic.MAX_BOXES, 4)
  assert batch["num_boxes"].shape == (3,)
  _assert_same({k: v[1] for k, v in batch.items()}, ds[0])
  with pytest.raises(UserError):
    ds.batch([])


def test_palette_and_names():
  assert synthetic.CITYSCAPES_PALETTE.shape == (19, 3)
  assert synthetic.CITYSCAPES_PALETTE.dtype == np.uint8
  assert len(synthetic.TRAIN_ID_NAMES) == 19
  assert synthetic.TRAIN_ID_NAMES[ROAD] == "road"
  assert synthetic.TRAIN_ID_NAMES[SKY] == "sky"
  assert synthetic.TRAIN_ID_NAMES[CAR] == "car"


def test_labels_module_is_the_one_source():
  from tcr_jax.data import cityscapes
  from tcr_jax.data import labels
  assert synthetic.CITYSCAPES_PALETTE is labels.CITYSCAPES_PALETTE
  assert synthetic.TRAIN_ID_NAMES is labels.TRAIN_ID_NAMES
  assert cityscapes.LABEL_TO_TRAIN_ID is labels.LABEL_TO_TRAIN_ID
  assert cityscapes.IGNORE == synthetic.IGNORE_INDEX == labels.IGNORE_INDEX
  assert (synthetic.COCO_PERSON, synthetic.COCO_CAR) == (1, 3)
  for train_id, name in enumerate(labels.TRAIN_ID_NAMES):
    assert getattr(labels, name.upper().replace(" ", "_")) == train_id
  assert (labels.ROAD, labels.SKY, labels.PERSON, labels.CAR) == (
      ROAD, SKY, PERSON, CAR)


def test_contact_sheet(tmp_path):
  output = tmp_path / "new_dir" / "sheet.png"
  preview.write_contact_sheet(str(output), split="validation", num=2,
                              height=32, width=64)
  with Image.open(output) as image:
    image.verify()
  with Image.open(output) as image:
    assert image.format == "PNG"
    assert image.size[0] >= 300 and image.size[1] >= 100
  for num in (0, 65, 2.5):
    with pytest.raises(UserError):
      preview.write_contact_sheet(str(tmp_path / "bad.png"), num=num)
  with pytest.raises(UserError):
    preview.write_contact_sheet(str(tmp_path / "bad.png"), split="tset")
  assert not (tmp_path / "bad.png").exists()
