"""Retrieval evaluator benchmark: our exact kernel vs faiss-cpu vs ml-fct's algorithm (vs torch with --gpu).

Data: d=128 embeddings of N images in N/50 classes (class centroid + noise), query set = gallery set, self
excluded — the paper's evaluation set-up. Each (peer, N) runs in a fresh subprocess so that its peak resident memory
(VmHWM) is its own. Times exclude JAX compilation (reported separately) and data generation.

Peers (CPU):
  ours       fct_jax.retrieval.evaluate: CMC top-1/top-5 + mAP over the full ranking (exact).
  faiss      faiss-cpu IndexFlatL2, exact top-(k+1) search (CMC only; it does not give mAP).
  reference  ml-fct's algorithm re-expressed in NumPy: full N×N distance matrix, argsort of every row, CMC from the
             sorted matches, per-query sklearn average_precision_score (utils/eval_utils.py).

  python benchmarks/retrieval_bench.py --sizes 2000,5000,10000 --ref-max 5000 --out /tmp/retrieval_bench.json

With --gpu (on a machine with CUDA torch; faiss is skipped there if absent) it times, at N=50k by default:
  ours, torch cdist+topk (CMC), torch cdist+argsort (+ vectorised AP: the full ranking), and checks that ours and
  torch's full-ranking metrics agree.

  python benchmarks/retrieval_bench.py --gpu --out gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.bench_io import write_json  # noqa: E402


def make_data(n: int, d: int, seed: int = 0, per_class: int = 50):
  rng = np.random.default_rng(seed)
  c = max(1, n // per_class)
  centroids = rng.standard_normal((c, d)).astype(np.float32)
  labels = np.arange(n) % c
  x = centroids[labels] + 2.5 * rng.standard_normal((n, d)).astype(np.float32)
  return x.astype(np.float32), labels


def peak_rss_mib() -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


# ---------------------------------------------------------------- peers (each returns (metrics, seconds, extra))

def best_of(fn, repeats: int):
  """Calls fn() ``repeats`` times: (its last result, the fastest call's seconds, every call's seconds)."""
  times, r = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    r = fn()
    times.append(time.perf_counter() - t0)
  return r, min(times), times


def run_ours(x, labels, ks, count_method="auto", repeats=1):
  import jax  # pylint: disable=g-import-not-at-top
  from fct_jax import retrieval  # pylint: disable=g-import-not-at-top

  def call():
    return retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=ks, count_method=count_method)

  _, first, _ = best_of(call, 1)
  r, best, times = best_of(call, repeats)
  return r, best, {"first_call_s_incl_compile": first, "all_s": times, "backend": jax.default_backend()}


def _cmc_from_neighbours(idx, labels, ks):
  """CMC top-k in percent from (N, kmax+1) neighbour indices of the N queries (query = gallery): the query's own
  item is dropped wherever ties put it, the first kmax others kept."""
  kmax = max(ks)
  own = idx == np.arange(len(idx))[:, None]
  rest = np.where(own, -1, idx)
  order = np.argsort(own, axis=1, kind="stable")
  rest = np.take_along_axis(rest, order, axis=1)[:, :kmax]
  match = labels[rest] == labels[:, None]
  return {f"cmc_top{k}": float(100 * match[:, :k].any(1).mean()) for k in ks}


def run_faiss(x, labels, ks, repeats=1):
  import faiss  # pylint: disable=g-import-not-at-top

  def search():
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index.search(x, max(ks) + 1)[1]  # +1: the query itself

  # Timed with the CMC bookkeeping, like ours.
  r, best, times = best_of(lambda: _cmc_from_neighbours(search(), labels, ks), repeats)
  return r, best, {"faiss_threads": faiss.omp_get_max_threads(), "all_s": times}


def run_ours_topk(x, labels, ks, repeats=1):
  """Our exact top-k search (fct_jax.retrieval.topk), the same task as faiss: top-(k+1), own item dropped, CMC."""
  from fct_jax.retrieval.topk import topk  # pylint: disable=g-import-not-at-top
  _, first, _ = best_of(lambda: topk(x, x, max(ks) + 1), 1)
  r, best, times = best_of(lambda: _cmc_from_neighbours(topk(x, x, max(ks) + 1)[0], labels, ks), repeats)
  return r, best, {"first_call_s_incl_compile": first, "all_s": times}


def run_reference(x, labels, ks):
  from sklearn.metrics import average_precision_score  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  # torch.cdist(p=2) computes sqrt(|q|² + |g|² − 2 q·g) by matmul for these sizes; same here.
  sq = np.einsum("nd,nd->n", x, x)
  dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0))
  n = len(x)
  indices = np.argsort(dist, axis=1)
  matches = labels[indices] == labels[:, None]
  kmax = max(ks)
  ret = np.zeros(kmax)
  aps = []
  for i in range(n):
    valid = indices[i] != i
    m = matches[i, valid]
    if not m.any():
      continue
    first = np.nonzero(m)[0][0]
    if first < kmax:
      ret[first] += 1
    aps.append(average_precision_score(m, -dist[i][indices[i]][valid]))
  cmc = ret.cumsum() / len(aps)
  dt = time.perf_counter() - t0
  r = {f"cmc_top{k}": float(100 * cmc[k - 1]) for k in ks}
  r["mAP"] = float(100 * np.mean(aps))
  return r, dt, {}


PEERS = {"ours": run_ours, "ours_topk": run_ours_topk, "faiss": run_faiss, "reference": run_reference}


def worker(peer: str, n: int, d: int, ks, extra_args, repeats=1):
  x, labels = make_data(n, d)
  kwargs = {"repeats": repeats} if peer != "reference" else {}
  if peer == "ours" and extra_args:
    kwargs["count_method"] = extra_args
  r, dt, extra = PEERS[peer](x, labels, ks, **kwargs)
  return {"peer": peer, "n": n, "d": d, "seconds": dt, "metrics": r, "peak_rss_mib": peak_rss_mib(), **extra}


def run_in_subprocess(peer, n, d, ks, extra="", timeout=1800, repeats=1):
  cmd = [sys.executable, os.path.abspath(__file__), "--_worker", peer, "--sizes", str(n), "--dim", str(d),
         "--ks", ",".join(map(str, ks)), "--_extra", extra, "--repeats", str(repeats)]
  try:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"peer": peer, "n": n, "skipped": f"timed out after {timeout}s"}
  lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
  if p.returncode != 0 or not lines:
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
    return {"peer": peer, "n": n, "skipped": f"failed: {tail[0][:200]}"}
  return json.loads(lines[-1])


def cpu_main(args, ks):
  sizes = [int(s) for s in args.sizes.split(",")]
  have_faiss = _importable("faiss")
  have_sklearn = _importable("sklearn")
  rows = []
  for n in sizes:
    row = {"n": n}
    row["ours"] = run_in_subprocess("ours", n, args.dim, ks, repeats=args.repeats)
    if args.both_methods:
      for method in ("reduce", "histogram"):  # "auto" (= reduce_pairs) is row["ours"]
        row[f"ours_{method}"] = run_in_subprocess("ours", n, args.dim, ks, method, repeats=args.repeats)
    row["ours_topk"] = run_in_subprocess("ours_topk", n, args.dim, ks, repeats=args.repeats)
    row["faiss"] = (run_in_subprocess("faiss", n, args.dim, ks, repeats=args.repeats) if have_faiss
                    else {"skipped": "faiss not installed (pip install faiss-cpu)"})
    if not have_sklearn:
      row["reference"] = {"skipped": "scikit-learn not installed"}
    elif n > args.ref_max:
      row["reference"] = {"skipped": f"N > --ref-max={args.ref_max} (grows as N²: ~43 s at 10k on 2 cores)"}
    else:
      row["reference"] = run_in_subprocess("reference", n, args.dim, ks)
    rows.append(row)
    _print_row(row, ks)
  return rows


def _secs(r):
  return r.get("seconds") if isinstance(r, dict) else None


def _print_row(row, ks):
  ours = _secs(row["ours"])
  parts = [f"N={row['n']:>6}"]
  for peer in [p for p in row if p != "n"]:
    r = row[peer]
    if "skipped" in r:
      parts.append(f"{peer}: skipped ({r['skipped']})")
      continue
    mem = f", peak {r['peak_rss_mib']:.0f} MiB" if r.get("peak_rss_mib") else ""
    ratio = f", {r['seconds'] / ours:.1f}x ours' time" if ours and peer != "ours" else ""
    m = r.get("metrics", {})
    mtxt = " ".join(f"{k}={v:.2f}" for k, v in m.items() if k.startswith("cmc") or k == "mAP")
    parts.append(f"{peer}: {r['seconds']:.3f}s{ratio}{mem} [{mtxt}]")
  print(" | ".join(parts), flush=True)


def _importable(name):
  try:
    __import__(name)
    return True
  except ImportError:
    return False


# ---------------------------------------------------------------- GPU mode

def gpu_main(args, ks):
  import jax  # pylint: disable=g-import-not-at-top
  from fct_jax import retrieval  # pylint: disable=g-import-not-at-top
  from fct_jax.retrieval import kernel  # pylint: disable=g-import-not-at-top
  out = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
  print("jax devices:", out["devices"], flush=True)
  n = int(args.sizes.split(",")[-1]) if args.sizes_given else 50000
  x, labels = make_data(n, args.dim)
  out["n"], out["d"] = n, args.dim
  mesh = None
  if args.one_device:
    from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))

  def ours(method):
    return retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=ks, mesh=mesh, count_method=method)

  # With --both-methods every counting method (same results): the fastest should be the accelerator default.
  best = None
  for method in (kernel.COUNT_METHODS[1:] if args.both_methods else ("auto",)):
    _, first, _ = best_of(lambda: ours(method), 1)
    r, fastest, times = best_of(lambda: ours(method), args.repeats)
    entry = {"seconds": fastest, "all": times, "first_call_s_incl_compile": first, "metrics": r}
    try:
      stats = jax.devices()[0].memory_stats() or {}
      entry["peak_device_bytes_so_far"] = stats.get("peak_bytes_in_use")
    except Exception:  # pylint: disable=broad-except
      pass
    out[f"ours_{method}"] = entry
    print(f"ours count_method={method} (CMC+mAP, exact): {min(times):.4f}s (first call {first:.1f}s)  {r}",
          flush=True)
    if best is None or entry["seconds"] < best["seconds"]:
      best = entry
  out["ours"] = best
  times = [best["seconds"]]
  r = best["metrics"]

  if _importable("faiss"):
    fr, fdt, _ = run_faiss(x, labels, ks)
    out["faiss_cpu"] = {"seconds": fdt, "metrics": fr}
    print(f"faiss-cpu top-{max(ks) + 1}: {fdt:.3f}s ({fdt / min(times):.1f}x ours)", flush=True)
  else:
    out["faiss_cpu"] = {"skipped": "faiss not installed on this machine"}
    print("faiss: skipped (not installed on this machine)", flush=True)

  try:
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      raise ImportError("torch without CUDA")
  except ImportError as e:
    out["torch"] = {"skipped": str(e)}
    print(f"torch: skipped ({e})", flush=True)
  else:
    out["torch"] = torch_peers(torch, x, labels, ks, args.repeats)
    tt = out["torch"]
    for key in ("cdist_topk", "cdist_argsort_ap", "cdist_topk_plus_argsort_ap"):
      if key in tt:
        print(f"torch {key}: {tt[key]['seconds']:.4f}s ({tt[key]['seconds'] / min(times):.2f}x ours)", flush=True)
    if "metrics" in tt:
      diff = {k: abs(tt["metrics"][k] - r[k]) for k in tt["metrics"]}
      out["torch_vs_ours_abs_diff"] = diff
      print(f"torch full-ranking metrics {tt['metrics']}; |diff| vs ours {diff}", flush=True)
  return out


def torch_peers(torch, x, labels, ks, repeats):
  dev = torch.device("cuda")
  xt = torch.from_numpy(x).to(dev)
  lt = torch.from_numpy(labels).to(dev)
  n = xt.shape[0]
  eye = torch.arange(n, device=dev)
  kmax = max(ks)
  res = {}

  def timed(fn):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
      torch.cuda.synchronize()
      t0 = time.perf_counter()
      out = fn()
      torch.cuda.synchronize()
      best = min(best, time.perf_counter() - t0)
    return best, out

  def cdist_topk():
    d = torch.cdist(xt, xt)
    d[eye, eye] = float("inf")
    idx = d.topk(kmax, dim=1, largest=False).indices
    return (lt[idx] == lt[:, None])

  def cdist_argsort_ap(block=8192):
    # The full ranking, blocked over queries so that N=50k fits: argsort + cumulative precision at positives.
    aps, firsts = [], []
    for s in range(0, n, block):
      d = torch.cdist(xt[s:s + block], xt)
      rows = torch.arange(d.shape[0], device=dev)
      d[rows, rows + s] = float("inf")  # own item last (then dropped)
      order = d.argsort(dim=1)[:, :-1]
      m = (lt[order] == lt[s:s + block, None]).float()
      cum = m.cumsum(1)
      npos = m.sum(1)
      ranks = torch.arange(1, n, device=dev, dtype=torch.float32)
      ap = (m * cum / ranks).sum(1) / npos.clamp(min=1)
      first = torch.where(npos > 0, m.argmax(1), torch.full_like(npos, n, dtype=torch.long))
      aps.append(ap[npos > 0])
      firsts.append(first[npos > 0])
    return torch.cat(aps), torch.cat(firsts)

  torch.cuda.reset_peak_memory_stats()
  t, _ = timed(cdist_topk)
  res["cdist_topk"] = {"seconds": t}
  t2, (ap, first) = timed(cdist_argsort_ap)
  res["cdist_argsort_ap"] = {"seconds": t2}
  res["cdist_topk_plus_argsort_ap"] = {"seconds": t + t2}
  res["peak_device_bytes"] = torch.cuda.max_memory_allocated()
  m = {f"cmc_top{k}": float(100 * (first < k).float().mean()) for k in ks}
  m["mAP"] = float(100 * ap.double().mean())
  res["metrics"] = m
  return res


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--sizes", default=None, help="comma-separated N (CPU default 2000,5000,10000; GPU 50000)")
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--ks", default="1,5")
  ap.add_argument("--ref-max", type=int, default=5000, help="largest N for the (quadratic, slow) reference")
  ap.add_argument("--both-methods", action="store_true", help="also time ours with each count_method")
  ap.add_argument("--gpu", action="store_true", help="GPU mode: ours vs torch (and faiss if present) at N=50k")
  ap.add_argument("--one-device", action="store_true", help="GPU mode: use only the first device")
  ap.add_argument("--repeats", type=int, default=3,
                  help="timed calls per peer, the fastest reported (ours and faiss; the reference runs once)")
  ap.add_argument("--out", default=None, help="write the results as JSON here")
  ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--_extra", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  ks = tuple(int(k) for k in args.ks.split(","))
  args.sizes_given = args.sizes is not None
  if args.sizes is None:
    args.sizes = "50000" if args.gpu else "2000,5000,10000"
  if args._worker:  # pylint: disable=protected-access
    print(json.dumps(worker(args._worker, int(args.sizes), args.dim, ks, args._extra, args.repeats)))  # pylint: disable=protected-access
    return
  meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
          "argv": sys.argv[1:]}
  if args.gpu:
    # JAX and torch share the GPU in this process: keep JAX from preallocating 75% of it (torch's blocked argsort
    # needs ~20 GB at N=50k).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")
    result = {"mode": "gpu", **meta, **gpu_main(args, ks)}
  else:
    print(f"CPU benchmark, d={args.dim}, query = gallery (self excluded), {os.cpu_count()} CPUs; times exclude "
          "compilation; each peer in its own process", flush=True)
    result = {"mode": "cpu", **meta, "rows": cpu_main(args, ks)}
  if args.out:
    write_json(args.out, result, indent=1)


if __name__ == "__main__":
  main()
