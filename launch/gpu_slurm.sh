#!/usr/bin/env bash
# Multi-host GPU with SLURM: one process per GPU, all processes form one mesh over every GPU.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/imagenet.py:data_dir=/shared/tfds /shared/runs/imagenet
#
# jax.distributed.initialize() reads the coordinator address (the first node of SLURM_JOB_NODELIST), the process
# count (SLURM_NTASKS) and the process id (SLURM_PROCID) from the SLURM environment; --distributed=yes makes a
# missing variable an error instead of a silent single-host run. The workdir must be on a filesystem every node
# sees (or gs://...). Each process reads only its slice of every global batch.
#SBATCH --job-name=fct_jax
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=fct_jax_%j.log
# --signal=TERM@120 sends SIGTERM two minutes before the time limit: fct_jax checkpoints at the next step and exits
# 143, and --requeue lets the same job resume from that checkpoint.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: sbatch $0 CONFIG[:ARGS] WORKDIR [--config.FIELD=VALUE ...]" >&2
  exit 2
fi
config=$1 workdir=$2
shift 2
# Each process sees only its own GPU: JAX's SLURM cluster detection assigns local devices by SLURM_LOCALID.
srun --kill-on-bad-exit=1 python -m fct_jax.main --config="$config" --workdir="$workdir" --distributed=yes "$@"
