r"""FastFill backfill throughput (items/s) and its cost against a full backfill, through the real gallery tool.

A backfill step re-embeds a budget f of an upgraded gallery's items from their images with φ_new, in the order of the
stored uncertainty s (``fct_jax.gallery.backfill``); a full backfill re-embeds every item (FCT's "backfilling"). Both
run the same code here (``backfill(budget=f)`` and ``backfill(budget=1.0)``), each on a fresh copy of one upgraded
store, so the ratio of their times is what a partial backfill saves: ideally f, plus the chunks it copies (a step
rewrites every chunk holding one of its items and shares the rest).

Rows (same store, same models, same run):
  partial   backfill(budget=f): the step's items / its wall time
  full      backfill(budget=1.0): all items / its wall time
  one       backfill(items=1): the fixed cost of a call (load φ_new, trace and compile the embedding pass, read the
            order's inputs, commit), which a small model on a CPU does not hide
  embed     φ_new of every image in one pass (artifacts.embed, compiled already), no store: the ceiling of either

The experiment (old, new, a FastFill h with ψ = 0) is the demo's, trained for 2 steps on the coloured shapes
(throughput does not depend on the weights); ``--n`` images in the evaluation split; the demo's full-size CNN
(32×32 images, 32-d embeddings) unless ``--tiny`` (the test-sized one, 16×16, 8-d, 40 items).

CPU (this machine):
  python benchmarks/backfill_bench.py --out benchmarks/results/backfill_cpu.json
Tiny (a smoke run, seconds after compilation):
  python benchmarks/backfill_bench.py --tiny --out /tmp/backfill_tiny.json
"""

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks.bench_io import write_json  # noqa: E402
from configs import demo  # noqa: E402
from fct_jax import artifacts, experiment  # noqa: E402
from fct_jax.data import sources  # noqa: E402
from fct_jax.gallery import backfill as backfill_lib  # noqa: E402
from fct_jax.gallery import build as build_lib  # noqa: E402
from fct_jax.gallery import loader  # noqa: E402
from fct_jax.gallery import store as store_lib  # noqa: E402
from fct_jax.gallery import upgrade as upgrade_lib  # noqa: E402

H = "transformation_fastfill_none"


def experiment_config(n: int, tiny: bool):
  """The demo's runlocal plan cut to old, new and the FastFill h, with ``n`` evaluation images."""
  cfg = demo.get_config("runlocal")
  full = demo.get_config("")
  for name in ("old", "new", H):
    s = cfg.stages[name]
    s.data.num_eval = n
    if not tiny:  # the full demo's images and CNN; the runlocal schedule (2 steps) and h
      s.data.image_size = full.stages[name].data.image_size
      if name != H:
        s.model = copy.deepcopy(full.stages[name].model)
      s.eval_batch_size = 128
  cfg.plan = ["old", "new", H]
  return cfg


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="test-sized models and 40 items (a smoke run)")
  ap.add_argument("--n", type=int, default=None, help="gallery items (default 16384; 40 with --tiny)")
  ap.add_argument("--chunk", type=int, default=None, help="items per store chunk (default 512; 8 with --tiny)")
  ap.add_argument("--budget", type=float, default=0.2, help="fraction backfilled by the partial step")
  ap.add_argument("--repeats", type=int, default=2, help="best of this many runs per row")
  ap.add_argument("--workdir", default=None, help="experiment workdir to reuse (default: a temp dir, trained)")
  ap.add_argument("--out", default=None, help="JSON results")
  args = ap.parse_args()
  n = args.n or (40 if args.tiny else 16384)
  chunk = args.chunk or (8 if args.tiny else 512)
  tmp = tempfile.mkdtemp(prefix="fct_backfill_bench_")
  try:
    wd = args.workdir or os.path.join(tmp, "exp")
    cfg = experiment_config(n, args.tiny)
    t0 = time.perf_counter()
    experiment.run(cfg, wd)
    print(f"experiment ready in {time.perf_counter() - t0:.0f}s ({wd})", flush=True)
    root = os.path.join(tmp, "store")
    built = build_lib.build(wd, store_lib.Store(root), side_info="none", chunk_size=chunk, progress=False)
    up = upgrade_lib.upgrade(built, loader.load_transformation(os.path.join(wd, H)), store_lib.Store(root),
                             progress=False)
    assert up.log_var_dim, "the FastFill h stores s"

    def run(budget, label):
      """Best wall time of ``repeats`` backfills of ``budget`` on fresh copies of the upgraded store."""
      best, items = float("inf"), 0
      for r in range(args.repeats):
        d = os.path.join(tmp, f"{label}{r}")
        shutil.copytree(root, d)
        t0 = time.perf_counter()
        v = backfill_lib.backfill(wd, store_lib.Store(d), budget=budget, items=None if budget else 1, progress=False)
        best = min(best, time.perf_counter() - t0)
        items = v.backfill["backfilled"]
        rewritten = sum("at" not in c for c in v.manifest["chunks"])
        shutil.rmtree(d, ignore_errors=True)
      return {"seconds": best, "items": items, "items_per_s": items / best, "chunks_rewritten": rewritten,
              "chunks": up.num_chunks}

    # Warm-up outside every timing: one item backfilled into a throw-away copy (loads the stages, compiles).
    backfill_lib.backfill(wd, store_lib.Store(shutil.copytree(root, os.path.join(tmp, "warm"))), items=1,
                          progress=False)
    rows = {"partial": run(args.budget, "partial"), "full": run(1.0, "full"), "one": run(None, "one")}
    ctx = artifacts.Context(workdir=wd)
    module, variables, new_cfg = artifacts.load_backbone(ctx, "new", "bench")
    source, _ = sources.get_source(new_cfg.data, "eval")
    bs = artifacts.eval_batch_size(new_cfg, None)
    tf = artifacts.eval_transform(new_cfg)
    artifacts.embed(module, variables, source, batch_size=bs, transform=tf)  # compile
    best = float("inf")
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      artifacts.embed(module, variables, source, batch_size=bs, transform=tf)
      best = min(best, time.perf_counter() - t0)
    rows["embed"] = {"seconds": best, "items": n, "items_per_s": n / best}

    ratio = rows["partial"]["seconds"] / rows["full"]["seconds"]
    fixed = rows["one"]["seconds"]
    # Marginal cost: what the items add over a call's fixed cost (the ratio a large gallery or model approaches).
    marginal = (rows["partial"]["seconds"] - fixed) / max(rows["full"]["seconds"] - fixed, 1e-9)
    print(f"{'row':<8} {'items':>7} {'seconds':>9} {'items/s':>10} {'chunks written':>15}")
    for k, r in rows.items():
      chunks = f"{r['chunks_rewritten']}/{r['chunks']}" if "chunks" in r else "-"
      print(f"{k:<8} {r['items']:>7} {r['seconds']:>9.2f} {r['items_per_s']:>10.1f} {chunks:>15}")
    print(f"partial/full time = {ratio:.3f} for budget {args.budget} (ideal {args.budget}); without the fixed "
          f"{fixed:.2f}s of a call: {marginal:.3f}; full backfill at "
          f"{rows['full']['items_per_s'] / rows['embed']['items_per_s']:.2f}× the embed ceiling", flush=True)
    result = {"benchmark": "gallery backfill", "backend": jax.default_backend(),
              "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(), "host": platform.node(),
              "cpu_count": os.cpu_count(), "n": n, "chunk": chunk, "budget": args.budget, "tiny": args.tiny,
              "image_size": int(new_cfg.data.image_size), "embedding_dim": int(new_cfg.model.embedding_dim),
              "model": new_cfg.model.to_dict(), "eval_batch_size": bs, "rows": rows,
              "ratios": {"partial/full seconds": ratio, "partial/full seconds less the fixed cost": marginal,
                         "full/embed items_per_s":
                         rows["full"]["items_per_s"] / rows["embed"]["items_per_s"]},
              "jax": jax.__version__}
    print(json.dumps(result["ratios"], indent=1))
    if args.out:
      write_json(args.out, result)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
