"""Evaluation stage: the paper's query/gallery case table on the evaluation split.

Embeds the evaluation images with φ_old and φ_new, upgrades the old "gallery" with h(φ_old, ψ) — from stored
vectors only, no images, exactly as a production upgrade would — and evaluates CMC top-1/top-5 and mAP (percent)
for the cases old/old, new/old, new/new, h/h and new/h (query model / gallery model; the evaluation set is both
query and gallery, each query's own item removed), and with ``cfg.bct`` (a BCT backbone stage) the baseline's
rows bct-new/old and bct-new/bct-new. Writes the table into the stage directory, prints it, and returns
:class:`fct_jax.retrieval.summary.EvaluationResults` (the table and the CMC curves, CKA and backfilling curve of
the embeddings), from which the experiment writes the report.

ψ is computed for the evaluation images by the side-info model the transformation was trained with (zeros for
``none``), as it would have been stored beside φ_old at old time. ``cfg.compare_transformations`` lists further
transformation stages (e.g. one without and one with side-information); each adds a row ``new/h[<kind>]`` (the
stage name in brackets when two share a kind). For every side-info model the results also hold
``side_info_analysis``: linear CKA between φ_old and ψ (Table 6's complementarity measure) and, per field of
``cfg.probe_fields``, the leave-one-out 1-NN accuracy and a linear probe's accuracy of ψ, φ_old and φ_new (on the
demo: does ψ know the shapes that φ_old threw away?).

:class:`EmbeddingCache` is shared with the sequence-evaluation stage (``stages/sequence.py``).
"""

import jax
import numpy as np

from fct_jax import artifacts, retrieval, writers
from fct_jax.data import sources, vectors
from fct_jax.errors import FCTError
from fct_jax.retrieval import cases as cases_lib
from fct_jax.retrieval import cka as cka_lib
from fct_jax.retrieval import summary
from fct_jax.stages import common

# A console bar for the retrieval kernel's long jobs (the kernel takes a factory: it sits below writers).
retrieval_progress = writers.progress_factory("queries", "[retrieval] ")


class EmbeddingCache:
  """The evaluation images embedded once per model in one stage run: φ per backbone stage, ψ per side-info model.

  Rows and transformations of an evaluation share models (every h reads φ_old; h's over one side-info stage share
  ψ; sequence rows share backbones), and embedding the images is the expensive part. Loaded side-information models
  are kept too (:attr:`side_models`, by stage), so each stage's checkpoint is read once.
  """

  def __init__(self, cfg, ctx: artifacts.Context, source):
    self._cfg, self._ctx, self._source = cfg, ctx, source
    self._batch_size = artifacts.eval_batch_size(cfg, ctx.mesh)
    self._transform = artifacts.eval_transform(cfg)
    self._phi = {}
    self.psi = {}  # side-info key -> (side-info model, ψ), in order of first use
    self.side_models = {}  # side_info stage -> loaded model

  def phi(self, stage: str, what: str = "") -> np.ndarray:
    """φ of the images by backbone stage ``stage``, checked finite (``what`` names it in the error)."""
    if stage not in self._phi:
      module, variables, _ = artifacts.load_backbone(self._ctx, stage, self._cfg.name)
      x = artifacts.embed(module, variables, self._source, batch_size=self._batch_size, mesh=self._ctx.mesh,
                          transform=self._transform)
      artifacts.check_finite_embeddings(x, what or f"{stage} embeddings")
      self._phi[stage] = x
    return self._phi[stage]

  def psi_of(self, side: artifacts.SideInfo, what: str = "") -> np.ndarray:
    """ψ of the images by side-info model ``side`` (zeros for ``none``; φ_old itself for ``old``), checked finite."""
    if side.method == "old":
      return self.phi(side.stage)
    if side.key not in self.psi:
      x = side.embed(self._source, batch_size=self._batch_size, mesh=self._ctx.mesh, transform=self._transform)
      artifacts.check_finite_embeddings(x, what or f"side-information ({side.method}) of {side.key!r}")
      self.psi[side.key] = (side, x)
    return self.psi[side.key][1]

  def side_model(self, stage: str) -> artifacts.SideInfo:
    """The side_info stage ``stage``, loaded once."""
    if stage not in self.side_models:
      self.side_models[stage] = artifacts.load_side_info(self._ctx, stage, self._cfg.name)
    return self.side_models[stage]

  def transformation(self, stage: str):
    """``(h, cfg, side_info)`` of transformation stage ``stage``; its side-info model comes from the cache."""
    return artifacts.load_h(self._ctx, stage, self._cfg.name, side_cache=self.side_models)


def evaluate_cases(embeddings, labels, cases, mesh=None):
  """``(table, stats)``: the case table and the rank statistics it was read from (which the CMC curves reuse)."""
  stats = cases_lib.case_stats(embeddings, labels, cases, mesh=mesh, progress=retrieval_progress)
  return cases_lib.metrics_table(stats), stats


def summarize(cfg, ctx: artifacts.Context, embeddings, labels, payload: dict, stats,
              backfill_galleries=None) -> summary.EvaluationResults:
  """What an evaluation stage returns: ``payload`` and the report's sections computed from ``embeddings`` (every
  process computes: the kernel's mesh may span hosts). ``cfg.report`` holds ``max_k``, ``backfill_fractions`` and
  ``backfill_orderings``; ``backfill_galleries``: see ``summary.summarize``."""
  sections = summary.summarize(embeddings, labels, payload["cases"], stats, max_k=int(cfg.report.max_k),
                               backfill_fractions=tuple(cfg.report.backfill_fractions),
                               backfill_galleries=backfill_galleries,
                               backfill_orderings=tuple(cfg.report.backfill_orderings), mesh=ctx.mesh,
                               progress=retrieval_progress)
  return summary.EvaluationResults(payload=payload, sections=sections)


def run(cfg, stage_dir: str, ctx: artifacts.Context) -> summary.EvaluationResults:
  if cfg.data.name == "vectors":
    source, cache = None, None
    labels, emb, psi_of, load_h = _vector_inputs(cfg, ctx)
  else:
    source, _ = sources.get_source(cfg.data, cfg.split)
    labels = artifacts.source_labels(source)
    cache = EmbeddingCache(cfg, ctx, source)
    emb = {role: cache.phi(cfg[role], f"{role} embeddings") for role in ("old", "new")}
    psi_of, load_h = cache.psi_of, cache.transformation
  # new/old only where the two models share a width (stored vectors may not).
  cases = [c for c in cases_lib.DEFAULT_CASES if c != ("new", "old") or emb["new"].shape[1] == emb["old"].shape[1]]
  if cfg.bct:  # the BCT baseline: φ_new^BCT against the old gallery, and against itself
    if cache is None:
      raise FCTError(f"stage {cfg.name!r}: bct needs the BCT model's embeddings of images; not on stored vectors")
    emb["bct-new"] = cache.phi(cfg.bct, "BCT new-model embeddings")
    cases += [("bct-new", "old"), ("bct-new", "bct-new")]
  compare = list(cfg.compare_transformations)
  transformed, log_vars, tcfgs = {}, {}, {}
  for stage in [cfg.transformation] + compare:
    if stage not in transformed:  # h(φ_old, ψ) of the eval images from stored vectors; ψ once per side-info model
      h, tcfg, side = load_h(stage)
      transformed[stage], log_vars[stage] = h.with_uncertainty(
          emb["old"], psi_of(side, f"side-information ({side.method}) of {stage!r}"))
      tcfgs[stage] = tcfg
      artifacts.check_finite_embeddings(transformed[stage], f"transformed (h) embeddings of {stage!r}")
      if log_vars[stage] is not None:
        artifacts.check_finite_embeddings(log_vars[stage], f"predicted uncertainty (s) of {stage!r}")
  emb["h"] = transformed[cfg.transformation]
  galleries = {}
  brackets = [h_label(tcfgs[s]) for s in compare]  # the stage name where two transformations share a label
  for stage, bracket in zip(compare, brackets):
    label = bracket if brackets.count(bracket) == 1 else stage
    emb[f"h[{label}]"] = transformed[stage]
    cases.append(("new", f"h[{label}]"))
    galleries[f"h[{label}]"] = (transformed[stage], log_vars[stage])
  if not galleries:
    galleries = {"h": (emb["h"], log_vars[cfg.transformation])}

  results, stats = evaluate_cases(emb, labels, cases, ctx.mesh)
  analysis = _side_info_analysis(cfg, source, emb, cache.psi) if cache is not None else {}
  payload = {"cases": results, "num_eval": int(len(labels)),
             "side_info": tcfgs[cfg.transformation].side_info.kind,
             # online (ml-fct's) or cached (ours); fct or fastfill
             "feature_mode": {s: c.feature_mode for s, c in tcfgs.items()},
             "method": {s: c.method for s, c in tcfgs.items()}, "side_info_analysis": analysis}
  common.write_stage_results(stage_dir, payload, cases_lib.format_markdown_table(results))
  if jax.process_index() == 0:
    _print_analysis(cfg.name, analysis)
  return summarize(cfg, ctx, emb, labels, payload, stats, galleries)


def _vector_inputs(cfg, ctx: artifacts.Context):
  """``(labels, {"old", "new"}, psi_of, load_h)`` of an evaluation on stored vectors (``data.name="vectors"``): the
  vector set ``data[split]`` (fields old, new, label; psi for transformations with ``side_info.kind="stored"``) is
  query and gallery at once, as the images are in the paper's protocol (each query's own item excluded)."""
  path = cfg.data[cfg.split] if cfg.split in cfg.data else ""
  if not path:
    raise FCTError(f"stage {cfg.name!r}: split {cfg.split!r} names no vector set (set data.{cfg.split} to a file)")
  vs = vectors.open_vectors(path, need=("old", "new", "label"), what=f"stage {cfg.name!r}: vectors")
  emb = {k: vs.load(k) for k in ("old", "new")}
  labels = vs.load("label")
  side_cache = {}

  def psi_of(side: artifacts.SideInfo, what: str = "") -> np.ndarray:
    if side.method == "none":
      return np.zeros((vs.num_rows, side.dim), np.float32)
    if side.method != "stored":
      raise FCTError(f"stage {cfg.name!r}: on stored vectors ψ is 'stored' or 'none'; {what} is {side.method!r}")
    if not vs.has("psi"):
      raise FCTError(f"stage {cfg.name!r}: {what} reads stored ψ, but {path} has no 'psi'")
    if "psi" not in side_cache:
      side_cache["psi"] = vs.load("psi")
    if side_cache["psi"].shape[1] != side.dim:
      raise FCTError(f"stage {cfg.name!r}: {path} holds {side_cache['psi'].shape[1]}-d ψ but {what} takes "
                     f"{side.dim}-d")
    return side_cache["psi"]

  return labels, emb, psi_of, lambda stage: artifacts.load_h(ctx, stage, cfg.name)


def h_label(tcfg) -> str:
  """The bracket of a transformation's rows ``new/h[<label>]``: its side-information kind (``simclr``, ``none``,
  …), prefixed by ``fastfill`` for FastFill (``h[fastfill]`` with SimCLR ψ, the method's own setting;
  ``h[fastfill,none]`` without side-information)."""
  kind = tcfg.side_info.kind
  if tcfg.method == "fct":
    return kind
  return tcfg.method if kind == "simclr" else f"{tcfg.method},{kind}"


def _print_analysis(name: str, analysis: dict):
  for side, a in analysis.items():
    for probe in ("knn_top1", "linear_probe"):
      scores = "; ".join(f"{f} ψ {a[probe][f]:.1f} / old {a[probe + '_old'][f]:.1f} / new "
                         f"{a[probe + '_new'][f]:.1f}" for f in a[probe])
      print(f"[{name}] side-info {side}: {probe} % {scores}", flush=True)
    print(f"[{name}] side-info {side}: CKA(φ_old, ψ) {a['cka_old']:.3f}", flush=True)


def _knn_top1(x, labels) -> float:
  """Leave-one-out 1-NN accuracy (%) of ``labels`` with L2 distance on ``x`` (retrieval CMC top-1)."""
  return float(retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=(1,),
                                  progress=retrieval_progress)["cmc_top1"])


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
  models = [(side, psi) for side, psi in psi_cache.values() if side.method not in ("none", "old")]
  if not models:
    return {}
  fields = [f for f in cfg.probe_fields if f in source[0]]
  field_labels = {f: artifacts.source_labels(source, f) for f in fields}
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
