#!/usr/bin/env bash
# N processes of one experiment on this machine: one per GPU when there are
# at least N GPUs, CPU processes otherwise (a try-out of multi-host training).
#
#   launch/local.sh N CONFIG WORKDIR [extra flags...]
#   launch/local.sh --dry-run N CONFIG WORKDIR ...   # print the commands only
#
# Process i gets JAX_COORDINATOR_ADDRESS=localhost:PORT, JAX_NUM_PROCESSES=N
# and JAX_PROCESS_ID=i (PORT: $TCR_JAX_PORT, default 12355). CPU processes
# see $TCR_JAX_CPU_DEVICES devices each (default 1). Ctrl-C stops all of
# them; the script exits non-zero when any process fails. Running the same
# command again resumes from the workdir's checkpoints.
set -uo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 3 ]; then
  echo "usage: $0 [--dry-run] N CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
n=$1 config=$2 workdir=$3
shift 3
case $n in ''|*[!0-9]*) echo "$0: N must be a positive integer, got '$n'" >&2; exit 2;; esac
[ "$n" -ge 1 ] || { echo "$0: N must be at least 1" >&2; exit 2; }
port=${TCR_JAX_PORT:-12355}
python=${PYTHON:-python}
gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' )
cpu_devices=${TCR_JAX_CPU_DEVICES:-1}
# The environment and the command of process $1, as words.
process() {
  local i=$1
  local env=(JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i)
  if [ "$gpus" -ge "$n" ]; then
    env+=(CUDA_VISIBLE_DEVICES=$i)
  else
    env+=(JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices)
  fi
  words=(env "${env[@]}" "$python" -m tcr_jax.main "--config=$config" "--workdir=$workdir" "${extra[@]}")
}
extra=("$@")
if [ $dry_run = 1 ]; then
  for ((i = 0; i < n; i++)); do
    process $i
    printf '%q ' "${words[@]}"; echo
  done
  exit 0
fi
pids=()
stop() { kill -TERM "${pids[@]}" 2>/dev/null; }
trap 'stop; wait; exit 130' INT TERM
for ((i = 0; i < n; i++)); do
  process $i
  "${words[@]}" &
  pids+=($!)
done
# The first process to fail stops the others (bash >= 4.3 for wait -n).
status=0
for ((left = n; left > 0; left--)); do
  wait -n
  code=$?
  if [ $code -ne 0 ] && [ $status -eq 0 ]; then status=$code; stop; fi
done
exit $status
