#!/usr/bin/env bash
# usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR COMMAND [ARGS...]
#
# Runs `art-jax COMMAND ARGS` on every worker of the Cloud TPU VM slice NAME at once (one JAX
# process per host; jax.distributed finds the slice's workers itself). Creates the slice if it
# does not exist, else reuses it; copies this checkout's committed code to every worker and
# installs it there. Examples (the workdir in a bucket, which every worker reads and writes):
#   launch/tpu_vm.sh art-v4-32 us-central2-b v4-32 train --config=configs/art_nq_base.py --workdir=gs://b/runs/nq
#   launch/tpu_vm.sh art-v4-8 us-central2-b v4-8 refresh --workdir=gs://b/runs/nq   # refresher on its own slice
#
# Environment: GCP_PROJECT (default: gcloud's), TPU_VERSION (the TPU software version,
# default tpu-ubuntu2204-base), TPU_SPOT=1 for a spot slice, GCS_BUCKET=name to also mount
# gs://name at /gcs on every worker for plain paths (gcsfuse; stores and checkpoints on plain
# paths are published by folder renames, atomic only on a hierarchical-namespace bucket),
# DRY_RUN=1 to print the gcloud commands only. Ctrl-C stops the command on every worker.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: launch/tpu_vm.sh NAME ZONE ACCELERATOR COMMAND [ARGS...]" >&2
  exit 2
fi
name=$1 zone=$2 accelerator=$3
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
where=(--zone="$zone" ${GCP_PROJECT:+--project="$GCP_PROJECT"})

run() {
  if [[ -n ${DRY_RUN:-} ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$1"
}

if [[ -n ${DRY_RUN:-} ]] || ! gcloud compute tpus tpu-vm describe "$name" "${where[@]}" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$name" "${where[@]}" --accelerator-type="$accelerator" \
    --version="${TPU_VERSION:-tpu-ubuntu2204-base}" ${TPU_SPOT:+--spot}
fi

# the committed code (what a colleague could check out), the same on every worker
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
archive=$scratch/art_jax.tar.gz
git -C "$root" archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name":art_jax.tar.gz "${where[@]}" --worker=all
on_all_workers 'set -e; rm -rf ~/art_jax && mkdir -p ~/art_jax && tar -xzf ~/art_jax.tar.gz -C ~/art_jax
  cd ~/art_jax && { [ -d ~/art_jax_venv ] || python3 -m venv ~/art_jax_venv; } && . ~/art_jax_venv/bin/activate
  pip install -q -e . "jax[tpu]==0.10.2"'

if [[ -n ${GCS_BUCKET:-} ]]; then
  # checkpoints, indexes and metrics under /gcs/... are then files in gs://$GCS_BUCKET on every worker
  on_all_workers "set -e; command -v gcsfuse >/dev/null || { export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s)
    echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
    curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add -
    sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }
    sudo mkdir -p /gcs && sudo chown \$USER /gcs
    mountpoint -q /gcs || gcsfuse --implicit-dirs $GCS_BUCKET /gcs"
fi

# interrupted here: stop the job on every worker, or its processes keep holding the TPUs
trap 'on_all_workers "pkill -f art_jax_venv/bin/art-jax || true"; exit 130' INT TERM
# ART_JAX_DISTRIBUTED=auto: jax.distributed.initialize() reads the workers from the TPU metadata
on_all_workers "cd ~/art_jax && . ~/art_jax_venv/bin/activate && ART_JAX_DISTRIBUTED=auto art-jax $(printf '%q ' "$@")"
