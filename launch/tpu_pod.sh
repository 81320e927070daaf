#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the TPU VM (or reuse it), copy this checkout to every
# worker and install it, mount the bucket on every worker, and run the same command on all workers
# (`--worker=all`). `jax.distributed.initialize` finds its peers by itself on Cloud TPU.
#
#   TPU_NAME=fdh-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 BUCKET=my-bucket RUN=cub-r50 \
#     launch/tpu_pod.sh --config=configs/cub.py --config.data.root=/gcs/data/CUB_200_2011
#
# Arguments are passed to `python -m fdh_jax.main`. The workdir is /gcs/fdh/$RUN on every worker:
# the bucket mounted with gcsfuse, so all processes share it (Orbax writes from every process,
# process 0 writes the metadata, metrics and results). fdh_jax does not take a gs:// workdir
# directly (see README, "Scaling out"). RUN defaults to a hash of the arguments, so rerunning
# the same line after a preemption resumes in the same workdir; set RUN to start another run.
#
# The mount options are what checkpointing through gcsfuse needs: Orbax (and fdh_jax's caches
# and exports) write into a temporary directory and rename it when complete, and gcsfuse
# refuses to rename a non-empty directory of a flat bucket unless --rename-dir-limit allows
# that many objects; --metadata-cache-ttl-secs=0 makes every worker see the others' files at
# once (checkpoint steps, the workdir record) instead of a stale listing.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (bucket name, no gs://)}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-32}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
RUN=${RUN:-fdh-$(printf '%s\0' "$@" | sha256sum | cut -c1-12)}
SPOT=${SPOT:-} # set SPOT=--spot for a preemptible slice
repo=$(cd "$(dirname "$0")/.." && pwd)
tpu=(gcloud compute tpus tpu-vm --zone="$ZONE")

if ! "${tpu[@]}" describe "$TPU_NAME" >/dev/null 2>&1; then
  echo "Creating $ACCELERATOR_TYPE TPU VM $TPU_NAME in $ZONE"
  # shellcheck disable=SC2086 # SPOT is an optional flag
  "${tpu[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
    --version="$RUNTIME_VERSION" $SPOT
fi

echo "Copying $repo to every worker"
tar -C "$repo" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ -czf /tmp/fdh_jax.tgz .
"${tpu[@]}" scp /tmp/fdh_jax.tgz "$TPU_NAME":/tmp/fdh_jax.tgz --worker=all
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="
  set -e
  mkdir -p ~/fdh_jax && tar -C ~/fdh_jax -xzf /tmp/fdh_jax.tgz
  python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ~/fdh_jax
  if ! mountpoint -q /gcs; then
    command -v gcsfuse >/dev/null || {
      echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' |
        sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
      curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - >/dev/null
      sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse
    }
    sudo mkdir -p /gcs && sudo chown \$USER /gcs
    gcsfuse --implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0 '$BUCKET' /gcs
  fi"

# Quote each argument for the remote shell.
args=$(printf ' %q' "$@")
echo "Running on all workers; workdir gs://$BUCKET/fdh/$RUN"
"${tpu[@]}" ssh "$TPU_NAME" --worker=all --command="
  cd ~/fdh_jax && python3 -m fdh_jax.main --workdir=/gcs/fdh/$RUN $args"
