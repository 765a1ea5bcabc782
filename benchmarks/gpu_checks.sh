#!/usr/bin/env bash
# All GPU checks in one call on a lent GPU machine (no TensorFlow/grain/ml_collections/clu there: install the
# wheels that ../shared/device/fetch_wheels.sh put in .whl first). Writes JSON results into $OUT.
#   bash benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
echo "== retrieval (N=50k, d=128) =="
timeout 150 python3 benchmarks/retrieval_bench.py --gpu --both-methods --out "$OUT/retrieval_gpu.json" 2>&1 | tail -25
echo "== upgrade =="
timeout 120 python3 benchmarks/upgrade_bench.py --gpu --out "$OUT/upgrade_gpu.json" 2>&1 | tail -15
echo "== ResNet-50 train step vs torch =="
timeout 220 python3 benchmarks/train_step_bench.py --torch --out "$OUT/train_step_gpu.json" 2>&1 | tail -15
echo "== demo old stage (full size) on the GPU =="
timeout 100 python3 -m fct_jax.main --config=configs/demo.py:stage=old --workdir=/tmp/demo_gpu 2>&1 | tail -4
