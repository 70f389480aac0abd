"""`tcr-jax prepare-data`: build the tfds datasets the configs read.

  cityscapes  tcr_jax.data.cityscapes from the three official zips in the
              manual dir, written as ArrayRecord (random access by index)
  coco        tcr_jax.data.coco from the three 2017 archives in the manual
              dir (train2017.zip, val2017.zip, annotations_trainval2017.zip),
              offline, written as ArrayRecord, plus its per-split index

Returns a summary dict (dataset, data_dir, examples per split); every
failure the user can fix is a one-line UserError.
"""
from __future__ import annotations

import os

from tcr_jax.data import cityscapes, coco
from tcr_jax.data.pipeline import hidden_gpu_tf
from tcr_jax.errors import UserError

DATASETS = ("cityscapes", "coco")
COCO_URL = "https://cocodataset.org/#download"


def prepare_data(dataset: str, manual_dir: str | None, data_dir: str) -> dict:
  """Builds `dataset` under data_dir; see the module docstring."""
  if dataset not in DATASETS:
    raise UserError(f"unknown dataset {dataset!r}; expected one of "
                    f"{', '.join(DATASETS)}")
  if not data_dir:
    raise UserError("prepare-data needs --data-dir (where the tfds files go)")
  hidden_gpu_tf()
  os.makedirs(data_dir, exist_ok=True)
  if dataset == "cityscapes":
    builder = _cityscapes_builder(manual_dir, data_dir)
  else:
    builder = _coco_builder(manual_dir, data_dir)
  _build(builder, dataset, manual_dir)
  if dataset == "coco":
    for split in coco.FOLDERS:
      coco.write_index(builder, split)
  return {"dataset": dataset, "data_dir": os.fspath(builder.data_dir),
          "splits": {name: int(info.num_examples)
                     for name, info in builder.info.splits.items()}}


def _cityscapes_builder(manual_dir, data_dir):
  cityscapes.check_manual_dir(manual_dir)  # clear message before tfds starts
  return cityscapes.make_builder(data_dir)


def _coco_builder(manual_dir, data_dir):
  coco.check_manual_dir(manual_dir)  # one line naming what is missing
  return coco.make_builder(data_dir)


def _build(builder, dataset: str, manual_dir) -> None:
  import tensorflow_datasets as tfds
  config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  try:
    builder.download_and_prepare(download_config=config)
  except UserError:
    raise
  except Exception as e:  # network, disk, corrupt archives
    hint = (f"download the 2017 archives from {COCO_URL} into the manual dir"
            if dataset == "coco" else
            "check the three Cityscapes zips in the manual dir")
    detail = " ".join(str(e).split())[:300]
    raise UserError(f"preparing {dataset} under {builder.data_dir} failed: "
                    f"{type(e).__name__}: {detail}; {hint}") from e
