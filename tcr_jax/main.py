"""Entry point: python -m tcr_jax.main --config=configs/depth_seg.py[:variant]."""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output directory (default: workdirs/<experiment>_<variant>)")


def _multi_process() -> bool:
  """True when started as one of several processes (SLURM, TPU pod, explicit)."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")
          or bool(env.get("JAX_COORDINATOR_ADDRESS")))


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax and clu are chatty at INFO
  import jax
  if _multi_process():
    jax.distributed.initialize()
  from tcr_jax import sweep
  from tcr_jax.errors import UserError
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", f"{config.experiment}_{config.variant}")
  try:
    sweep.train_and_evaluate(config, workdir)
  except UserError as e:
    print(f"tcr_jax.main: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
