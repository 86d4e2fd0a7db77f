#!/usr/bin/env bash
# One run on a TPU VM pod slice: the same command on every worker; each worker is one jax
# process (jax.distributed detects the pod from the TPU metadata with --distributed=on).
#
#   TPU=my-v4-32 ZONE=us-central2-b launch/tpu_pod.sh experiments/nq.flags /mnt/shared/runs/nq
#
# The workdir must be one folder every worker sees (Filestore/NFS mount or gcsfuse): orbax
# writes each host's shards of a checkpoint there, and process 0 writes logs and results.
# The repository must already be at ~/meta_mask on every worker (e.g. `--worker=all --command
# "git clone ..."`), with its dependencies and jax[tpu] installed.
set -euo pipefail
FLAGFILE=${1:?usage: TPU=... ZONE=... $0 FLAGFILE WORKDIR [extra flags]}
WORKDIR=${2:?usage: TPU=... ZONE=... $0 FLAGFILE WORKDIR [extra flags]}
shift 2
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE to its zone}"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/meta_mask && python -m meta_mask.train --flagfile=$FLAGFILE --workdir=$WORKDIR \
   --distributed=on $*"
