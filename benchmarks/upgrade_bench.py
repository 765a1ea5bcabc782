r"""Gallery upgrade throughput (items/s) with the paper-size transformation, peers side by side in one run.

h = FCTTransformation(d_old=128, d_side=128, d_new=128, inner=2048) (≈ 5.7 M MACs ≈ 11.4 MFLOP per item), random
weights (throughput does not depend on them), a synthetic store of N items (float32 ids/embeddings/ψ on disk).

Rows (same store, same h, same run):
  overlapped   fct_jax.gallery.upgrade.upgrade: reads, compute and writes overlapped (the tool itself)
  sequential   the same store and jitted step, but one chunk at a time: read → compute → wait → write
  compute      jitted h on device-resident chunks only (no I/O): the ceiling of the device
  numpy        (CPU only) the same MLP in NumPy (BatchNorm folded into the matmuls), in-memory arrays

CPU (this machine; target ≥ 20k items/s):
  .venv/bin/python benchmarks/upgrade_bench.py --out /tmp/upgrade_bench_cpu.json
GPU (lent H200; target ≥ 1M items/s; store on /dev/shm so the disk is not what is measured):
  python benchmarks/upgrade_bench.py --gpu --out $OUT/upgrade_bench_gpu.json

Imports only jax, flax, numpy, tensorstore and fct_jax's gallery/models modules (no TensorFlow, grain,
ml_collections or clu), so it runs on the lent GPU machines as they are.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_io import write_json  # noqa: E402

from fct_jax import sharding  # noqa: E402
from fct_jax.gallery import store as store_lib  # noqa: E402
from fct_jax.gallery import upgrade as upgrade_lib  # noqa: E402
from fct_jax.models.transformation import FCTTransformation  # noqa: E402

D, INNER = 128, 2048
MODEL = {"embedding": {"stage": "old", "fingerprint": "bench-old", "dim": D},
         "side_info": {"kind": "bench", "stage": "side", "fingerprint": "bench-side", "dim": D}}


def make_transform():
  h = FCTTransformation(old_dim=D, side_dim=D, new_dim=D, inner_dim=INNER)
  variables = h.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros((2, D)), jnp.zeros((2, D)))
  # Non-trivial BatchNorm statistics, so the folded NumPy peer is checked against something real.
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: (np.abs(rng.normal(1, .2, x.shape)) if "var" in jax.tree_util.keystr(p)
                    else rng.normal(0, .1, x.shape) if "mean" in jax.tree_util.keystr(p) else np.asarray(x))
      .astype(np.float32), jax.device_get(variables))
  produces = {**MODEL, "embedding": {"stage": "new", "fingerprint": "bench-new", "dim": D}}
  t = upgrade_lib.Transform(name="bench", apply=lambda v, o, s: (h.apply(v, o, s)["embedding"], None),
                            variables=variables, old_dim=D, side_dim=D, new_dim=D, fingerprint="bench-h",
                            expects=MODEL, produces=produces)
  return t, h, variables


def make_source(root: str, n: int, chunk: int) -> store_lib.Version:
  st = store_lib.Store(root)
  w = st.begin("build-bench", {"op": "bench", "n": n, "chunk": chunk}, count=n, chunk_size=chunk, embedding_dim=D,
               side_info_dim=D, dtype="float32")
  rng = np.random.default_rng(0)
  for i in range(w.num_chunks):
    a, b = w.chunk_rows(i)
    w.write_chunk(i, np.arange(a, b), np.abs(rng.normal(size=(b - a, D))).astype(np.float32),
                  rng.normal(size=(b - a, D)).astype(np.float32))
  return w.commit(model=MODEL, lineage=[])


def numpy_mlp(variables):
  """The eval-mode MLP in NumPy with BatchNorm folded into each matmul: ``f(old, side) -> new``."""
  p, s = variables["params"], variables["batch_stats"]

  def layer(x, name):
    scale = p[f"{name}_bn"]["scale"] / np.sqrt(s[f"{name}_bn"]["var"] + 1e-5)
    w = p[f"{name}_dense"]["kernel"] * scale
    b = p[f"{name}_bn"]["bias"] - s[f"{name}_bn"]["mean"] * scale
    return np.maximum(x @ w + b, 0)

  def f(old, side):
    p1 = layer(layer(old, "old_proj0"), "old_proj1")
    p2 = layer(layer(side, "side_proj0"), "side_proj1")
    x = layer(layer(np.concatenate([p1, p2], 1), "mix0"), "mix1")
    return x @ p["mix_out"]["kernel"] + p["mix_out"]["bias"]

  return f


def sequential(source, t, dest, mesh):
  """The peer without overlap: each chunk read, computed, fetched and written before the next starts."""
  step = upgrade_lib.make_step(t, mesh, np.float32)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  variables = jax.device_put(t.variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  w = dest.begin("seq", {"op": "seq"}, count=source.count, chunk_size=source.chunk_size, embedding_dim=D,
                 side_info_dim=D, dtype="float32")
  pad = -(-source.chunk_size // mesh.size) * mesh.size
  for i in range(source.num_chunks):
    c = source.read_chunk(i)
    n = c["ids"].shape[0]
    old, side = (np.pad(c[k], ((0, pad - n), (0, 0))) for k in ("embeddings", "side_info"))
    new, _ = step(variables, jax.device_put(old, sh), jax.device_put(side, sh))
    w.write_chunk(i, c["ids"], np.asarray(new)[:n], c["side_info"])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gpu", action="store_true", help="accelerator run: larger N and chunks, store on /dev/shm")
  ap.add_argument("--n", type=int, default=None, help="items (default 65536 CPU, 2097152 GPU)")
  ap.add_argument("--chunk", type=int, default=None, help="items per chunk (default 8192 CPU, 131072 GPU)")
  ap.add_argument("--store-dir", default=None, help="where the stores go (default: temp dir; /dev/shm on GPU)")
  ap.add_argument("--repeats", type=int, default=1)
  ap.add_argument("--out", default=None, help="JSON results")
  args = ap.parse_args()
  backend = jax.default_backend()
  if args.gpu and backend == "cpu":
    sys.exit("error: --gpu but jax sees no accelerator")
  n = args.n or (2_097_152 if args.gpu else 65_536)
  chunk = args.chunk or (131_072 if args.gpu else 8_192)
  target = 1_000_000 if args.gpu else 20_000
  base = args.store_dir or ("/dev/shm" if args.gpu and os.path.isdir("/dev/shm") else None)
  tmp = tempfile.mkdtemp(prefix="fct_upgrade_bench_", dir=base)
  try:
    mesh = sharding.make_mesh(jax.local_devices())
    t, h, variables = make_transform()
    t0 = time.perf_counter()
    src = make_source(os.path.join(tmp, "src"), n, chunk)
    print(f"source store: {n} items in {src.num_chunks} chunks, built in {time.perf_counter() - t0:.1f}s "
          f"({backend}, {mesh.size} device(s): {jax.devices()[0].device_kind})", flush=True)
    # Warm-up: compile the chunk step once (a first chunk into a throw-away store), outside every timing.
    upgrade_lib.upgrade(src, t, store_lib.Store(os.path.join(tmp, "warm")), progress=False, stop_after_chunks=1)

    def timed(fn):
      best = float("inf")
      for r in range(args.repeats):
        d = os.path.join(tmp, f"run{r}_{time.monotonic_ns()}")
        t0 = time.perf_counter()
        fn(d)
        best = min(best, time.perf_counter() - t0)
        shutil.rmtree(d, ignore_errors=True)
      return n / best

    rows = {}
    rows["overlapped"] = timed(lambda d: upgrade_lib.upgrade(src, t, store_lib.Store(d), progress=False))
    print(f"overlapped  {rows['overlapped']:>12,.0f} items/s", flush=True)
    rows["sequential"] = timed(lambda d: sequential(src, t, store_lib.Store(d), mesh))
    print(f"sequential  {rows['sequential']:>12,.0f} items/s", flush=True)

    # Compute ceiling: device-resident chunks, results waited for.
    step = upgrade_lib.make_step(t, mesh, np.float32)
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    vdev = jax.device_put(t.variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    pad = -(-chunk // mesh.size) * mesh.size
    x = jax.device_put(np.abs(np.random.default_rng(2).normal(size=(pad, D))).astype(np.float32), sh)
    jax.block_until_ready(step(vdev, x, x))
    reps = max(1, n // pad)
    t0 = time.perf_counter()
    outs = [step(vdev, x, x)[0] for _ in range(reps)]
    jax.block_until_ready(outs)
    rows["compute"] = reps * pad / (time.perf_counter() - t0)
    print(f"compute     {rows['compute']:>12,.0f} items/s", flush=True)

    # Correctness of the tool's output and of the NumPy peer, on a few items.
    c0 = src.read_chunk(0)
    ref = np.asarray(h.apply(variables, c0["embeddings"][:64], c0["side_info"][:64])["embedding"])
    f = numpy_mlp(variables)
    np_err = float(np.abs(f(c0["embeddings"][:64], c0["side_info"][:64]) - ref).max())
    if backend == "cpu":
      m = min(n, 16_384)
      full = src.read_all()
      t0 = time.perf_counter()
      for a in range(0, m, 4096):
        f(full["embeddings"][a:a + 4096], full["side_info"][a:a + 4096])
      rows["numpy"] = m / (time.perf_counter() - t0)
      print(f"numpy       {rows['numpy']:>12,.0f} items/s  (max |numpy - flax| = {np_err:.2e})", flush=True)

    flops = 2 * (D * 2 * D + 2 * D * 2 * D) * 2 + 2 * (4 * D * INNER + INNER * INNER + INNER * D)
    ratios = {"overlapped/sequential": rows["overlapped"] / rows["sequential"],
              "overlapped/compute": rows["overlapped"] / rows["compute"]}
    if "numpy" in rows:
      ratios["overlapped/numpy"] = rows["overlapped"] / rows["numpy"]
    result = {"benchmark": "gallery upgrade", "backend": backend, "device_kind": jax.devices()[0].device_kind,
              "devices": mesh.size, "host": platform.node(), "cpu_count": os.cpu_count(), "n": n, "chunk": chunk,
              "dims": {"old": D, "side": D, "new": D, "inner": INNER}, "flop_per_item": flops,
              "items_per_s": rows, "ratios": ratios, "target_items_per_s": target,
              "fraction_of_target": rows["overlapped"] / target,
              "achieved_gflops_compute": rows["compute"] * flops / 1e9,
              "numpy_vs_flax_max_abs_err": np_err, "jax": jax.__version__,
              "heavy_imports": sorted(m for m in ("tensorflow", "grain", "ml_collections", "clu") if m in sys.modules)}
    print(json.dumps({"ratios": ratios, "fraction_of_target": result["fraction_of_target"],
                      "achieved_gflops_compute": result["achieved_gflops_compute"]}, indent=1))
    if args.out:
      write_json(args.out, result)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
