"""Evaluation stage: the paper's query/gallery case table on the evaluation split.

Embeds the evaluation images with φ_old and φ_new, upgrades the old "gallery" with h(φ_old, ψ) — from stored
vectors only, no images, exactly as a production upgrade would — and reports CMC top-1/top-5 and mAP (percent)
for the cases old/old, new/old, new/new, h/h and new/h (query model / gallery model; the evaluation set is both
query and gallery, each query's own item removed), and with ``cfg.bct`` (a BCT backbone stage) the baseline's
rows bct-new/old and bct-new/bct-new. Writes ``results.json`` and ``results.md`` into the experiment
workdir and prints the table.

ψ is computed for the evaluation images by the side-info model the transformation was trained with (zeros for
``none``), as it would have been stored beside φ_old at old time. ``cfg.compare_transformations`` lists further
transformation stages (e.g. one without and one with side-information); each adds a row ``new/h[<kind>]`` (the
stage name in brackets when two share a kind). For every side-info model the results also hold
``side_info_analysis``: linear CKA between φ_old and ψ (Table 6's complementarity measure) and, per field of
``cfg.probe_fields``, the leave-one-out 1-NN accuracy and a linear probe's accuracy of ψ, φ_old and φ_new (on the
demo: does ψ know the shapes that φ_old threw away?).
"""

import jax
import numpy as np

from fct_jax import retrieval
from fct_jax.data import sources
from fct_jax.retrieval import cases as cases_lib
from fct_jax.retrieval import cka as cka_lib
from fct_jax.stages import common, transformation

DEFAULT_CASES = (("old", "old"), ("new", "old"), ("new", "new"), ("h", "h"), ("new", "h"))


def run(cfg, stage_dir: str, ctx: common.Context):
  source, _ = sources.get_source(cfg.data, cfg.split)
  labels = common.source_labels(source)
  bs = common.eval_batch_size(cfg, ctx.mesh)
  emb = {}
  for role in ("old", "new"):
    module, variables, _ = common.load_backbone(ctx, cfg[role], cfg.name)
    emb[role] = common.embed(module, variables, source, batch_size=bs, mesh=ctx.mesh,
                             transform=common.eval_transform(cfg))
    common.check_finite_embeddings(emb[role], f"{role} embeddings")
  cases = [tuple(c) for c in DEFAULT_CASES]
  if cfg.get("bct"):  # the BCT baseline: φ_new^BCT against the old gallery, and against itself
    module, variables, _ = common.load_backbone(ctx, cfg.bct, cfg.name)
    emb["bct-new"] = common.embed(module, variables, source, batch_size=bs, mesh=ctx.mesh,
                                  transform=common.eval_transform(cfg))
    common.check_finite_embeddings(emb["bct-new"], "BCT new-model embeddings")
    cases += [("bct-new", "old"), ("bct-new", "bct-new")]
  psi_cache, transformed, kinds, feature_modes, side_models = {}, {}, {}, {}, {}

  def upgrade(stage):
    """h(φ_old, ψ) of the eval images with the transformation ``stage``; ψ computed once per side-info model."""
    if stage not in transformed:
      h, tcfg, side = transformation.load_h(ctx, stage, cfg.name, side_cache=side_models)
      key = side.key
      if key not in psi_cache:
        psi_cache[key] = (side, side.embed(source, batch_size=bs, mesh=ctx.mesh,
                                              transform=common.eval_transform(cfg)))
        common.check_finite_embeddings(psi_cache[key][1], f"side-information ({side.method}) of {stage!r}")
      transformed[stage] = h(emb["old"], psi_cache[key][1])
      kinds[stage] = tcfg.side_info.kind
      feature_modes[stage] = transformation.feature_mode(tcfg)  # online (ml-fct's) or cached (ours)
      common.check_finite_embeddings(transformed[stage], f"transformed (h) embeddings of {stage!r}")
    return transformed[stage]

  emb["h"] = upgrade(cfg.transformation)
  compare = list(cfg.get("compare_transformations", ()))
  for stage in compare:
    upgrade(stage)
  for stage in compare:
    label = kinds[stage] if [kinds[s] for s in compare].count(kinds[stage]) == 1 else stage
    emb[f"h[{label}]"] = transformed[stage]
    cases.append(("new", f"h[{label}]"))

  results = cases_lib.evaluate_cases(emb, labels, cases)
  analysis = _side_info_analysis(cfg, source, emb, psi_cache)
  table = cases_lib.format_markdown_table(results)
  payload = {"cases": results, "num_eval": int(len(labels)), "side_info": kinds[cfg.transformation],
             "feature_mode": feature_modes,
             "side_info_analysis": analysis}
  common.write_stage_results(stage_dir, payload, table)
  if jax.process_index() == 0:
    for name, a in analysis.items():
      for probe in ("knn_top1", "linear_probe"):
        scores = "; ".join(f"{f} ψ {a[probe][f]:.1f} / old {a[probe + '_old'][f]:.1f} / new "
                           f"{a[probe + '_new'][f]:.1f}" for f in a[probe])
        print(f"[{cfg.name}] side-info {name}: {probe} % {scores}", flush=True)
      print(f"[{cfg.name}] side-info {name}: CKA(φ_old, ψ) {a['cka_old']:.3f}", flush=True)
  # The experiment's results.md/.json (CMC curves, CKA, cost, backfilling, plots) are the report's; every process
  # computes (the kernel's mesh may span hosts), process 0 writes.
  from fct_jax import report  # pylint: disable=g-import-not-at-top
  report.write(ctx.workdir, payload, emb, labels, cfg=cfg, mesh=ctx.mesh)
  return True


def _knn_top1(x, labels) -> float:
  """Leave-one-out 1-NN accuracy (%) of ``labels`` with L2 distance on ``x`` (retrieval CMC top-1)."""
  return float(retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=(1,))["cmc_top1"])


def _linear_probe(x, labels, ridge: float = 1e-3) -> float:
  """Accuracy (%) of a linear classifier fitted on the first half of ``x`` [N, D] and tested on the second half.

  One-vs-all ridge regression on standardised features, in closed form (no solver to tune or to converge); the
  evaluation split's order is random, so the halves are a fair split.
  """
  x = np.asarray(x, np.float64)
  n = len(x) // 2
  mu, sd = x[:n].mean(0), x[:n].std(0) + 1e-6
  z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
  classes, y = np.unique(np.asarray(labels), return_inverse=True)
  targets = np.eye(len(classes))[y[:n]]
  w = np.linalg.solve(z[:n].T @ z[:n] + ridge * n * np.eye(z.shape[1]), z[:n].T @ targets)
  return float(100.0 * np.mean(np.argmax(z[n:] @ w, axis=1) == y[n:]))


def _side_info_analysis(cfg, source, emb, psi_cache):
  """Per side-info model (except zeros): its width, CKA with φ_old, and 1-NN and linear probes of ψ, φ_old and
  φ_new for each of ``cfg.probe_fields``."""
  models = [(side, psi) for side, psi in psi_cache.values() if side.method != "none"]
  if not models:
    return {}
  fields = [f for f in cfg.get("probe_fields", ("label",)) if f in source[0]]
  field_labels = {f: common.source_labels(source, f) for f in fields}
  probes = {"knn_top1": _knn_top1, "linear_probe": _linear_probe}

  def score(x):
    return {p: {f: fn(x, y) for f, y in field_labels.items()} for p, fn in probes.items()}

  base = {role: score(emb[role]) for role in ("old", "new")}
  out = {}
  for side, psi in models:
    entry = {"dim": side.dim, "cka_old": float(cka_lib.linear_cka(emb["old"], psi)), **score(psi)}
    for role in ("old", "new"):
      entry.update({f"{p}_{role}": v for p, v in base[role].items()})
    out[f"{side.method}:{side.stage}"] = entry
  return out
