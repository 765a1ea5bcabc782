#!/usr/bin/env bash
# Single host (one machine, any number of local GPUs or a CPU): the plain command, nothing else.
#
#   launch/single_host.sh configs/imagenet.py:data_dir=/data/tfds /runs/imagenet [--config.FIELD=VALUE ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
exec python -m fct_jax.main --config="$config" --workdir="$workdir" --distributed=no "$@"
