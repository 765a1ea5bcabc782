r"""Gallery build from stored vectors (``build --from-vectors``): items/s from an .npy directory and from zarr, against
a plain NumPy copy of the same bytes.

The build reads old (N × d) and ψ (N × d_side) float32 and the int64 ids of a vector set, checks every row finite and
the ids unique before writing, then streams them chunk by chunk into a gallery version (TensorStore zarr writes,
CRC-32 per chunk, a progress file per chunk, the manifest). The peer is what the same bytes cost with nothing of
that: ``np.save`` of the three in-memory arrays into a directory (``np_save``); the same followed by ``fsync`` of each
file (``np_save_fsync``: the store's TensorStore file writes are synced, so that a chunk is on disk before its
progress record says so); and an ``.npy`` → ``.npy`` file copy through NumPy (``np_copy``: ``np.load`` then
``np.save``, the build's read + write with no checks, checksums or sync).

Rows (best wall time of ``--repeats``; page cache warm, no fsync, each into a fresh directory):
  npy        build_from_vectors from a directory of .npy files (memory-mapped)
  zarr       build_from_vectors from a directory of zarr arrays (TensorStore reads)
  scan       vectors.check_finite of old and ψ from the .npy directory alone (the build's pre-write check)
  np_save    np.save of old, ψ and ids from memory
  np_save_fsync  the same, each file fsynced
  np_copy    np.load + np.save of the .npy directory's three files

CPU (this machine):
  python benchmarks/vectors_build_bench.py --out benchmarks/results/vectors_build_cpu.json
Tiny (a smoke run):
  python benchmarks/vectors_build_bench.py --tiny --out /tmp/vectors_build_tiny.json
"""

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.bench_io import write_json  # noqa: E402
from fct_jax.data import vectors  # noqa: E402
from fct_jax.gallery import build as build_lib  # noqa: E402
from fct_jax.gallery import store as store_lib  # noqa: E402


def best_of(repeats: int, fn, fresh):
  """Best wall time of ``fn(d)`` over ``repeats`` fresh directories ``d = fresh(r)`` (removed after each run)."""
  best = float("inf")
  for r in range(repeats):
    d = fresh(r)
    t0 = time.perf_counter()
    fn(d)
    best = min(best, time.perf_counter() - t0)
    shutil.rmtree(d, ignore_errors=True)
  return best


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="2,000 items of 16 + 16 dims (a smoke run)")
  ap.add_argument("--n", type=int, default=None, help="items (default 200,000; 2,000 with --tiny)")
  ap.add_argument("--dim", type=int, default=None, help="width of old and of ψ (default 128; 16 with --tiny)")
  ap.add_argument("--chunk", type=int, default=None, help="items per store chunk (default: the store's, 65,536; "
                  "512 with --tiny)")
  ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per row")
  ap.add_argument("--out", default=None, help="JSON results")
  args = ap.parse_args()
  n = args.n or (2000 if args.tiny else 200_000)
  dim = args.dim or (16 if args.tiny else 128)
  chunk = args.chunk or (512 if args.tiny else store_lib.DEFAULT_CHUNK)
  rng = np.random.default_rng(0)
  arrays = {"old": rng.normal(size=(n, dim)).astype(np.float32), "psi": rng.normal(size=(n, dim)).astype(np.float32),
            "id": rng.permutation(n).astype(np.int64) + 10}
  nbytes = sum(a.nbytes for a in arrays.values())
  tmp = tempfile.mkdtemp(prefix="fct_vectors_bench_")
  try:
    src = {"npy": os.path.join(tmp, "src_npy"), "zarr": os.path.join(tmp, "src_zarr")}
    for fmt, path in src.items():
      vectors.save_vectors(path, arrays, fmt=fmt)
    fresh = lambda label: lambda r: os.path.join(tmp, f"{label}{r}")
    seconds, checked = {}, {}
    for fmt, path in src.items():
      def build(d, path=path, fmt=fmt):
        v = build_lib.build_from_vectors(path, store_lib.Store(d), old_model="bench-old", side_model="bench-psi",
                                         chunk_size=chunk, progress=False)
        if fmt not in checked:  # the stored bytes are the file's (once per source; outside the timing's concern)
          got = v.read_all()
          checked[fmt] = all(np.array_equal(got[k], arrays[a]) for k, a in
                             (("embeddings", "old"), ("side_info", "psi"), ("ids", "id")))
      seconds[fmt] = best_of(args.repeats, build, fresh(fmt))
    vs = vectors.open_vectors(src["npy"], need=("old", "psi"))
    seconds["scan"] = best_of(args.repeats, lambda d: vectors.check_finite(vs, ["old", "psi"], chunk_rows=chunk),
                              lambda r: os.path.join(tmp, "unused"))

    def np_save(d):
      os.makedirs(d)
      for k, a in arrays.items():
        np.save(os.path.join(d, f"{k}.npy"), a)

    def np_save_fsync(d):
      os.makedirs(d)
      for k, a in arrays.items():
        with open(os.path.join(d, f"{k}.npy"), "wb") as f:
          np.save(f, a)
          f.flush()
          os.fsync(f.fileno())

    def np_copy(d):
      os.makedirs(d)
      for k in arrays:
        np.save(os.path.join(d, f"{k}.npy"), np.load(os.path.join(src["npy"], f"{k}.npy")))

    seconds["np_save"] = best_of(args.repeats, np_save, fresh("np_save"))
    seconds["np_save_fsync"] = best_of(args.repeats, np_save_fsync, fresh("np_save_fsync"))
    seconds["np_copy"] = best_of(args.repeats, np_copy, fresh("np_copy"))
    rows = {k: {"seconds": s, "items_per_s": n / s, "MB_per_s": nbytes / s / 1e6} for k, s in seconds.items()}
    ratios = {f"{b}/{peer} items_per_s": rows[b]["items_per_s"] / rows[peer]["items_per_s"]
              for b in ("npy", "zarr") for peer in ("np_save", "np_save_fsync", "np_copy")}
    print(f"N = {n}, old {dim}-d + ψ {dim}-d float32 + int64 ids ({nbytes / 1e6:.0f} MB), chunk {chunk}")
    print(f"{'row':<14} {'seconds':>9} {'items/s':>12} {'MB/s':>9}")
    for k, r in rows.items():
      print(f"{k:<14} {r['seconds']:>9.3f} {r['items_per_s']:>12.0f} {r['MB_per_s']:>9.0f}")
    print(json.dumps(ratios, indent=1), flush=True)
    if not all(checked.values()):
      raise SystemExit(f"stored bytes differ from the source: {checked}")
    result = {"benchmark": "gallery build from vectors", "host": platform.node(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "n": n, "dim_old": dim, "dim_psi": dim, "chunk": chunk,
              "bytes": nbytes, "tiny": args.tiny, "repeats": args.repeats, "rows": rows, "ratios": ratios,
              "stored_equals_source": checked, "numpy": np.__version__}
    if args.out:
      write_json(args.out, result)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
