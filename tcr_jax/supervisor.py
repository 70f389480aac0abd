"""Processes: JAX's set-up, the peers of a multi-process job, and the parent
that supervises each process's training (tcr_jax/main.py).

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
latest after the heartbeat timeout.

The parent never imports JAX: the child does (`start_jax`).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile

from tcr_jax.errors import UserError

CHILD = "TCR_JAX_TRAINING_CHILD"  # set in the child: train, do not supervise
ERROR_FILE = "TCR_JAX_ERROR_FILE"  # where the child leaves its one line


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{name} must be an integer, not {value!r}") from None


def distributed_args(coordinator_address: str | None, num_processes: int | None,
                     process_id: int | None) -> dict | None:
  """jax.distributed.initialize's arguments (the flags, else the JAX_*
  variables), or None for a single process."""
  explicit = {
      "coordinator_address": coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
      "num_processes": (num_processes if num_processes is not None
                        else _env_int("JAX_NUM_PROCESSES")),
      "process_id": (process_id if process_id is not None
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


def is_child() -> bool:
  """Whether this process is a supervised child (it trains)."""
  return bool(os.environ.get(CHILD))


def _die_with_parent() -> None:
  """In the child: Linux kills it when the supervising parent dies."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
  except (OSError, AttributeError):
    pass


def _process_name(args: dict) -> str:
  env = os.environ
  for value in (args.get("process_id"), env.get("SLURM_PROCID"),
                env.get("TPU_WORKER_ID"), env.get("CLOUD_TPU_TASK_ID")):
    if value not in (None, ""):
      return str(value)
  return f"{socket.gethostname()}-{os.getpid()}"


def supervise(args: dict, workdir: str) -> int:
  """Runs this command again as a child process (the training) with its
  stderr in a log file; returns its exit code after printing one line if
  it failed."""
  name = _process_name(args)
  local = "://" not in workdir
  log_dir = (os.path.join(workdir, "logs") if local
             else os.path.join(tempfile.gettempdir(), "tcr_jax_logs"))
  os.makedirs(log_dir, exist_ok=True)
  log_path = os.path.join(log_dir, f"process_{name}.log")
  error_path = log_path + ".error"
  if os.path.exists(error_path):
    os.remove(error_path)
  env = dict(os.environ, **{CHILD: "1", ERROR_FILE: error_path})
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


def start_jax(args: dict | None, heartbeat_timeout: int):
  """Imports and configures JAX in the process that trains: the persistent
  compilation cache, and with `args` the distributed runtime (gloo on CPU).
  Returns the jax module."""
  import jax  # here: the supervising parent never imports it
  use_compilation_cache(jax)
  if args is not None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  return jax


def use_compilation_cache(jax) -> None:
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


def peer_failure(jax, error: Exception) -> str:
  """The one line for a training process that stopped on an error that,
  with several processes, most likely means a peer died."""
  first = (str(error).strip().splitlines() or [""])[0][:300]
  return (f"tcr_jax.main: error: process {jax.process_index()} of "
          f"{jax.process_count()} stopped: {type(error).__name__}: {first} (did "
          "another process die? checkpoints of finished steps are kept; run "
          "the same command on every process to resume)")


def fail(message: str, code: int, multi_process: bool) -> None:
  """Prints the one line (and leaves it for the supervising parent), then
  exits; with several processes without jax's shutdown barrier, which
  would wait for a dead peer until the heartbeat timeout and then abort
  noisily."""
  print(message, file=sys.stderr)
  if os.environ.get(ERROR_FILE):
    with open(os.environ[ERROR_FILE], "w") as f:
      f.write(message)
  if multi_process:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)
