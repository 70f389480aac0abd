"""COCO 2017 detection as a tfds dataset, built offline from the archives.

The builder reads the three archives a detection user downloads, straight
from the manual dir (nothing is extracted to disk):

  train2017.zip                  train2017/000000xxxxxx.jpg
  val2017.zip                    val2017/000000xxxxxx.jpg
  annotations_trainval2017.zip   annotations/instances_{train,val}2017.json

Splits: train (118287) and validation (val2017, 5000), every image with
its annotations (none filtered at build time). Stored per example:

  image_jpeg   the original JPEG bytes (decoded with PIL when read)
  image_id     COCO's image id
  height, width
  boxes        (n, 4) float32 x1 y1 x2 y2 in image pixels (COCO's xywh)
  category_id  (n,) int32, COCO's ids (1..90, the detector's 91 classes)
  is_crowd     (n,) bool
  area         (n,) float32, the annotation's (segment) area

After building, `write_index` stores a small per-split index next to the
dataset (sizes, annotated area, whether any box is larger than 1 px), so
that the readers filter and group images without reading them.
`CocoDetection(config, split)` reads a prepared split in the detection batch
layout (tcr_jax.data.detection), keeping the images the authors keep: with
annotations, not all of whose boxes are <= 1 px, and whose annotated area
(crowd annotations included) exceeds config.data.min_annotated_area.

TensorFlow and tfds are imported lazily.
"""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np

from tcr_jax.data import detection
from tcr_jax.errors import UserError

NAME = "coco_detection"
VERSION = "1.0.0"
DOWNLOAD_URL = "https://cocodataset.org/#download"
ZIPS = {"train": "train2017.zip", "validation": "val2017.zip",
        "annotations": "annotations_trainval2017.zip"}
FOLDERS = {"train": "train2017", "validation": "val2017"}
INDEX = "tcr_index_{split}.npz"

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download from {DOWNLOAD_URL}
  {ZIPS['train']}  (18 GB)
  {ZIPS['validation']}  (778 MB)
  {ZIPS['annotations']}  (241 MB)
and put the three zips, unextracted, in the manual dir
(`tcr-jax prepare-data --dataset coco --manual-dir DIR --data-dir D`).
"""


def check_manual_dir(manual_dir) -> dict[str, str]:
  """Paths of the three zips; UserError naming what is missing or broken."""
  manual_dir = os.fspath(manual_dir or "")
  paths = {k: os.path.join(manual_dir, z) for k, z in ZIPS.items()}
  missing = [ZIPS[k] for k, p in paths.items() if not os.path.isfile(p)]
  if missing:
    raise UserError(
        f"COCO: {', '.join(missing)} not found in manual dir "
        f"{manual_dir or '(none given)'!r}; download {', '.join(ZIPS.values())} "
        f"from {DOWNLOAD_URL} and put them there, unextracted")
  for k, p in paths.items():
    if not zipfile.is_zipfile(p):
      raise UserError(f"COCO: {p} is not a valid zip (incomplete download?); "
                      f"download {ZIPS[k]} again from {DOWNLOAD_URL}")
  return paths


def _annotations(paths, split: str) -> dict:
  member = f"annotations/instances_{FOLDERS[split]}.json"
  with zipfile.ZipFile(paths["annotations"]) as zf:
    names = set(zf.namelist())
    if member not in names:
      raise UserError(f"COCO: {member} not in {paths['annotations']}; is it "
                      f"{ZIPS['annotations']} from {DOWNLOAD_URL}?")
    return json.loads(zf.read(member))


def generate_examples(paths: dict[str, str], split: str):
  """Yields (key, example) for the split "train" or "validation"."""
  data = _annotations(paths, split)
  by_image: dict[int, list] = {}
  for a in data.get("annotations", []):
    by_image.setdefault(a["image_id"], []).append(a)
  with zipfile.ZipFile(paths[split]) as zf:
    members = {os.path.basename(n): n for n in zf.namelist()
               if n.lower().endswith((".jpg", ".jpeg"))}
    for info in sorted(data["images"], key=lambda i: i["id"]):
      name = info["file_name"]
      if name not in members:
        raise UserError(f"COCO: {name} ({split}) is not in {paths[split]}; the "
                        f"zip looks incomplete, download {ZIPS[split]} again "
                        f"from {DOWNLOAD_URL}")
      anns = by_image.get(info["id"], [])
      xywh = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
      yield name, {
          "image_jpeg": zf.read(members[name]),
          "image_id": int(info["id"]),
          "height": int(info["height"]), "width": int(info["width"]),
          "boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
          "category_id": np.array([a["category_id"] for a in anns], np.int32),
          "is_crowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
          "area": np.array([a.get("area", 0.0) for a in anns], np.float32),
      }


_BUILDER = None


def builder_class():
  """The tfds GeneratorBasedBuilder class (defined and registered once)."""
  global _BUILDER
  if _BUILDER is None:
    _BUILDER = _define_builder()
  return _BUILDER


def _define_builder():
  import tensorflow_datasets as tfds

  class CocoDetection2017(tfds.core.GeneratorBasedBuilder):
    """COCO 2017 train/val: JPEG bytes, boxes, category ids, crowd flags."""

    name = NAME
    VERSION = tfds.core.Version(globals()["VERSION"])
    RELEASE_NOTES = {"1.0.0": "Images, xyxy boxes, COCO ids, crowd, area."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = globals()["MANUAL_DOWNLOAD_INSTRUCTIONS"]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      from etils import epath
      return epath.Path(__file__)

    def _info(self):
      features = tfds.features.FeaturesDict({
          "image_jpeg": tfds.features.Tensor(shape=(), dtype=np.object_),
          "image_id": tfds.features.Scalar(dtype=np.int64),
          "height": tfds.features.Scalar(dtype=np.int32),
          "width": tfds.features.Scalar(dtype=np.int32),
          "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
          "category_id": tfds.features.Tensor(shape=(None,), dtype=np.int32),
          "is_crowd": tfds.features.Tensor(shape=(None,), dtype=np.bool_),
          "area": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      })
      return self.dataset_info_from_configs(
          features=features, homepage="https://cocodataset.org/",
          description=__doc__)

    def _split_generators(self, dl_manager):
      try:
        manual_dir = dl_manager.manual_dir
      except AssertionError:  # tfds: not given, missing or empty
        manual_dir = getattr(dl_manager, "_manual_dir", None)
      paths = check_manual_dir(manual_dir)
      return {split: self._generate_examples(paths, split) for split in FOLDERS}

    def _generate_examples(self, paths, split):
      yield from generate_examples(paths, split)

  return CocoDetection2017


def make_builder(data_dir: str | None, file_format: str = "array_record"):
  return builder_class()(data_dir=data_dir, file_format=file_format)


# --------------------------------------------------------------------------
# The per-split index and the reader.


def write_index(builder, split: str) -> str:
  """Reads a prepared split once and stores what filtering and grouping
  need; returns the index path."""
  source = builder.as_data_source(split=split)
  rows = {k: [] for k in ("height", "width", "image_id", "area", "boxes_ok",
                          "count")}
  for i in range(len(source)):
    ex = source[i]
    xyxy = np.asarray(ex["boxes"]).reshape(-1, 4)
    wh = xyxy[:, 2:] - xyxy[:, :2]
    rows["height"].append(int(ex["height"]))
    rows["width"].append(int(ex["width"]))
    rows["image_id"].append(int(ex["image_id"]))
    rows["area"].append(float(np.sum(ex["area"])))
    rows["boxes_ok"].append(bool(len(wh)) and not np.all(np.any(wh <= 1, axis=1)))
    rows["count"].append(len(wh))
  path = os.path.join(os.fspath(builder.data_dir), INDEX.format(split=split))
  np.savez(path, **{k: np.asarray(v) for k, v in rows.items()})
  return path


def open_split(data_dir: str, split: str):
  """(data source, index) of a prepared split, or a UserError saying what
  to run."""
  builder = make_builder(data_dir or None)
  if not builder.is_prepared():
    raise UserError(
        f"COCO is not prepared under {builder.data_dir!r}; run `tcr-jax "
        "prepare-data --dataset coco --manual-dir DIR --data-dir D` and set "
        "config.data.data_dir=D (or try the embedded data: "
        "--config=configs/detection_recon.py:synthetic)")
  path = os.path.join(os.fspath(builder.data_dir), INDEX.format(split=split))
  if not os.path.isfile(path):
    write_index(builder, split)
  with np.load(path) as f:
    index = {k: f[k] for k in f.files}
  return builder.as_data_source(split=split), index


def keep(index: dict, min_area: float) -> np.ndarray:
  """Indices of the images the authors train and validate on."""
  return np.flatnonzero((index["count"] > 0) & index["boxes_ok"]
                        & (index["area"] > min_area))


class CocoDetection:
  """A prepared COCO split, filtered, in the detection batch layout.

  `groups[i]` is the canvas of sample i (tcr_jax.data.detection.orientation);
  a batch's indices must share one.
  """

  def __init__(self, config, split: str, source=None, index=None):
    d = config.data
    if source is None:
      source, index = open_split(d.data_dir, split)
    self.source = source
    self.min_size, self.max_size = int(d.min_size), int(d.max_size)
    self.max_boxes = int(d.max_boxes)
    self.canvases = detection.canvases(self.min_size, self.max_size)
    self.keep = keep(index, float(d.min_annotated_area))
    if not len(self.keep):
      raise UserError(f"COCO {split}: no image passes the filter (annotated "
                      f"area > {d.min_annotated_area})")
    self.groups = detection.orientation(index["height"][self.keep],
                                        index["width"][self.keep])

  def __len__(self) -> int:
    return len(self.keep)

  def batch(self, indices) -> dict[str, np.ndarray]:
    from PIL import Image
    indices = [int(i) for i in indices]
    groups = {int(self.groups[i]) for i in indices}
    if len(groups) > 1:
      raise ValueError("a COCO batch mixes landscape and portrait canvases")
    canvas = self.canvases[groups.pop()] if indices else self.canvases[0]
    examples = []
    for i in indices:
      ex = self.source[int(self.keep[i])]
      with Image.open(io.BytesIO(ex["image_jpeg"])) as img:
        rgb = np.asarray(img.convert("RGB"))
      examples.append(detection.letterbox(
          rgb, ex["boxes"], ex["category_id"], ex["is_crowd"], canvas,
          self.max_boxes, self.min_size, self.max_size, int(ex["image_id"])))
    return detection.stack(examples)
