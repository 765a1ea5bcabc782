"""Where the retrieval kernel's time goes: each counting method and query block size, timed in one process.

For every (count_method, query_block) it reports the end-to-end ``retrieval.evaluate`` time and the time of the
jitted kernel alone on inputs already on the device (the rest is host work: validation, class table, padding,
transfers), and checks that every variant's rank statistics equal the first variant's exactly. A matmul-only
floor (the scores of every block and a row minimum) shows what the counting adds. Optionally writes the compiled
HLO of some variants (to read the fusions they became).

  python benchmarks/retrieval_variants.py --n 50000 --out variants.json --hlo_dir /tmp/hlo
  python benchmarks/retrieval_variants.py --n 4000 --variants reduce:256,histogram:256   # CPU smoke run
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.retrieval_bench import best_of, make_data  # noqa: E402
from benchmarks.bench_io import write_json  # noqa: E402


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n", type=int, default=50000)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--variants", default="reduce_pairs:0,reduce_pairs:256,reduce:0,"
                 "histogram:0", help="method:query_block list (block 0: the automatic choice)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--hlo", default="reduce:0,reduce_pairs:0", help="variants whose compiled HLO is written")
  p.add_argument("--hlo_dir", default="")
  p.add_argument("--out", default="")
  return p.parse_args()


def _captured_call(kernel, fn_call):
  """Runs fn_call() once with kernel.run_calls patched to remember (fn, device args) of its first call."""
  seen = {}
  orig = kernel.run_calls

  def spy(fn, blocked, shared, **kw):
    if "fn" not in seen:
      from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
      rep = NamedSharding(kw["mesh"], PartitionSpec())
      per_call = kw["per_call"]
      seen["fn"] = fn
      seen["args"] = tuple(kernel.put(b[:per_call], rep) for b in blocked) + tuple(shared)
      seen["calls"] = blocked[0].shape[0] // per_call
    return orig(fn, blocked, shared, **kw)

  kernel.run_calls = spy
  try:
    out = fn_call()
  finally:
    kernel.run_calls = orig
  return out, seen


def matmul_floor(jax, jnp, kernel, x, block, repeats):
  """Scores of every query block against the whole gallery plus a row minimum: the matmul and one read."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  n, d = x.shape
  g_p, g_sq = kernel.pad_gallery(x, n)
  nb = -(-n // block)
  q = np.zeros((nb * block, d), np.float32)
  q[:n] = x
  q, g, gs = jax.device_put(q.reshape(nb, block, d)), jax.device_put(g_p), jax.device_put(g_sq)
  fn = jax.jit(lambda q, g, gs: lax.map(lambda qb: kernel.scores(qb, g, gs).min(axis=1), q))
  _, first, _ = best_of(lambda: jax.block_until_ready(fn(q, g, gs)), 1)
  _, best, times = best_of(lambda: jax.block_until_ready(fn(q, g, gs)), repeats)
  return {"seconds": best, "all": times, "first_call_s_incl_compile": first, "query_block": block}


def main():
  args = _parse()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fct_jax import retrieval  # pylint: disable=g-import-not-at-top
  from fct_jax.retrieval import kernel, metrics  # pylint: disable=g-import-not-at-top

  x, labels = make_data(args.n, args.dim)
  dev = jax.devices()[0]
  out = {"n": args.n, "d": args.dim, "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
         "jax": jax.__version__, "variants": {}}
  print(f"N={args.n} d={args.dim} on {out['device']} (jax {jax.__version__})", flush=True)
  hlo = set(args.hlo.split(",")) if args.hlo_dir else set()
  if args.hlo_dir:
    os.makedirs(args.hlo_dir, exist_ok=True)
  ref = None
  for spec in args.variants.split(","):
    method, block = spec.split(":")
    block = int(block) or None
    entry = {}
    try:
      def stats():
        return kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, count_method=method,
                                 query_block=block)
      (got, seen), entry["first_call_s_incl_compile"], _ = best_of(lambda: _captured_call(kernel, stats), 1)
      fn, fargs = seen["fn"], seen["args"]
      entry["query_block"] = int(fargs[0].shape[1])
      entry["calls"] = seen["calls"]
      _, entry["evaluate_s"], entry["evaluate_all"] = best_of(
          lambda: retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, count_method=method,
                                     query_block=block), args.repeats)
      _, entry["kernel_s"], entry["kernel_all"] = best_of(lambda: jax.block_until_ready(fn(*fargs)),
                                                          args.repeats + 2)
      entry["metrics"] = metrics.metrics_from_stats(got)
      if ref is None:
        ref = got
        entry["same_as_first"] = True
      else:
        entry["same_as_first"] = bool(np.array_equal(got.num_pos, ref.num_pos)
                                      and np.array_equal(got.first_rank, ref.first_rank)
                                      and np.array_equal(got.ap, ref.ap))
        entry["ap_max_abs_diff"] = float(np.abs(got.ap - ref.ap).max())
      if spec in hlo:
        path = os.path.join(args.hlo_dir, f"hlo_{method}_{block or 0}.txt")
        with open(path, "w") as f:
          f.write(fn.lower(*fargs).compile().as_text())
        entry["hlo"] = path
    except Exception as e:  # pylint: disable=broad-except
      entry["error"] = f"{type(e).__name__}: {e}"[:500]
    out["variants"][spec] = entry
    print(f"{spec:>18}: " + (entry["error"] if "error" in entry else
          f"evaluate {entry['evaluate_s']:.4f}s, kernel {entry['kernel_s']:.4f}s (B={entry['query_block']}, "
          f"first call {entry['first_call_s_incl_compile']:.1f}s, same={entry['same_as_first']})"), flush=True)

  for block in (1024, 256):
    try:
      out[f"matmul_floor_{block}"] = r = matmul_floor(jax, jnp, kernel, x, block, args.repeats + 2)
      print(f"matmul floor (B={block}): {r['seconds']:.4f}s", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      out[f"matmul_floor_{block}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
      print(f"matmul floor (B={block}): {e}", flush=True)
  if args.out:
    write_json(args.out, out, indent=1)


if __name__ == "__main__":
  main()
