#!/usr/bin/env bash
# One run on one GPU (or this machine's CPU): no cluster to join.
#
#   launch/single_gpu.sh experiments/nq.flags runs/nq [--model.dtype=bfloat16 ...]
#
# Run from the repository root; rerunning the same command resumes an interrupted run.
set -euo pipefail
FLAGFILE=${1:?usage: $0 FLAGFILE WORKDIR [extra flags]}
WORKDIR=${2:?usage: $0 FLAGFILE WORKDIR [extra flags]}
shift 2
# Let XLA take GPU memory as needed rather than 75% up front (kinder to shared cards).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m meta_mask.train --flagfile="$FLAGFILE" --workdir="$WORKDIR" --distributed=off "$@"
