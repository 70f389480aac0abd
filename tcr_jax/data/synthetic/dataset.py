"""`SyntheticScenes`: the indexable dataset of rendered scenes, by split."""
from __future__ import annotations

import numbers
from typing import Sequence

import numpy as np

from tcr_jax.data.synthetic.scene import render_scene
from tcr_jax.errors import UserError

VALIDATION_SIZE = 500
TRAIN_SIZE = 2**31 - 1

_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
_MIN_SIZE = 16


def _check_int(name: str, value, minimum: int) -> int:
  if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
      or value < minimum):
    raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


class SyntheticScenes:
  """Indexable dataset of procedural street scenes, deterministic per index.

  Sample `i` of split `split` is rendered from
  `np.random.default_rng([seed, split_id, i])`, so the splits never share a
  scene. `len()` is VALIDATION_SIZE for "validation" and "test" (scenes that
  no choice of a config or of a stopping step sees: the :reproduction
  variant reports on them) and TRAIN_SIZE (in effect unbounded) for "train".
  """

  def __init__(self, split: str = "train", height: int = 128,
               width: int = 256, seed: int = 0):
    if split not in _SPLIT_IDS:
      raise UserError(f"unknown split {split!r}; expected one of "
                      f"{', '.join(_SPLIT_IDS)}")
    self.split = split
    self.height = _check_int("height", height, _MIN_SIZE)
    self.width = _check_int("width", width, _MIN_SIZE)
    self.seed = _check_int("seed", seed, 0)
    self._size = TRAIN_SIZE if split == "train" else VALIDATION_SIZE

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, i: int) -> dict:
    if isinstance(i, bool) or not isinstance(i, numbers.Integral):
      raise UserError(f"index must be an integer, got {i!r}")
    if i < 0:
      raise UserError(f"index must be >= 0, got {i}")
    if i >= self._size:
      raise IndexError(f"index {i} out of range for the {self.split} split "
                       f"of {self._size} scenes")
    rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(i)])
    return render_scene(rng, self.height, self.width)

  def batch(self, indices: Sequence[int]) -> dict:
    """Samples `indices` stacked along a leading batch axis."""
    samples = [self[i] for i in indices]
    if not samples:
      raise UserError("batch needs at least one index")
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
