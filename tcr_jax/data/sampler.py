"""Which samples each step reads: the one index rule of training.

A batch is a function of (seed, step) alone, so a run resumed at step k
reads exactly the batches of an uninterrupted run, on any number of
processes:

  global_indices(step, ...)  the sample indices of global batch `step`:
                             finite sets get a fresh permutation per epoch,
                             seeded by (seed, epoch); "infinite" sets (the
                             procedural synthetic scenes) are read in order
  grouped_indices(step, ...) the same for datasets whose samples fall in
                             groups (canvases) a batch must not mix:
                             per epoch, the permutation's members of each
                             group in batches, the batches shuffled
  process_share(indices)     this process's contiguous share of a global
                             batch (np.array_split over the processes)
  stage_seed(seed, name)     a seed per named purpose ("data", a stage name)
"""
from __future__ import annotations

import zlib

import numpy as np

INFINITE = 10**7  # datasets at least this long are read in order


def stage_seed(seed: int, name: str) -> int:
  """A 31-bit seed derived from the config's seed and a name."""
  return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def global_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
  """Sample indices of global batch `step` of a dataset of n samples."""
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


def _grouped_epoch(batch_size: int, groups: np.ndarray, seed: int,
                   epoch: int) -> list[np.ndarray]:
  perm = np.random.default_rng([seed, epoch]).permutation(len(groups))
  batches = []
  for g in np.unique(groups):
    members = perm[groups[perm] == g]
    usable = len(members) - len(members) % batch_size  # drop the remainder
    batches += list(members[:usable].reshape(-1, batch_size))
  order = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
  return [batches[i] for i in order]


def grouped_indices(step: int, batch_size: int, groups, seed: int
                    ) -> np.ndarray:
  """Sample indices of global batch `step` when every batch must come from
  one group (e.g. the landscape or the portrait canvas): epoch e permutes
  the samples with (seed, e), cuts each group's members, in that order, into
  batches (a group's last partial batch is left out of the epoch) and
  shuffles the batches with (seed, e, 1). A pure function of the step."""
  groups = np.asarray(groups)
  counts = np.unique(groups, return_counts=True)[1]
  per_epoch = int(np.sum(counts // batch_size))
  if per_epoch == 0:
    raise ValueError(f"no group has {batch_size} samples for a batch")
  epoch, pos = divmod(int(step), per_epoch)
  return np.asarray(_grouped_epoch(batch_size, groups, seed, epoch)[pos],
                    np.int64)


def process_share(indices, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous share of `indices` that process `process_index` reads."""
  return np.array_split(np.asarray(indices), process_count)[process_index]
