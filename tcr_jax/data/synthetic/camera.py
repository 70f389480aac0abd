"""The camera and the random numbers every part of a scene draws from.

  * the Cityscapes-like stereo rig (`BASELINE_M`, `FOCAL_PER_WIDTH`), the
    nearest depth anything but the ground stands at, and `max_disparity`;
  * `_Random`, the scalar-fast wrapper of `np.random.Generator` that a
    scene's whole rendering draws from, in a fixed order;
  * `_Camera`, the pinhole projection (lateral, elevation, depth) -> (col,
    row, disparity), and `_random_camera`.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

BASELINE_M = 0.209
FOCAL_PER_WIDTH = 2262.0 / 2048.0
NEAR_DEPTH_M = 1.5
_HORIZON_RANGE = (0.36, 0.5)       # horizon row, as a fraction of the height
_CAM_HEIGHT_RANGE = (1.15, 1.5)    # metres above the street


def max_disparity(height: int, width: int) -> float:
  """Upper bound of `disparity` (px) at this image size.

  Everything but the ground is at least NEAR_DEPTH_M away, f * B / near; the
  ground's disparity peaks at the bottom row, B * (rows below horizon) / h.
  """
  ground = (BASELINE_M * height * (1 - _HORIZON_RANGE[0])
            / _CAM_HEIGHT_RANGE[0])
  return max(FOCAL_PER_WIDTH * width * BASELINE_M / NEAR_DEPTH_M, ground)


class _Random:
  """The subset of `np.random.Generator` used here, fast for scalars.

  Scalar draws come from a prefetched block of uniforms (one numpy call per
  scalar would dominate the rendering time); array draws go to the generator.
  """

  def __init__(self, rng: np.random.Generator):
    self.rng = rng
    self._block: list = []

  def random(self, size=None, dtype=np.float64):
    if size is not None:
      return self.rng.random(size, dtype=dtype)
    if not self._block:
      self._block = self.rng.random(256).tolist()
    return self._block.pop()

  def uniform(self, low: float = 0.0, high: float = 1.0, size=None):
    if size is None:
      return low + (high - low) * self.random()
    return (low + (high - low) * self.rng.random(size)).astype(np.float32)

  def integers(self, low: int, high: int) -> int:
    """An int in [low, high)."""
    return low + min(int(self.random() * (high - low)), high - low - 1)

  def choice(self, options: Sequence, p: Sequence[float] | None = None):
    if p is None:
      return options[self.integers(0, len(options))]
    x, acc = self.random(), 0.0
    for option, prob in zip(options, p):
      acc += prob
      if x < acc:
        return option
    return options[-1]


@dataclasses.dataclass(frozen=True)
class _Camera:
  """Pinhole camera `cam_height` metres above the street, looking along +Z."""
  height: int
  width: int
  focal: float
  cx: float
  horizon: float
  cam_height: float

  def col(self, lateral, depth):
    return self.cx + self.focal * lateral / depth

  def row(self, elevation, depth):
    return self.horizon + self.focal * (self.cam_height - elevation) / depth

  def disparity(self, depth):
    return self.focal * BASELINE_M / depth

  def min_object_depth(self) -> float:
    """Nearest depth at which a thing standing on the ground is in view."""
    bottom = self.focal * self.cam_height / (self.height - self.horizon)
    return max(NEAR_DEPTH_M, 1.02 * bottom)


def _random_camera(rng: _Random, height: int, width: int) -> _Camera:
  """Cityscapes-like focal length; random yaw, horizon and height."""
  return _Camera(height=height, width=width,
                 focal=FOCAL_PER_WIDTH * width,
                 cx=width * (0.5 + rng.uniform(-0.06, 0.06)),
                 horizon=height * rng.uniform(*_HORIZON_RANGE),
                 cam_height=rng.uniform(*_CAM_HEIGHT_RANGE))
