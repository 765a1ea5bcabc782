"""Cached vs online feature mode of the transformation stage: epoch cost and final compatibility, one run.

Takes a finished demo workdir (``python -m fct_jax.main --config=configs/demo.py --workdir=W``), trains the same
transformation stage (``--stage``, default ``transformation``: h with SimCLR ψ) again in both modes with the same
recipe and augmentation — ``online`` (ml-fct: old, side and new models run on augmented images every step) and
``cached`` (K augmented views per image embedded once) — and reports, side by side:

* seconds per training step at steady state (first logged interval excluded: compilation) and per epoch, so the
  per-epoch cost ratio online / cached (both modes take the same steps per epoch), and the one-off caching pass;
* the compiled FLOPs of one step's work (XLA's cost analysis): the frozen models' forward on a batch of images
  (online only) and h's forward + backward (both), whose ratio bounds what caching can save when both run at the
  same efficiency;
* new/h CMC top-1, top-5 and mAP on the eval split for both.

  python benchmarks/transformation_cached.py --workdir=/tmp/fct_demo --out=benchmarks/results/transformation_cached.json

The two extra stage directories (``<stage>_bench_online``, ``<stage>_bench_cached``) are written into the workdir.
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fct_jax import checkpoint  # noqa: E402
from fct_jax.data import sources  # noqa: E402
from fct_jax.retrieval import cases as cases_lib  # noqa: E402
from fct_jax.stages import common, transformation  # noqa: E402


def steady_seconds_per_step(stage_dir):
  """Seconds per step between the second and the last logged point (the first interval holds compilation)."""
  recs = [json.loads(l) for l in open(os.path.join(stage_dir, "metrics.jsonl"))]
  recs = [r for r in recs if "steps_per_sec" in r]
  a, b = recs[1], recs[-1]
  ta, tb = a["step"] / a["steps_per_sec"], b["step"] / b["steps_per_sec"]  # the loop's clock since its start
  return (tb - ta) / (b["step"] - a["step"])


def step_flops(cfg, ctx):
  """(frozen models' forward, h's forward + backward) FLOPs on one training batch, from XLA's cost analysis."""
  frozen = transformation.load_frozen(cfg, ctx)
  h = transformation.build_h(cfg, frozen.dims["old"], frozen.dims["new"])
  source, _ = sources.get_source(cfg.data, cfg.split)
  b = int(cfg.train.batch_size)
  images = jax.ShapeDtypeStruct((b,) + np.shape(source[0]["image"]), jnp.float32)
  vec = lambda d: jax.ShapeDtypeStruct((b, d), jnp.float32)
  old, psi, new = vec(frozen.dims["old"]), vec(int(cfg.side_info.dim)), vec(frozen.dims["new"])
  variables = jax.eval_shape(lambda: h.init({"params": jax.random.key(0)}, jnp.zeros(old.shape),
                                            jnp.zeros(psi.shape), train=False))

  def h_grads(v, old, psi, new):
    def loss(p):
      out, _ = h.apply({**v, "params": p}, old, psi, train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.sum(jnp.square(out["embedding"] - new), -1))
    return jax.grad(loss)(v["params"])

  def flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  return flops(frozen.apply, frozen.variables, images), flops(h_grads, variables, old, psi, new)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", default="transformation")
  p.add_argument("--eval_stage", default="eval")
  p.add_argument("--out", default="")
  args = p.parse_args()
  wd = os.path.abspath(args.workdir)
  base = checkpoint.read_json(os.path.join(wd, args.stage, "config.json"))
  ctx = common.Context(workdir=wd)
  out = {"stage": args.stage, "augment": base["augment"], "cache_views": base.get("cache_views", 1)}
  for mode in ("online", "cached"):
    name = f"{args.stage}_bench_{mode}"
    d = os.path.join(wd, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cfg = ml_collections.ConfigDict(dict(base, name=name, feature_mode=mode))
    checkpoint.write_json(os.path.join(d, "config.json"), cfg.to_dict())
    t0 = time.perf_counter()
    assert transformation.run(cfg, d, ctx)
    total = time.perf_counter() - t0
    checkpoint.mark_done(d)
    sps = steady_seconds_per_step(d)
    steps_per_epoch = len(sources.get_source(cfg.data, cfg.split)[0]) // int(cfg.train.batch_size)
    out[mode] = {"stage_seconds": total, "seconds_per_step": sps, "steps_per_epoch": steps_per_epoch,
                 "seconds_per_epoch": sps * steps_per_epoch}
    if mode == "cached":
      out[mode]["cache_seconds"] = checkpoint.read_json(os.path.join(d, "features", "meta.json"))["seconds"]
  ecfg = ml_collections.ConfigDict(checkpoint.read_json(os.path.join(wd, args.eval_stage, "config.json")))
  source, _ = sources.get_source(ecfg.data, ecfg.split)
  labels = common.source_labels(source)
  emb = {}
  for role in ("old", "new"):
    module, variables, _ = common.load_backbone(ctx, ecfg[role], "benchmark")
    emb[role] = common.embed(module, variables, source, batch_size=500, transform=common.eval_transform(ecfg))
  for mode in ("online", "cached"):
    h, _, side = transformation.load_h(ctx, f"{args.stage}_bench_{mode}", "benchmark")
    emb[f"h_{mode}"] = h(emb["old"], side.embed(source, batch_size=500))
  res = cases_lib.evaluate_cases(emb, labels, [("new", "h_online"), ("new", "h_cached"), ("old", "old"),
                                               ("new", "old")])
  out["results"] = cases_lib.to_jsonable(res)
  ratio = out["online"]["seconds_per_step"] / out["cached"]["seconds_per_step"]
  out["epoch_cost_ratio_online_over_cached"] = ratio
  frozen_flops, h_flops = step_flops(ml_collections.ConfigDict(base), ctx)
  out["flops_per_step"] = {"frozen_forward": frozen_flops, "h_forward_backward": h_flops,
                           "ratio_online_over_cached": (frozen_flops + h_flops) / h_flops}
  out["devices"] = [str(d.device_kind) for d in jax.devices()]
  print(f"seconds/step: online {out['online']['seconds_per_step'] * 1e3:.1f} ms, cached "
        f"{out['cached']['seconds_per_step'] * 1e3:.1f} ms → an epoch is {ratio:.1f}× cheaper cached "
        f"(one-off caching pass {out['cached']['cache_seconds']:.1f}s for {out['cache_views']} views)")
  print(f"seconds/epoch: online {out['online']['seconds_per_epoch']:.2f} s, cached "
        f"{out['cached']['seconds_per_epoch']:.3f} s; FLOPs per step: frozen forward {frozen_flops / 1e9:.3f} G, "
        f"h forward+backward {h_flops / 1e9:.3f} G (online/cached {out['flops_per_step']['ratio_online_over_cached']:.1f}×)")
  for k in ("new/h_online", "new/h_cached"):
    r = res[k]
    print(f"{k}: CMC top-1 {r['cmc_top1']:.1f}  top-5 {r['cmc_top5']:.1f}  mAP {r['mAP']:.1f}")
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  main()
