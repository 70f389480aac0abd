#!/usr/bin/env bash
# Run an experiment on a Cloud TPU VM or every host of a TPU pod slice.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/depth_seg.py gs://bucket/workdirs/depth_seg
#   launch/tpu_vm.sh --dry-run ...   # print the gcloud command only
#
# The same command runs on every worker (--worker=all); jax discovers the
# slice and tcr_jax.main calls jax.distributed.initialize() because
# TPU_WORKER_HOSTNAMES lists several hosts. The workdir should be on GCS (or
# another filesystem all hosts share) so that checkpoints and resumption
# work across hosts and preemptions.
set -euo pipefail
dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
if [ $# -lt 4 ]; then
  echo "usage: $0 [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [extra flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${TCR_JAX_REPO:-$(git config --get remote.origin.url || echo REPOSITORY_URL)}
remote="set -e
  [ -d tcr_jax ] || git clone $repo tcr_jax
  cd tcr_jax && git pull --ff-only
  python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/python -m tcr_jax.main --config=$config --workdir=$workdir $*"
cmd=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "$remote")
if [ $dry_run = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
"${cmd[@]}"
