"""Sequence-evaluation stage: retrieval through a sequence of model updates v1 → v2 → v3 (the paper's Table 5).

Every row ranks the evaluation set embedded by a *query* backbone against a *gallery* built the way a production
system would: stored φ_1(x), ψ_1(x) of the first model version, upgraded hop by hop without images. A hop is a
pair ``[h, g]`` of transformation stages: φ ← h(φ, ψ) and, when a later hop needs side-information, ψ ← g(φ, ψ)
(both from the *previous* φ, ψ; the paper's h_{i+1}(φ_i, ψ_i), g_{i+1}(φ_i, ψ_i)). A hop without g leaves no ψ, so
the next hop's h must take none (``side_info.kind = "none"``: zeros).

Config (``configs/common.sequence_evaluation_stage``): ``backbones`` (stage names evaluated against themselves:
φ_i/φ_i) and ``rows``: ``{"name", "query", "hops"}``; e.g. ``v3/h3(h2(v1))`` is ``query="v3"``,
``hops=[["h2", "g2"], ["h3", ""]]``. Writes ``results.json`` / ``results.md`` into the stage directory and returns
:class:`fct_jax.retrieval.summary.EvaluationResults` (with the compatibility matrix of the rows), from which the
experiment writes the report. Embeddings are computed once per model (:class:`evaluation.EmbeddingCache`).

Besides the retrieval cases, ``hop_errors`` tells which hop of a row loses the most: for each hop, the relative
squared error of h's output against the embedding its target model computes from the images (and of g's
output against ψ_{i+1}'s), :func:`relative_squared_error` (0: exact; 1: no better than the target's mean).
"""

import ml_collections
import numpy as np

from fct_jax import artifacts
from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.retrieval import cases as cases_lib
from fct_jax.retrieval import summary
from fct_jax.stages import common, evaluation


def relative_squared_error(pred: np.ndarray, target: np.ndarray) -> float:
  """Σ‖pred − target‖² / Σ‖target − mean(target)‖² over the rows (N, d): 1 − R² of a regression of embeddings.

  0 when ``pred`` equals ``target``; 1 for predicting the target's mean; scale-free, so hops into embeddings of
  different widths and norms compare.
  """
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  denom = float(((target - target.mean(axis=0)) ** 2).sum())
  return float(((pred - target) ** 2).sum() / denom) if denom > 0 else float("nan")


# A transformation's role in a hop: its target's kind (``artifacts.Transformation.target_kind``), and the role's name.
_ROLES = {"h": ("backbone", "an h"), "g": ("side_info", "a g")}
_TARGETS = {"backbone": "a backbone", "side_info": "side-information"}


class _Hops:
  """The rows' hops over the shared embeddings: transformations loaded once, each application computed once."""

  def __init__(self, cfg, cache: evaluation.EmbeddingCache):
    self.cfg, self.cache = cfg, cache
    self.loaded = {}  # transformation stage -> (h, cfg, side-info model)
    self._applied = {}

  def load(self, stage: str, role: str, row: str):
    """Transformation ``stage`` used in ``row`` as ``role``: "h" (its target is a backbone) or "g" (its target is
    side-information); the other kind is a one-line error."""
    if stage not in self.loaded:
      self.loaded[stage] = self.cache.transformation(stage)
    kind = self.loaded[stage][0].target_kind
    if kind != _ROLES[role][0]:
      other = _ROLES["g" if role == "h" else "h"][1]
      raise FCTError(f"stage {self.cfg.name!r}: row {row!r}: {stage!r} is {other} (its target "
                     f"{self.loaded[stage][1].new!r} is {_TARGETS[kind]}), not {_ROLES[role][1]}")
    return self.loaded[stage]

  def apply(self, state, stage: str, row: str, phi, psi):
    """Loaded transformation ``stage`` (an h or a g) on (φ, ψ), and its relative error to its target.

    ``state`` names (φ, ψ): the stored vectors the row started from and the hops applied to them so far. Rows of a
    sequence share their first hops (v3/h3(h2(v1)) and v4/h4(h3(h2(v1))) both start with h2 on φ_1, ψ_1), so each
    application is computed once.
    """
    if (state, stage) not in self._applied:
      fn, tcfg, _ = self.loaded[stage]
      out = fn(phi, psi)
      if fn.target_kind == "backbone":
        artifacts.check_finite_embeddings(out, f"row {row!r} after hop {len(state[1]) + 1}")
        target = self.cache.phi(tcfg.new)
      else:
        target = self.cache.psi_of(self.cache.side_model(tcfg.new))
      self._applied[state, stage] = out, relative_squared_error(out, target)
    return self._applied[state, stage]

  def gallery(self, row) -> tuple[np.ndarray, list]:
    """The row's gallery: stored φ_1, ψ_1 upgraded hop by hop; and each hop's errors."""
    hops = [list(h) for h in row.hops]
    if not hops:
      raise FCTError(f"stage {self.cfg.name!r}: row {row.name!r} has no hops")
    _, first_cfg, first_side = self.load(hops[0][0], "h", row.name)
    phi, psi = self.cache.phi(first_cfg.old), self.cache.psi_of(first_side)  # φ_1, ψ_1 as stored at v1 time
    errors = []
    for i, (h_stage, g_stage) in enumerate(hops):
      _, tcfg, _ = self.load(h_stage, "h", row.name)
      if psi is None:
        if int(tcfg.side_info.dim) > 0:
          raise FCTError(f"stage {self.cfg.name!r}: row {row.name!r}: {h_stage!r} takes side-information but the "
                         f"previous hop has no g stage to carry ψ forward")
        psi = np.zeros((len(phi), 0), np.float32)
      state = ((first_cfg.old, first_side.key), tuple(tuple(hop) for hop in hops[:i]))
      new_psi, psi_err = None, None
      if g_stage:
        self.load(g_stage, "g", row.name)  # a one-line error unless its target is side-information
        new_psi, psi_err = self.apply(state, g_stage, row.name, phi, psi)
      phi, phi_err = self.apply(state, h_stage, row.name, phi, psi)
      psi = new_psi
      errors.append({"h": h_stage, "phi_rel_sq_err": phi_err, "g": g_stage or "", "psi_rel_sq_err": psi_err})
    return phi, errors


def run(cfg, stage_dir: str, ctx: artifacts.Context) -> summary.EvaluationResults:
  source, _ = sources.get_source(cfg.data, cfg.split)
  labels = artifacts.source_labels(source)
  cache = evaluation.EmbeddingCache(cfg, ctx, source)
  hops = _Hops(cfg, cache)
  gallery = {stage: cache.phi(stage) for stage in cfg.backbones}
  cases, hop_errors = [(s, s) for s in cfg.backbones], {}
  rows = [ml_collections.ConfigDict(dict(r)) for r in cfg.rows]  # list items stay plain dicts in a ConfigDict
  for row in rows:
    q, _, gname = row.name.partition("/")
    if q != row.query or not gname or gname in cfg.backbones:
      raise FCTError(f"stage {cfg.name!r}: row name {row.name!r} must be '<query>/<gallery>' with query "
                     f"{row.query!r} and a gallery name that is not a backbone")
    gallery[gname], hop_errors[row.name] = hops.gallery(row)
    gallery.setdefault(row.query, cache.phi(row.query))
    cases.append((row.query, gname))

  results, stats = evaluation.evaluate_cases(gallery, labels, cases, ctx.mesh)
  payload = {"cases": results, "num_eval": int(len(labels)), "hop_errors": hop_errors,
             "rows": {r.name: {"query": r.query, "hops": [list(h) for h in r.hops]} for r in rows},
             "feature_mode": {s: c.feature_mode for s, (_, c, _) in hops.loaded.items()}}
  common.write_stage_results(stage_dir, payload, cases_lib.format_markdown_table(results))
  # The compatibility matrix of the v_i rows is among the sections.
  return evaluation.summarize(cfg, ctx, gallery, labels, payload, stats)
