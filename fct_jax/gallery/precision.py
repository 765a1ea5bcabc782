"""The accuracy cost of 16-bit gallery storage, measured through the real store and upgrade path.

For each storage dtype the split is built into a store (φ_old, ψ rounded to the dtype), upgraded with h (its
output rounded again), read back, and evaluated as the paper's ``new/h`` case (queries: φ_new of the same
images, float32; self-matches removed). The rows report CMC top-1/top-5 and mAP and their difference to float32.
"""

import os
import tempfile
from typing import Sequence

import numpy as np

from fct_jax import artifacts, retrieval
from fct_jax.data import sources
from fct_jax.gallery import build as build_lib
from fct_jax.gallery import loader, upgrade
from fct_jax.gallery import store as store_lib


def accuracy_cost(transformation_dir: str, *, split: str = "eval", side_info: str = None,
                  dtypes: Sequence[str] = ("float32", "float16", "bfloat16"), workdir: str = None,
                  chunk_size: int = store_lib.DEFAULT_CHUNK) -> dict:
  """``{dtype: {"cmc_top1", "cmc_top5", "mAP", "delta_top1", "delta_mAP"}}`` of new/h with stored ``dtype``.

  Args:
    transformation_dir: EXPERIMENT_DIR/NAME of a finished transformation stage.
    split: evaluation split of the old stage's data.
    side_info: ψ for the build (default: what the transformation was trained with).
    dtypes: storage dtypes to compare (float32 first: the reference).
    workdir: where the temporary stores go (default: a temp dir).
    chunk_size: store chunk size.
  """
  t = loader.load_transformation(transformation_dir, needed_by="gallery precision")
  exp, _ = loader.split_stage_dir(transformation_dir)
  old_stage, new_stage = t.expects["embedding"]["stage"], t.produces["embedding"]["stage"]
  si = t.expects["side_info"]
  side_info = side_info or (si["stage"] if si["kind"] != "none" else f"none:{si['dim']}")
  ctx = artifacts.Context(workdir=exp)
  module, variables, new_cfg = artifacts.load_backbone(ctx, new_stage, "gallery precision")
  old_cfg = artifacts.stage_config(ctx, old_stage, "gallery precision")
  source, _ = sources.get_source(old_cfg.data, split)
  labels = artifacts.source_labels(source)
  queries = artifacts.embed(module, variables, source, batch_size=artifacts.eval_batch_size(new_cfg, None),
                            transform=artifacts.eval_transform(new_cfg))
  workdir = workdir or tempfile.mkdtemp(prefix="fct_gallery_precision_")
  out = {}
  for dt in dtypes:
    st = store_lib.Store(os.path.join(workdir, dt))
    v = build_lib.build(exp, st, old=old_stage, side_info=side_info, split=split, dtype=dt, chunk_size=chunk_size,
                        progress=False)
    v = upgrade.upgrade(v, t, st, progress=False)
    g = v.read_all()
    gallery = g["embeddings"].astype(np.float32)[np.argsort(g["ids"])]
    r = retrieval.evaluate(queries, gallery, labels, labels, query_is_gallery=True, ks=(1, 5))
    out[dt] = {k: float(r[k]) for k in ("cmc_top1", "cmc_top5", "mAP")}
  ref = out[dtypes[0]]
  for dt in dtypes:
    out[dt]["delta_top1"] = out[dt]["cmc_top1"] - ref["cmc_top1"]
    out[dt]["delta_mAP"] = out[dt]["mAP"] - ref["mAP"]
  return out
