r"""Command line for gallery stores.

  # old time: embed the eval split with φ_old and ψ into a store
  python -m fct_jax.gallery build --experiment /tmp/fct_demo --old old --side-info side_info --split eval \
      --to /tmp/gallery
  # ... or from embeddings another model already made (old.npy, psi.npy, id.npy in a directory; .npz; zarr)
  python -m fct_jax.gallery build --from-vectors /data/gallery_vectors --old-model clip-b32 --side-model ae-128 \
      --to /tmp/gallery
  # model update: apply h to the stored vectors (no images); a new version lands beside the old one
  python -m fct_jax.gallery upgrade --from /tmp/gallery --transformation /tmp/fct_demo/transformation \
      --to /tmp/gallery
  # FastFill: re-embed the next 20% of the items with φ_new, most uncertain first (repeat to continue)
  python -m fct_jax.gallery backfill --store /tmp/gallery --experiment /tmp/fct_demo --new new --order sigma \
      --budget 0.2
  python -m fct_jax.gallery search --store /tmp/gallery --queries q.npy --k 5 --out hits.npz
  python -m fct_jax.gallery cost --transformation /tmp/fct_demo/transformation --out-dir /tmp/cost
  python -m fct_jax.gallery cost --paper --out-dir /tmp/cost_paper     # Figure 3: ResNet50-128 @224 vs FCT
  python -m fct_jax.gallery precision --transformation /tmp/fct_demo/transformation   # float16/bfloat16 cost
  python -m fct_jax.gallery info --store /tmp/gallery --verify
  # an experiment's features as vector sets (what configs/vectors.py reads): train/, eval/, classifier.npz
  python -m fct_jax.gallery export --experiment /tmp/fct_demo --transformation transformation --to /tmp/vectors

A killed build, upgrade or backfill is resumed by rerunning the same command. User errors print one ``error: ...`` line
and exit with status 2.
"""

import argparse
import sys

import numpy as np

from fct_jax.errors import FCTError
from fct_jax.gallery import backfill, build, cost, export, loader, precision, search, upgrade
from fct_jax.gallery import store as store_lib


def _parser():
  ap = argparse.ArgumentParser(prog="python -m fct_jax.gallery", description=__doc__.splitlines()[0])
  sub = ap.add_subparsers(dest="cmd", required=True)
  b = sub.add_parser("build", help="embed a split with φ_old and ψ into a store, or store existing embeddings")
  b.add_argument("--experiment", default=None, help="experiment workdir with the finished stages (embeds images)")
  b.add_argument("--old", default=None, help="backbone stage that embeds the gallery (default: old)")
  b.add_argument("--side-info", default=None, help="side_info stage name, or none[:DIM] (ψ = 0; the default)")
  b.add_argument("--split", default=None, help="split of the old stage's data (default: eval)")
  b.add_argument("--batch-size", type=int, default=None)
  b.add_argument("--from-vectors", default=None, help="stored embeddings instead of --experiment: an .npz, or a "
                 "directory of .npy files or zarr arrays, with fields old, optional psi and id")
  b.add_argument("--old-model", default=None, help="with --from-vectors: the name of the model that made 'old'")
  b.add_argument("--side-model", default=None, help="with --from-vectors: the name of the model that made 'psi'")
  b.add_argument("--to", required=True, help="store directory (local or gs://)")
  b.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
  b.add_argument("--chunk-size", type=int, default=65536)
  u = sub.add_parser("upgrade", help="apply a transformation stage to a store")
  u.add_argument("--from", dest="src", required=True, help="source store")
  u.add_argument("--from-version", default=None, help="source version (default: its CURRENT)")
  u.add_argument("--transformation", required=True, help="transformation stage dir (EXPERIMENT_DIR/NAME)")
  u.add_argument("--to", required=True, help="destination store (may equal --from)")
  u.add_argument("--dtype", default=None, help="storage dtype of the new version (default: the source's)")
  u.add_argument("--prefetch", type=int, default=2)
  f = sub.add_parser("backfill", help="re-embed the next items of an upgraded store with φ_new (FastFill order)")
  f.add_argument("--store", required=True, help="gallery store (the new version lands in it)")
  f.add_argument("--version", default=None, help="version to continue from (default: its CURRENT)")
  f.add_argument("--experiment", required=True, help="experiment workdir with the new backbone stage")
  f.add_argument("--new", default="new", help="backbone stage that re-embeds (the model the store was upgraded to)")
  f.add_argument("--split", default=None, help="the split the store was built from (default: the build's)")
  f.add_argument("--order", default=None, help="sigma (largest stored s first) | random; default: sigma on the "
                 "first step, then the recorded order")
  f.add_argument("--seed", type=int, default=None, help="seed of --order random (default 0)")
  f.add_argument("--budget", type=float, default=None, help="fraction of the gallery to backfill now, in (0, 1]")
  f.add_argument("--items", type=int, default=None, help="number of items to backfill now (instead of --budget)")
  f.add_argument("--batch-size", type=int, default=None)
  s = sub.add_parser("search", help="top-k stored ids and L2 distances of queries")
  s.add_argument("--store", required=True)
  s.add_argument("--version", default=None)
  s.add_argument("--queries", required=True, help=".npy file of [M, d] query embeddings (new model)")
  s.add_argument("--k", type=int, default=5)
  s.add_argument("--out", default=None, help=".npz with ids and distances")
  c = sub.add_parser("cost", help="per-example MACs and storage: backfilling vs BCT vs FCT (Figure 3)")
  c.add_argument("--transformation", default=None, help="transformation stage dir (EXPERIMENT_DIR/NAME)")
  c.add_argument("--paper", action="store_true", help="Figure 3's setting (ResNet50-128 @224 vs h(128,…,2048))"
                 " from shapes alone, no workdir")
  c.add_argument("--image-size", type=int, default=None, help="backfilling resolution (default: the data's)")
  c.add_argument("--image-bytes", type=int, default=1, help="bytes per stored pixel channel (uint8 = 1)")
  c.add_argument("--dtype", default="float32", help="storage dtype of side-information")
  c.add_argument("--out-dir", default=None, help="writes cost.json and cost.png here")
  a = sub.add_parser("precision", help="accuracy cost (CMC/mAP of new/h) of float16/bfloat16 storage")
  a.add_argument("--transformation", required=True, help="transformation stage dir (EXPERIMENT_DIR/NAME)")
  a.add_argument("--split", default="eval")
  a.add_argument("--workdir", default=None, help="where the temporary stores go")
  i = sub.add_parser("info", help="list a store's versions")
  i.add_argument("--store", required=True)
  i.add_argument("--verify", action="store_true", help="read every chunk and check its checksum")
  e = sub.add_parser("export", help="an experiment's h training rows and eval embeddings as vector sets")
  e.add_argument("--experiment", required=True, help="experiment workdir")
  e.add_argument("--transformation", default="transformation", help="a finished cached-mode transformation stage")
  e.add_argument("--eval-stage", default="eval", help="the evaluation stage whose split and transform to embed")
  e.add_argument("--to", required=True, help="an empty folder for train/, eval/, classifier.npz, export.json")
  return ap


# Build flags of one source only: embedding images with an experiment's stages, or storing existing vectors.
_IMAGE_FLAGS = {"old": "--old", "side_info": "--side-info", "split": "--split", "batch_size": "--batch-size"}
_VECTOR_FLAGS = {"old_model": "--old-model", "side_model": "--side-model"}


def _build(args):
  if (args.experiment is None) == (args.from_vectors is None):
    raise FCTError("build needs one source: --experiment EXPERIMENT_DIR (embed images with its stages) or "
                   "--from-vectors PATH (stored embeddings)" + (", not both" if args.experiment else ""))
  given = lambda flags: [flag for key, flag in flags.items() if getattr(args, key) is not None]
  dest = store_lib.Store(args.to)
  if args.from_vectors is not None:
    if given(_IMAGE_FLAGS):
      raise FCTError(f"{', '.join(given(_IMAGE_FLAGS))}: for --experiment builds only; with --from-vectors name the "
                     "models with --old-model (and --side-model for psi)")
    build.build_from_vectors(args.from_vectors, dest, old_model=args.old_model, side_model=args.side_model,
                             dtype=args.dtype, chunk_size=args.chunk_size)
    return
  if given(_VECTOR_FLAGS):
    raise FCTError(f"{', '.join(given(_VECTOR_FLAGS))}: for --from-vectors builds only; with --experiment the stages "
                   "are named with --old and --side-info")
  build.build(args.experiment, dest, dtype=args.dtype, chunk_size=args.chunk_size,
              **{key: getattr(args, key) for key in _IMAGE_FLAGS if getattr(args, key) is not None})


def _upgrade(args):
  src = store_lib.Store(args.src).open(args.from_version)
  t = loader.load_transformation(args.transformation)
  upgrade.upgrade(src, t, store_lib.Store(args.to), dtype=args.dtype, prefetch=args.prefetch)


def _backfill(args):
  backfill.backfill(args.experiment, store_lib.Store(args.store), version=args.version, new=args.new,
                    split=args.split, order=args.order, seed=args.seed, budget=args.budget, items=args.items,
                    batch_size=args.batch_size)


def _search(args):
  try:
    q = np.load(args.queries)
  except (OSError, ValueError) as e:
    raise FCTError(f"cannot read queries {args.queries}: {type(e).__name__}") from e
  ids, dist = search.search(store_lib.Store(args.store).open(args.version), q, args.k)
  if args.out:
    np.savez(args.out, ids=ids, distances=dist)
  for r in range(min(5, len(ids))):
    print(f"query {r}: " + " ".join(f"{a}:{b:.4g}" for a, b in zip(ids[r], dist[r])))


def _cost(args):
  if args.paper:
    rep = cost.paper_report(args.image_size or 224, dtype=args.dtype)
  elif args.transformation:
    rep = cost.cost_report(args.transformation, image_size=args.image_size, image_bytes=args.image_bytes,
                           dtype=args.dtype)
  else:
    raise FCTError("cost needs --transformation EXPERIMENT_DIR/NAME or --paper")
  print(cost.format_table(rep))
  if args.out_dir:
    print("wrote", ", ".join(cost.save(rep, args.out_dir)))


def _precision(args):
  res = precision.accuracy_cost(args.transformation, split=args.split, workdir=args.workdir)
  print(f"{'dtype':<9} {'top-1':>7} {'top-5':>7} {'mAP':>7} {'Δtop-1':>7} {'ΔmAP':>7}   (new/h, %)")
  for dt, r in res.items():
    print(f"{dt:<9} {r['cmc_top1']:7.2f} {r['cmc_top5']:7.2f} {r['mAP']:7.2f} {r['delta_top1']:7.2f} "
          f"{r['delta_mAP']:7.2f}")


def _info(args):
  st = store_lib.Store(args.store)
  current = st.current()
  if current is None:
    raise FCTError(f"{args.store} is not a gallery store (no CURRENT version)")
  for v in st.versions():
    mark = "*" if v.name == current else " "
    emb = v.model.get("embedding", {})
    print(f"{mark} {v.name}: {v.count} items, {v.embedding_dim}-d + {v.side_info_dim}-d side-info, {v.dtype}, "
          f"embedding model {emb.get('stage')!r} {str(emb.get('fingerprint'))[:12]}")
    for line in backfill.describe(v):
      print(f"    {line}")
    if args.verify:
      v.verify()
      print("    checksums ok")


def _export(args):
  rec = export.export_vectors(args.experiment, args.to, transformation=args.transformation,
                              eval_stage=args.eval_stage)
  print(f"wrote {args.to}/train ({rec['views']} views × {rec['epoch_rows']} images), {args.to}/eval"
        + (", classifier.npz" if rec["classifier"] else "") + f"; train on them with configs/vectors.py:"
        f"train={args.to}/train,eval={args.to}/eval,epoch_rows={rec['epoch_rows']}"
        + (f",side_dim={rec['side_info_dim']}" if rec["side_info_kind"] != "none" else ""))


COMMANDS = {"build": _build, "upgrade": _upgrade, "backfill": _backfill, "search": _search, "cost": _cost,
            "precision": _precision, "info": _info, "export": _export}


def run(args):
  """Runs one parsed subcommand (raises FCTError on user errors)."""
  COMMANDS[args.cmd](args)


def main(argv=None):
  args = _parser().parse_args(argv)
  try:
    run(args)
  except FCTError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  main()
