"""Entry point: python -m tcr_jax.main --config=configs/depth_seg.py[:variant].

On several hosts every process runs the same command. On TPU pod slices and
SLURM, jax finds its peers itself; elsewhere give the coordinator, the
process count and this process's index, as flags or as the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
(launch/local.sh does this for N processes on one machine). CPU processes
then talk through gloo.

With several processes, each runs the training in a child process whose
stderr (jax's and XLA's native logs) goes to WORKDIR/logs/process_I.log;
the terminal gets the progress (stdout) and, when a process stops, one line
saying why. A process whose peer dies stops within seconds (the next
collective fails, or the coordinator's loss is noticed at once), at the
latest after --heartbeat_timeout seconds.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

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


def _env_int(name: str) -> int | None:
  from tcr_jax.errors import UserError
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name} must be an integer, not {value!r}") from None


def _die_with_parent() -> None:
  """In the child: Linux kills it when the supervising parent dies."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
  except (OSError, AttributeError):
    pass


def distributed_args() -> dict | None:
  """jax.distributed.initialize's arguments, or None for a single process."""
  from tcr_jax.errors import UserError
  explicit = {
      "coordinator_address": _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"),
      "num_processes": (_NUM_PROCESSES.value if _NUM_PROCESSES.value is not None
                        else _env_int("JAX_NUM_PROCESSES")),
      "process_id": (_PROCESS_ID.value if _PROCESS_ID.value is not None
                     else _env_int("JAX_PROCESS_ID")),
  }
  given = {k: v for k, v in explicit.items() if v is not None}
  env = os.environ
  cluster = (int(env.get("SLURM_NTASKS", "1")) > 1
             or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
  if given and not cluster and len(given) < 3:
    missing = sorted(set(explicit) - set(given))
    raise UserError("several processes need all of --coordinator_address, "
                    "--num_processes and --process_id (or JAX_* variables); "
                    f"missing: {', '.join(missing)}")
  if given or cluster:
    return given  # a cluster fills in the rest (SLURM, Cloud TPU)
  return None


_CHILD = "TCR_JAX_TRAINING_CHILD"  # set in the child: train, do not supervise
_ERROR_FILE = "TCR_JAX_ERROR_FILE"


def _process_name(args: dict) -> str:
  env = os.environ
  for value in (args.get("process_id"), env.get("SLURM_PROCID"),
                env.get("TPU_WORKER_ID"), env.get("CLOUD_TPU_TASK_ID")):
    if value not in (None, ""):
      return str(value)
  import socket
  return f"{socket.gethostname()}-{os.getpid()}"


def _supervise(args: dict, workdir: str) -> int:
  """Runs the training in a child process with its stderr in a log file;
  returns its exit code after printing one line if it failed."""
  import signal
  import subprocess
  import tempfile
  name = _process_name(args)
  local = "://" not in workdir
  log_dir = (os.path.join(workdir, "logs") if local
             else os.path.join(tempfile.gettempdir(), "tcr_jax_logs"))
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, f"process_{name}.log")
  error_path = log_path + ".error"
  if os.path.exists(error_path):
    os.remove(error_path)
  env = dict(os.environ, **{_CHILD: "1", _ERROR_FILE: error_path})
  with open(log_path, "a") as log:
    child = subprocess.Popen([sys.executable, "-m", "tcr_jax.main", *sys.argv[1:]],
                             env=env, stderr=log, preexec_fn=_die_with_parent)
    forward = lambda signum, frame: child.send_signal(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
      signal.signal(sig, forward)
    code = child.wait()
  if code == 0:
    return 0
  if os.path.exists(error_path):
    with open(error_path) as f:
      message = f.read().strip()
  else:
    how = (f"was killed by signal {-code}" if code < 0
           else f"stopped with exit code {code}")
    message = (f"tcr_jax.main: error: process {name} {how}, most likely "
               "because another process of the job died; finished steps are "
               "checkpointed: run the same command on every process to resume")
  print(f"{message} (log: {log_path})", file=sys.stderr)
  return code if code > 0 else 128 - code


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # orbax and clu are chatty at INFO
  from tcr_jax.errors import UserError
  try:
    args = distributed_args()
  except UserError as e:
    print(f"tcr_jax.main: error: {e}", file=sys.stderr)
    sys.exit(2)
  if args is not None and not os.environ.get(_CHILD):
    config = _CONFIG.value
    sys.exit(_supervise(args, _WORKDIR.value or os.path.join(
        "workdirs", f"{config.experiment}_{config.variant}")))
  import jax
  _use_compilation_cache(jax)
  if args is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args,
                               heartbeat_timeout_seconds=_HEARTBEAT.value)
  from tcr_jax import sweep
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", f"{config.experiment}_{config.variant}")
  try:
    sweep.train_and_evaluate(config, workdir)
  except UserError as e:
    _fail(f"tcr_jax.main: error: {e}", 2, args is not None)
  except Exception as e:  # pylint: disable=broad-except
    if args is None:
      raise
    # A peer that died shows up here as a failed collective; say so in one
    # line and leave without jax's shutdown barrier, which would wait for the
    # dead peer until the heartbeat timeout and then abort noisily.
    first = (str(e).strip().splitlines() or [""])[0][:300]
    _fail(f"tcr_jax.main: error: process {jax.process_index()} of "
          f"{jax.process_count()} stopped: {type(e).__name__}: {first} (did "
          "another process die? checkpoints of finished steps are kept; run "
          "the same command on every process to resume)", 3, True)


def _use_compilation_cache(jax) -> None:
  """JAX's persistent compilation cache, so that a second run (a resumed or
  repeated sweep, `make demo` again) loads its programs instead of compiling
  them: $JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/tcr_jax/jax
  ($XDG_CACHE_HOME respected); TCR_JAX_COMPILATION_CACHE=0 turns it off."""
  if os.environ.get("TCR_JAX_COMPILATION_CACHE", "1") == "0":
    return
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    jax.config.update("jax_compilation_cache_dir",
                      os.path.join(base, "tcr_jax", "jax"))


def _fail(message: str, code: int, multi_process: bool) -> None:
  print(message, file=sys.stderr)
  if os.environ.get(_ERROR_FILE):  # for the supervising parent
    with open(os.environ[_ERROR_FILE], "w") as f:
      f.write(message)
  if multi_process:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  from tcr_jax import config_overrides
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=config_overrides.flags_parser("tcr_jax.main"))
