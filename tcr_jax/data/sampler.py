"""Which samples each step reads: the one index rule of training.

A batch is a function of (seed, step) alone, so a run resumed at step k
reads exactly the batches of an uninterrupted run, on any number of
processes:

  global_indices(step, ...)  the sample indices of global batch `step`:
                             finite sets get a fresh permutation per epoch,
                             seeded by (seed, epoch); "infinite" sets (the
                             procedural synthetic scenes) are read in order
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


def process_share(indices, process_index: int, process_count: int) -> np.ndarray:
  """The contiguous share of `indices` that process `process_index` reads."""
  return np.array_split(np.asarray(indices), process_count)[process_index]
