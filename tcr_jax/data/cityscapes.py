"""Cityscapes (images, disparity, fine labels) as a tfds dataset.

The builder reads the three official zips straight from the manual dir
(nothing is extracted to disk):

  leftImg8bit_trainvaltest.zip  leftImg8bit/{split}/{city}/{city}_{seq}_{frame}_leftImg8bit.png
  gtFine_trainvaltest.zip       gtFine/{split}/{city}/{...}_gtFine_labelIds.png
  disparity_trainvaltest.zip    disparity/{split}/{city}/{...}_disparity.png

and matches members by (city, seq, frame). Splits: train (2975) and
validation (Cityscapes' val, 500); the test split has no public labels.

Stored features per example:

  image          uint8 (H, W, 3), the original PNG bytes (no re-encoding)
  segmentation   uint8 (H, W, 1), PNG: the 34 labelIds mapped to the 19
                 train ids, everything else 255 (cityscapesScripts' table)
  disparity_png  the original 16-bit disparity PNG bytes (p), unchanged
  file_name      "{city}_{seq}_{frame}"

Disparity is kept as the raw 16-bit PNG rather than float32 because
float32 at 1024x2048 is 8 MB an example (28 GB for train) against about
1 MB compressed, and tfds's numpy image decoder cannot read uint16 PNGs
without OpenCV. `decode_disparity` turns p into the float32 disparity in
pixels, (p - 1) / 256 where p > 0, and the valid mask p > 0; the input
pipeline (tcr_jax.data.pipeline) calls it.

TensorFlow and tfds are imported lazily: importing this module is cheap,
`builder_class()` creates (and registers) the tfds builder on first use.
"""
from __future__ import annotations

import io
import os
import re
import zipfile

import numpy as np

# cityscapesScripts' labelId -> trainId table, IGNORE (255) for the rest.
from tcr_jax.data.labels import IGNORE_INDEX as IGNORE, LABEL_TO_TRAIN_ID
from tcr_jax.errors import UserError

NAME = "cityscapes_depth_seg"
VERSION = "1.0.0"
DOWNLOAD_URL = "https://www.cityscapes-dataset.com/downloads/"
ZIPS = {"image": "leftImg8bit_trainvaltest.zip",
        "labels": "gtFine_trainvaltest.zip",
        "disparity": "disparity_trainvaltest.zip"}
# tfds split name -> Cityscapes folder name.
SPLITS = {"train": "train", "validation": "val"}

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
Download (after registering) from {DOWNLOAD_URL}
  {ZIPS['image']}  (11 GB)
  {ZIPS['labels']}  (241 MB)
  {ZIPS['disparity']}  (3.5 GB)
and put the three zips, unextracted, in the manual dir
(`tcr-jax prepare-data --dataset cityscapes --manual-dir DIR`).
"""

_MEMBER = {
    "image": re.compile(r"leftImg8bit/(\w+)/(\w+)/(\w+)_(\d+)_(\d+)_leftImg8bit\.png$"),
    "labels": re.compile(r"gtFine/(\w+)/(\w+)/(\w+)_(\d+)_(\d+)_gtFine_labelIds\.png$"),
    "disparity": re.compile(r"disparity/(\w+)/(\w+)/(\w+)_(\d+)_(\d+)_disparity\.png$"),
}


def _lookup_table() -> np.ndarray:
  table = np.full(256, IGNORE, np.uint8)
  for label_id, train_id in LABEL_TO_TRAIN_ID.items():
    table[label_id] = train_id
  return table


_TRAIN_ID_TABLE = _lookup_table()


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
  """uint8 labelIds -> uint8 train ids (0..18), 255 for ignored labels."""
  return _TRAIN_ID_TABLE[np.asarray(label_ids, np.uint8)]


def decode_disparity(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Raw 16-bit png values p -> (disparity px float32, valid bool)."""
  raw = np.asarray(raw)
  valid = raw > 0
  disparity = np.where(valid, (raw.astype(np.float32) - 1.0) / 256.0, 0.0)
  return disparity.astype(np.float32), valid


def read_disparity_png(data: bytes) -> np.ndarray:
  """16-bit PNG bytes -> (H, W) uint16."""
  from PIL import Image
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img, dtype=np.uint16)


def check_manual_dir(manual_dir) -> dict[str, str]:
  """Paths of the three zips; UserError naming what is missing or broken."""
  manual_dir = os.fspath(manual_dir or "")
  paths = {k: os.path.join(manual_dir, z) for k, z in ZIPS.items()}
  missing = [ZIPS[k] for k, p in paths.items() if not os.path.isfile(p)]
  if missing:
    raise UserError(
        f"Cityscapes: {', '.join(missing)} not found in manual dir "
        f"{manual_dir or '(none given)'!r}; download {', '.join(ZIPS.values())} "
        f"from {DOWNLOAD_URL} and put them there, unextracted")
  for k, p in paths.items():
    if not zipfile.is_zipfile(p):
      raise UserError(f"Cityscapes: {p} is not a valid zip (incomplete "
                      f"download?); download {ZIPS[k]} again from {DOWNLOAD_URL}")
  return paths


def index_members(zf: zipfile.ZipFile, kind: str, split: str) -> dict:
  """(city, seq, frame) -> member name for one split of one zip."""
  out = {}
  for name in zf.namelist():
    m = _MEMBER[kind].search(name)
    if m and m.group(1) == split:
      out[(m.group(3), m.group(4), m.group(5))] = name
  return out


def _png_mode(data: bytes) -> tuple[str, tuple[int, int]]:
  from PIL import Image
  with Image.open(io.BytesIO(data)) as img:
    return img.mode, img.size


def _rgb_png(data: bytes) -> bytes:
  """The PNG itself when RGB; otherwise converted (rare, e.g. palette)."""
  from PIL import Image
  mode, _ = _png_mode(data)
  if mode == "RGB":
    return data
  buf = io.BytesIO()
  with Image.open(io.BytesIO(data)) as img:
    img.convert("RGB").save(buf, format="PNG")
  return buf.getvalue()


def _label_ids(data: bytes) -> np.ndarray:
  from PIL import Image
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(img, dtype=np.uint8)


def generate_examples(paths: dict[str, str], split: str):
  """Yields (key, example) for a Cityscapes split ('train' or 'val')."""
  zips = {k: zipfile.ZipFile(p) for k, p in paths.items()}
  try:
    index = {k: index_members(zf, k, split) for k, zf in zips.items()}
    if not index["image"]:
      raise UserError(f"Cityscapes: no {split} images in {paths['image']}; "
                      f"is it {ZIPS['image']} from {DOWNLOAD_URL}?")
    for key in sorted(index["image"]):
      for kind in ("labels", "disparity"):
        if key not in index[kind]:
          raise UserError(
              f"Cityscapes: {'_'.join(key)} ({split}) has no partner in "
              f"{paths[kind]}; the zip looks incomplete, download "
              f"{ZIPS[kind]} again from {DOWNLOAD_URL}")
      yield _example(zips, index, key)
  finally:
    for zf in zips.values():
      zf.close()


def _example(zips, index, key):
  read = {k: zips[k].read(index[k][key]) for k in zips}
  image = _rgb_png(read["image"])
  labels = _label_ids(read["labels"])
  if labels.ndim != 2:
    raise UserError(f"Cityscapes: {index['labels'][key]} is not a "
                    "single-channel labelIds png")
  mode, size = _png_mode(read["disparity"])
  _, image_size = _png_mode(image)
  if not mode.startswith("I") or size != image_size:
    raise UserError(f"Cityscapes: {index['disparity'][key]} is not a 16-bit "
                    f"png of the image size {image_size}")
  name = "_".join(key)
  return name, {"image": image,
                "segmentation": to_train_ids(labels)[..., None],
                "disparity_png": read["disparity"],
                "file_name": name}


_BUILDER = None


def builder_class():
  """The tfds GeneratorBasedBuilder class (defined and registered once)."""
  global _BUILDER
  if _BUILDER is None:
    _BUILDER = _define_builder()
  return _BUILDER


def _define_builder():
  import tensorflow_datasets as tfds

  class CityscapesDepthSeg(tfds.core.GeneratorBasedBuilder):
    """Cityscapes fine: image, train-id segmentation, raw 16-bit disparity."""

    name = NAME
    VERSION = tfds.core.Version(globals()["VERSION"])
    RELEASE_NOTES = {"1.0.0": "Images, 19-class train ids, raw disparity png."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = globals()["MANUAL_DOWNLOAD_INSTRUCTIONS"]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      # tfds's default needs the `importlib_resources` backport for
      # builders in packages; this file is the code path.
      from etils import epath
      return epath.Path(__file__)

    def _info(self):
      features = tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "segmentation": tfds.features.Image(shape=(None, None, 1)),
          "disparity_png": tfds.features.Tensor(shape=(), dtype=np.object_),
          "file_name": tfds.features.Text(),
      })
      return self.dataset_info_from_configs(
          features=features, homepage="https://www.cityscapes-dataset.com/",
          description=__doc__)

    def _split_generators(self, dl_manager):
      try:
        manual_dir = dl_manager.manual_dir
      except AssertionError:  # tfds: not given, missing or empty
        manual_dir = getattr(dl_manager, "_manual_dir", None)
      paths = check_manual_dir(manual_dir)
      return {name: self._generate_examples(paths, folder)
              for name, folder in SPLITS.items()}

    def _generate_examples(self, paths, split):
      yield from generate_examples(paths, split)

  return CityscapesDepthSeg


def make_builder(data_dir: str, file_format: str = "array_record"):
  """A builder instance writing/reading under data_dir."""
  return builder_class()(data_dir=data_dir, file_format=file_format)
