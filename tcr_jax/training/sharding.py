"""The device mesh: one "data" axis over every device of every process.

Batches are sharded along "data" (NamedSharding(mesh, P("data"))); params
and optimizer state are replicated (P()). Pure data parallelism is what the
paper's models need: the largest, DeepLabV3-R50, fits on any accelerator.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh


def data_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))
