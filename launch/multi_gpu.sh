#!/usr/bin/env bash
# Run an experiment on one host with several GPUs: a single process drives
# all of them (jit over a mesh of every local device, batch sharded).
#
#   launch/multi_gpu.sh configs/depth_seg.py workdirs/depth_seg [extra flags...]
#   launch/multi_gpu.sh --dry-run ...   # print the command only
#
# (launch/local.sh N ... starts one process per GPU instead.)
# Install the CUDA build of jax first: pip install -e . "jax[cuda13]".
# TensorFlow (data pipelines only) is kept off the GPUs.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 2 ]; then
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
cmd=(${PYTHON:-python} -m tcr_jax.main --config="$config" --workdir="$workdir" "$@")
if [ $dry_run = 1 ]; then
  echo "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION ${cmd[*]}"
  exit 0
fi
exec "${cmd[@]}"
