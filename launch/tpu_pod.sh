#!/usr/bin/env bash
# TPU pod VM: create it, install fct_jax on every worker, run the same command on all workers.
#
#   export TPU_NAME=fct-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 VERSION=tpu-ubuntu2204-base
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install                      # copies this checkout to every worker and pip-installs it
#   launch/tpu_pod.sh run configs/imagenet.py:data_dir=gs://BUCKET/tfds gs://BUCKET/runs/imagenet
#   launch/tpu_pod.sh delete
#
# Data and workdir live on GCS (gs://...) so every worker sees the same files; each worker reads only its own
# slice of every batch. jax.distributed.initialize() needs no arguments on a pod: fct_jax calls it when
# TPU_WORKER_HOSTNAMES lists several hosts (--distributed=auto), and a preemption reaches all workers at the
# same step (exit status 143; rerun `run` to resume).
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-32}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO_DIR=${REPO_DIR:-fct_jax}

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
      --version="$VERSION"
    ;;
  install)
    root=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
    tar -C "$root" --exclude=.git --exclude='.venv*' --exclude='.ci-venv' -czf /tmp/fct_jax_src.tgz .
    gcloud compute tpus tpu-vm scp /tmp/fct_jax_src.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" --worker=all
    ssh_all "mkdir -p $REPO_DIR && tar -xzf /tmp/fct_jax_src.tgz -C $REPO_DIR && \
      python3 -m pip install -q 'jax[tpu]' && python3 -m pip install -q -e '${REPO_DIR}[gcs]'"
    ;;
  run)
    if [[ $# -lt 3 ]]; then
      echo "usage: $0 run CONFIG[:ARGS] gs://WORKDIR [--config.FIELD=VALUE ...]" >&2
      exit 2
    fi
    config=$2 workdir=$3
    shift 3
    extra=""
    for a in "$@"; do extra+=" $(printf '%q' "$a")"; done
    ssh_all "cd $REPO_DIR && python3 -m fct_jax.main --config=$(printf '%q' "$config") \
      --workdir=$(printf '%q' "$workdir") --distributed=yes$extra"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    echo "usage: $0 create|install|run|delete" >&2
    exit 2
    ;;
esac
