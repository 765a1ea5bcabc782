"""h trained on stored vectors (``configs/vectors.py``): training throughput in rows/s, device-resident against
host-gathered rows, in one run.

Writes a synthetic vector set (φ_old, ψ, φ_new; ``--rows`` rows of ``--dim``-d vectors, an .npy directory) and runs
the vectors plan's ``transformation`` stage (h with stored ψ, the paper's h: inner width ``--inner``, Adam, batch
``--batch``) twice through ``experiment.run``, as a user's plan runs it:

* ``device``: the vectors held on the devices (rows sharded over the mesh), ``steps_per_call`` optimizer steps per
  jitted call (the default path);
* ``host``: ``train.arrays_on_device=False``: the rows gathered on the host every step (one step per call), the
  path for vector sets larger than device memory.

Rows/s is the steady rate between the first and the last logged step (compilation and the first interval excluded;
``writers.Progress`` rates are cumulative, so the interval's time is the difference of the two elapsed times).

  python benchmarks/vectors_train_bench.py --out benchmarks/results/vectors_train_cpu.json
  python benchmarks/vectors_train_bench.py --tiny --out /tmp/v.json      # a smoke run (seconds)
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_io import write_json  # noqa: E402
from configs import vectors as vectors_config  # noqa: E402
from fct_jax import experiment  # noqa: E402
from fct_jax.data import vectors  # noqa: E402


def _steady_rows_per_s(metrics_path: str, batch: int) -> float:
  """Rows/s between the first and last logged step of a stage's metrics.jsonl (cumulative rates → elapsed times)."""
  recs = [r for r in map(json.loads, open(metrics_path)) if "step" in r]
  (a, ra), (b, rb) = (recs[0]["step"], recs[0]["steps_per_sec"]), (recs[-1]["step"], recs[-1]["steps_per_sec"])
  seconds = b / rb - a / ra
  return (b - a) * batch / seconds


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=65536)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--inner", type=int, default=2048)
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--steps", type=int, default=60)
  p.add_argument("--tiny", action="store_true", help="small vectors, h and batch (a smoke run)")
  p.add_argument("--workdir", default=None, help="where the vectors and stages go (default: a temp dir)")
  p.add_argument("--out", required=True)
  a = p.parse_args()
  if a.tiny:
    a.rows, a.dim, a.inner, a.batch, a.steps = 512, 8, 32, 32, 12
  root = a.workdir or tempfile.mkdtemp(prefix="vectors_bench_")
  rng = np.random.default_rng(0)
  old = rng.standard_normal((a.rows, a.dim)).astype(np.float32)
  psi = rng.standard_normal((a.rows, a.dim)).astype(np.float32)
  new = (old @ rng.standard_normal((a.dim, a.dim)).astype(np.float32) / np.sqrt(a.dim) + 0.1 * psi)
  train = os.path.join(root, "train")
  vectors.save_vectors(train, {"old": old, "psi": psi, "new": new.astype(np.float32)}, fmt="npy")
  log_every = max(1, a.steps // 6)
  rows = {}
  for mode in ("device", "host"):
    config = vectors_config.get_config(f"train={train},eval={train},side_dim={a.dim},batch_size={a.batch},"
                                       f"inner_dim={a.inner}")
    st = config.stages.transformation
    st.train.steps, st.train.log_every_steps, st.train.checkpoint_every_steps = a.steps, log_every, 0
    st.train.arrays_on_device = mode == "device"
    if mode == "host":
      st.train.steps_per_call = 1
    config.plan = ["transformation"]
    wd = os.path.join(root, mode)
    experiment.run(config, wd)
    rows[mode] = {"rows_per_s": _steady_rows_per_s(os.path.join(wd, "transformation", "metrics.jsonl"), a.batch),
                  "steps": a.steps}
  ratio = rows["device"]["rows_per_s"] / rows["host"]["rows_per_s"]
  print(f"h on stored vectors ({a.rows} rows, {a.dim}-d φ_old/ψ/φ_new, inner {a.inner}, batch {a.batch}, "
        f"{jax.device_count()} {jax.default_backend()} device(s)):")
  print(f"  device-resident rows: {rows['device']['rows_per_s']:,.0f} rows/s")
  print(f"  host-gathered rows:   {rows['host']['rows_per_s']:,.0f} rows/s")
  print(f"  device / host: {ratio:.2f}x")
  write_json(a.out, {"benchmark": "h training on stored vectors", "backend": jax.default_backend(),
                     "devices": jax.device_count(), "cpu_count": os.cpu_count(), "rows": a.rows, "dim": a.dim,
                     "inner": a.inner, "batch": a.batch, "tiny": a.tiny, "modes": rows,
                     "ratio_device_over_host": ratio, "jax": jax.__version__})


if __name__ == "__main__":
  main()
