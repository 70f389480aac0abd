"""Entry point: python -m tcr_jax.main --config=configs/depth_seg.py[:variant].

Runs the experiment's sweep (tcr_jax/training/sweep.py) into --workdir. Several
processes (flags below, or JAX_* variables, SLURM, Cloud TPU) each run the
same command; tcr_jax/supervisor.py starts and watches their training.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tcr_jax import config_overrides, supervisor
from tcr_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "output directory (default: workdirs/<experiment>_<variant>)")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "processes in the job (default: $JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "this process's index (default: $JAX_PROCESS_ID)")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout", 60,
    "seconds without a peer's heartbeat before the job is declared broken")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and clu are chatty at INFO
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", f"{config.experiment}_{config.variant}")
  try:
    args = supervisor.distributed_args(_COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value)
  except UserError as e:
    print(f"tcr_jax.main: error: {e}", file=sys.stderr)
    sys.exit(2)
  if args is not None and not supervisor.is_child():
    sys.exit(supervisor.supervise(args, workdir))
  jax = supervisor.start_jax(args, _HEARTBEAT.value)
  from tcr_jax.training import sweep  # here: the supervising parent does not train
  try:
    sweep.train_and_evaluate(config, workdir)
  except UserError as e:
    supervisor.fail(f"tcr_jax.main: error: {e}", 2, args is not None)
  except Exception as e:  # pylint: disable=broad-except
    if args is None:
      raise
    # A peer that died shows up here as a failed collective.
    supervisor.fail(supervisor.peer_failure(jax, e), 3, True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=config_overrides.flags_parser("tcr_jax.main"))
