"""Batches for the jitted steps: this process's share, as global arrays.

`Loader(config, mesh, dataset)` opens the train and validation splits
(`dataset(split)`: the base task's, tcr_jax/bases/; by default the scene
layout's `scene_dataset`), and the split config.eval.split that final figures are
reported on when it is another one ("test"), and hands out

  train_batch(stage, step)  global batch `step` of a stage (indices from
                            tcr_jax.data.sampler, augmented on the host)
  train_batches(stage, a, b)  the same for steps a..b-1, made ahead on a
                            background thread
  val_batches(count, split) the first `count` images of the validation (or
                            report) split in batches of eval.batch_size,
                            padded to full batches;
                            "weight" is 1 for real images, 0 for padding

Each process reads only its share of every batch (sampler.process_share) and
the shares are assembled into arrays sharded along the mesh's "data" axis.
`reads` counts the samples this process has loaded, per split.
"""
from __future__ import annotations

from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tcr_jax.data import augment, sampler, scene_dataset


class Loader:
  def __init__(self, config, mesh: Mesh | None = None,
               dataset: Callable[[str], object] | None = None):
    self.config = config
    if dataset is None:
      dataset = lambda split: scene_dataset(config, split)
    self.train_data = dataset("train")  # data errors first
    self.val_data = dataset("validation")
    self.report_split = config.eval.get("split", "validation")
    self.data = {"train": self.train_data, "validation": self.val_data}
    if self.report_split not in self.data:
      self.data[self.report_split] = dataset(self.report_split)
    self.report_data = self.data[self.report_split]
    self.sharding = None if mesh is None else NamedSharding(mesh, P("data"))
    self.reads = {split: 0 for split in self.data}

  def _share(self, indices) -> np.ndarray:
    return sampler.process_share(indices, jax.process_index(),
                                 jax.process_count())

  def _rows(self, size: int) -> tuple[int, int]:
    rows = self._share(np.arange(size))
    return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)

  def _read(self, split: str, indices) -> dict[str, np.ndarray]:
    indices = self._share(indices)
    self.reads[split] += len(indices)
    return self.data[split].batch(indices)

  def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self.sharding, v)
            for k, v in batch.items()}

  def train_batch(self, stage: str, step: int) -> dict[str, jax.Array]:
    return self.to_global(self.host_train_batch(stage, step))

  def train_batches(self, stage: str, start: int, stop: int,
                    ahead: int = 2) -> Iterator[dict[str, jax.Array]]:
    """train_batch(stage, s) for s in [start, stop), each host batch made
    `ahead` steps early on a background thread, so that reading, rendering
    (the synthetic scenes: about 50 ms for 8 at 64x128 on one core) and
    augmenting overlap the device's work on the step before. The batches
    are those of train_batch: they depend on (stage, step) only."""
    import collections
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1, thread_name_prefix="tcr-batches") as pool:
      pending = collections.deque()
      nxt = start
      while nxt < stop and len(pending) < ahead:
        pending.append(pool.submit(self.host_train_batch, stage, nxt))
        nxt += 1
      while pending:
        batch = pending.popleft().result()
        if nxt < stop:
          pending.append(pool.submit(self.host_train_batch, stage, nxt))
          nxt += 1
        yield self.to_global(batch)

  def host_train_batch(self, stage: str, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`, augmented (numpy)."""
    c = self.config
    b = c.train.batch_size
    groups = getattr(self.train_data, "groups", None)
    if groups is None:
      indices = sampler.global_indices(step, b, len(self.train_data),
                                       sampler.stage_seed(c.seed, "data"))
    else:  # canvases a batch must not mix (COCO's orientations)
      indices = sampler.grouped_indices(step, b, groups,
                                        sampler.stage_seed(c.seed, "data"))
    batch = self._read("train", indices)
    rng = np.random.default_rng([sampler.stage_seed(c.seed, stage), step, 0])
    return augment.augment_batch(batch, rng, c.data.hflip, c.data.color_jitter,
                                 rows=self._rows(b), global_size=b)

  def val_batches(self, count: int, split: str = "validation"
                  ) -> Iterator[dict[str, jax.Array]]:
    b = self.config.eval.batch_size
    groups = getattr(self.data[split], "groups", None)
    if groups is not None:  # one canvas per batch: group by group
      yield from self._grouped_val_batches(count, b, np.asarray(groups), split)
      return
    for start in range(0, count, b):
      idx = np.arange(start, start + b)
      batch = self._read(split, np.minimum(idx, count - 1))
      batch["weight"] = self._share((idx < count).astype(np.float32))
      yield self.to_global(batch)

  def _grouped_val_batches(self, count: int, b: int, groups: np.ndarray,
                           split: str):
    """The first `count` images, batched within their groups (in order),
    each group's last batch padded with its last image (weight 0)."""
    for g in np.unique(groups[:count]):
      members = np.flatnonzero(groups[:count] == g)
      for start in range(0, len(members), b):
        pos = np.arange(start, start + b)
        batch = self._read(split,
                           members[np.minimum(pos, len(members) - 1)])
        batch["weight"] = self._share((pos < len(members)).astype(np.float32))
        yield self.to_global(batch)
