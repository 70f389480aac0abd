"""Input pipelines over the prepared tfds Cityscapes set (ArrayRecord).

Two ways in, both reading examples by *global sample index* so that a run
resumed at step k sees exactly the batches of an uninterrupted run:

- `TfdsBatches(config, split)`: random access, `batch(indices)` returns
  exactly those examples in the training layout of tcr_jax.data (what
  Trainer.host_batch calls; the trainer augments on the host).
- `make_train_iterator(config, start_step, process_index, process_count)`:
  a tf.data stream for throughput. Step s -> the global indices of step s
  (`global_indices`, the rule of Trainer.train_batch) -> this process's
  share -> read through the same data source (parallel numpy_function) ->
  flips and colour jitter as stateless TF ops seeded by (seed, step) ->
  prefetch. The random numbers are drawn for the whole global batch and
  sliced, so a sample's augmentation does not depend on the process count
  and the per-process shards are disjoint pieces of one global batch.

Stored disparity is the raw 16-bit PNG (see tcr_jax.data.cityscapes); it is
converted here: (p - 1) / 256 px where p > 0. If config.data.height/width
differ from the stored size, images are resized bilinearly (PIL,
antialiased when shrinking), labels/disparity/valid by nearest neighbour,
and disparity is scaled by new_width / stored_width (it is in pixels).

TensorFlow is imported lazily (and told not to touch the GPUs) so that
importing this module stays cheap and TF-free.
"""
from __future__ import annotations

import zlib

import numpy as np

from tcr_jax.data import cityscapes
from tcr_jax.errors import UserError

INFINITE = 10**7  # Trainer.train_batch: datasets at least this big are read in order


def hidden_gpu_tf():
  """tensorflow, with every GPU hidden from it (JAX owns the accelerators)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # devices already initialised: nothing more to do
    pass
  return tf


def stage_seed(seed: int, name: str) -> int:
  """Same derivation as tcr_jax.train._stage_seed."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def global_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
  """Sample indices of global batch `step` (Trainer.train_batch's rule).

  seed is the data seed (stage_seed(config.seed, "data")). Finite sets: a
  fresh permutation of range(n) per epoch, seeded by (seed, epoch).
  """
  start = int(step) * batch_size
  if n >= INFINITE:
    return np.arange(start, start + batch_size) % n
  out, perms = [], {}
  for g in range(start, start + batch_size):
    epoch, pos = divmod(g, n)
    if epoch not in perms:
      perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
    out.append(perms[epoch][pos])
  return np.array(out, np.int64)


def process_share(indices, process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous share of a global batch (Trainer.host_batch)."""
  return np.array_split(np.asarray(indices), process_count)[process_index]


def open_source(data_dir: str, split: str):
  """The ArrayRecord data source of a prepared split, or a UserError."""
  builder = cityscapes.make_builder(data_dir or None)
  if not builder.is_prepared():
    raise UserError(
        f"Cityscapes is not prepared under {builder.data_dir!r}; run "
        "`tcr-jax prepare-data --dataset cityscapes --manual-dir DIR "
        "--data-dir D` and set config.data.data_dir=D (or try the embedded "
        "data: --config=configs/<experiment>.py:synthetic)")
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # e.g. prepared as tfrecord
    raise UserError(f"cannot open Cityscapes {split!r} under "
                    f"{builder.data_dir!r} for random access ({e}); prepare "
                    "it again with `tcr-jax prepare-data` (array_record)") from e


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
  h, w = array.shape[:2]
  rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
  cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
  return array[rows[:, None], cols[None, :]]


def _bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((width, height),
                                                  Image.Resampling.BILINEAR))


def decode_example(ex: dict, height: int, width: int) -> dict:
  """One stored example -> uint8 image, float32 disparity, bool valid,
  uint8 train ids (255 ignore), all at (height, width)."""
  image = np.asarray(ex["image"], np.uint8)
  labels = np.asarray(ex["segmentation"], np.uint8)[..., 0]
  raw = cityscapes.read_disparity_png(ex["disparity_png"])
  disparity, valid = cityscapes.decode_disparity(raw)
  h, w = image.shape[:2]
  if (h, w) != (height, width):
    image = _bilinear(image, height, width)
    labels = _nearest(labels, height, width)
    valid = _nearest(valid, height, width)
    disparity = _nearest(disparity, height, width) * np.float32(width / w)
  return {"image": image, "disparity": disparity, "valid": valid,
          "labels": labels}


class TfdsBatches:
  """Random-access batches of a prepared split in the training layout."""

  def __init__(self, config, split: str, source=None):
    self.height = int(config.data.height)
    self.width = int(config.data.width)
    self.ignore_index = int(config.task.ignore_index)
    self.source = source if source is not None else open_source(
        config.data.data_dir, split)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices) -> dict[str, np.ndarray]:
    """uint8 images and int32 labels (ignore_index applied) of `indices`."""
    exs = [decode_example(self.source[int(i)], self.height, self.width)
           for i in np.asarray(indices).reshape(-1)]
    if not exs:
      return self._empty()
    out = {k: np.stack([e[k] for e in exs]) for k in exs[0]}
    labels = out["labels"].astype(np.int32)
    labels[labels == cityscapes.IGNORE] = self.ignore_index
    out["labels"] = labels
    return out

  def batch(self, indices) -> dict[str, np.ndarray]:
    out = self.read(indices)
    out["image"] = out["image"].astype(np.float32) / np.float32(255.0)
    return out

  def _empty(self) -> dict[str, np.ndarray]:
    h, w = self.height, self.width
    return {"image": np.zeros((0, h, w, 3), np.uint8),
            "disparity": np.zeros((0, h, w), np.float32),
            "valid": np.zeros((0, h, w), bool),
            "labels": np.zeros((0, h, w), np.int32)}


def _jitter(tf, image, factors):
  """torchvision-style ColorJitter (brightness, contrast, saturation) on a
  batch (B, H, W, 3) in [0, 1], factors (B, 3); as tcr_jax.data.augment."""
  luma = tf.constant([0.299, 0.587, 0.114], tf.float32)

  def grey(x):
    return tf.reduce_sum(x * luma, axis=-1, keepdims=True)

  f = factors[:, None, None, :]
  image = tf.clip_by_value(image * f[..., 0:1], 0.0, 1.0)
  mean = tf.reduce_mean(grey(image), axis=[1, 2, 3], keepdims=True)
  image = tf.clip_by_value((image - mean) * f[..., 1:2] + mean, 0.0, 1.0)
  g = grey(image)
  return tf.clip_by_value((image - g) * f[..., 2:3] + g, 0.0, 1.0)


def augment(tf, batch: dict, step, seed: int, rows: tuple[int, int],
            global_batch: int, hflip: bool, jitter: float) -> dict:
  """Flips + jitter for rows [lo, hi) of the global batch of `step`."""
  lo, hi = rows
  key = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])
  u = tf.random.stateless_uniform((global_batch, 4), seed=key)[lo:hi]
  out = dict(batch)
  image = tf.cast(batch["image"], tf.float32) / 255.0
  if jitter > 0:
    image = _jitter(tf, image, 1.0 - jitter + 2.0 * jitter * u[:, 1:])
  flip = u[:, 0] < 0.5 if hflip else tf.zeros_like(u[:, 0], tf.bool)
  out["image"] = image
  for k in ("image", "disparity", "valid", "labels"):
    x = out[k]
    mask = tf.reshape(flip, [-1] + [1] * (len(x.shape) - 1))
    out[k] = tf.where(mask, tf.reverse(x, axis=[2]), x)
  return out


def make_train_iterator(config, start_step: int, process_index: int = 0,
                        process_count: int = 1, *, batches=None,
                        aug_seed: int | None = None, num_steps: int | None = None,
                        as_numpy: bool = True):
  """This process's share of the augmented training batches from start_step.

  Element i is step start_step + i: a dict in the training layout with
  batch_size / process_count rows (np.array_split sizes). `batches` is a
  TfdsBatches (default: the train split of config.data.data_dir);
  aug_seed defaults to stage_seed(config.seed, "augment").
  """
  tf = hidden_gpu_tf()
  batches = batches if batches is not None else TfdsBatches(config, "train")
  b = int(config.train.batch_size)
  n = len(batches)
  data_seed = stage_seed(config.seed, "data")
  aug_seed = stage_seed(config.seed, "augment") if aug_seed is None else aug_seed
  rows = process_share(np.arange(b), process_index, process_count)
  lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
  h, w = batches.height, batches.width

  def indices(step):
    return process_share(global_indices(int(step), b, n, data_seed),
                         process_index, process_count)

  def read(idx):
    out = batches.read(idx)
    return out["image"], out["disparity"], out["valid"], out["labels"]

  def to_dict(image, disparity, valid, labels):
    shapes = {"image": (hi - lo, h, w, 3), "disparity": (hi - lo, h, w),
              "valid": (hi - lo, h, w), "labels": (hi - lo, h, w)}
    out = dict(image=image, disparity=disparity, valid=valid, labels=labels)
    for k, v in out.items():
      v.set_shape(shapes[k])
    return out

  stop = start_step + (num_steps if num_steps is not None else 2**62)
  ds = tf.data.Dataset.range(start_step, stop)
  ds = ds.map(lambda s: (s, tf.numpy_function(indices, [s], tf.int64)))
  ds = ds.map(lambda s, i: (s, to_dict(*tf.numpy_function(
      read, [i], [tf.uint8, tf.float32, tf.bool, tf.int32]))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.map(lambda s, x: augment(tf, x, s, aug_seed, (lo, hi), b,
                                   bool(config.data.hflip),
                                   float(config.data.color_jitter)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator() if as_numpy else ds
