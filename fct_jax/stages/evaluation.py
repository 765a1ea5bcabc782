"""Evaluation stage: the paper's query/gallery case table on the evaluation split.

Embeds the evaluation images with φ_old and φ_new, upgrades the old "gallery" with h(φ_old, ψ) — from stored
vectors only, no images, exactly as a production upgrade would — and reports CMC top-1/top-5 and mAP (percent)
for the cases old/old, new/old, new/new, h/h and new/h (query model / gallery model; the evaluation set is both
query and gallery, each query's own item removed). Writes ``results.json`` and ``results.md`` into the experiment
workdir and prints the table.
"""

import os

import jax
import numpy as np

from fct_jax import checkpoint
from fct_jax.data import sources
from fct_jax.retrieval import cases as cases_lib
from fct_jax.stages import common, transformation

DEFAULT_CASES = (("old", "old"), ("new", "old"), ("new", "new"), ("h", "h"), ("new", "h"))


def run(cfg, stage_dir: str, ctx: common.Context):
  source, _ = sources.get_source(cfg.data, cfg.split)
  labels = common.source_labels(source)
  bs = common.eval_batch_size(cfg, ctx.mesh)
  emb = {}
  for role in ("old", "new"):
    module, variables, _ = common.load_backbone(ctx, cfg[role], cfg.name)
    emb[role] = common.embed(module, variables, source, batch_size=bs, mesh=ctx.mesh)
    common.check_finite_embeddings(emb[role], f"{role} embeddings")
  h, _ = transformation.load_h(ctx, cfg.transformation, cfg.name)
  side = np.zeros((len(labels), 0), np.float32)
  emb["h"] = h(emb["old"], side)
  common.check_finite_embeddings(emb["h"], "transformed (h) embeddings")

  results = cases_lib.evaluate_cases(emb, labels, [tuple(c) for c in DEFAULT_CASES])
  table = cases_lib.format_markdown_table(results)
  payload = {"cases": results, "num_eval": int(len(labels)), "side_info": "none"}
  if jax.process_index() == 0:
    for d in (stage_dir, ctx.workdir):
      checkpoint.write_json(os.path.join(d, "results.json"), payload)
      with open(os.path.join(d, "results.md"), "w") as f:
        f.write(table + "\n")
    print(table, flush=True)
  return True
