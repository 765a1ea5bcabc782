"""Sequence-evaluation stage: retrieval through a sequence of model updates v1 → v2 → v3 (the paper's Table 5).

Every row ranks the evaluation set embedded by a *query* backbone against a *gallery* built the way a production
system would: stored φ_1(x), ψ_1(x) of the first model version, upgraded hop by hop without images. A hop is a
pair ``[h, g]`` of transformation stages: φ ← h(φ, ψ) and, when a later hop needs side-information, ψ ← g(φ, ψ)
(both from the *previous* φ, ψ; the paper's h_{i+1}(φ_i, ψ_i), g_{i+1}(φ_i, ψ_i)). A hop without g leaves no ψ, so
the next hop's h must take none (``side_info.kind = "none"``: zeros).

Config (``configs/common.sequence_evaluation_stage``): ``backbones`` (stage names evaluated against themselves:
φ_i/φ_i) and ``rows``: ``{"name", "query", "hops"}``; e.g. ``v3/h3(h2(v1))`` is ``query="v3"``,
``hops=[["h2", "g2"], ["h3", ""]]``. Writes ``results.json`` / ``results.md`` into the stage and experiment dirs.

Besides the retrieval cases, ``hop_errors`` tells which hop of a row loses the most: for each hop, the relative
squared error of h's output against the embedding its target model computes from the images (and of g's
output against ψ_{i+1}'s), :func:`relative_squared_error` (0: exact; 1: no better than the target's mean).
"""

import ml_collections
import numpy as np

from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.retrieval import cases as cases_lib
from fct_jax.stages import common, side_info, transformation


def relative_squared_error(pred: np.ndarray, target: np.ndarray) -> float:
  """Σ‖pred − target‖² / Σ‖target − mean(target)‖² over the rows (N, d): 1 − R² of a regression of embeddings.

  0 when ``pred`` equals ``target``; 1 for predicting the target's mean; scale-free, so hops into embeddings of
  different widths and norms compare.
  """
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  denom = float(((target - target.mean(axis=0)) ** 2).sum())
  return float(((pred - target) ** 2).sum() / denom) if denom > 0 else float("nan")


# A transformation's role in a hop: its target's kind (``transformation.target_kind``), and the role's name.
_ROLES = {"h": ("backbone", "an h"), "g": ("side_info", "a g")}
_TARGETS = {"backbone": "a backbone", "side_info": "side-information"}


def run(cfg, stage_dir: str, ctx: common.Context):
  source, _ = sources.get_source(cfg.data, cfg.split)
  labels = common.source_labels(source)
  bs = common.eval_batch_size(cfg, ctx.mesh)
  emb, psi_cache, hs, kinds, side_models = {}, {}, {}, {}, {}

  def backbone(stage):
    if stage not in emb:
      module, variables, _ = common.load_backbone(ctx, stage, cfg.name)
      emb[stage] = common.embed(module, variables, source, batch_size=bs, mesh=ctx.mesh,
                                transform=common.eval_transform(cfg))
      common.check_finite_embeddings(emb[stage], f"{stage} embeddings")
    return emb[stage]

  def load(stage, role, row):
    """Transformation ``stage`` (loaded once) used in ``row`` as ``role``: "h" (its target is a backbone) or "g"
    (its target is side-information); the other kind is a one-line error."""
    if stage not in hs:
      hs[stage] = transformation.load_h(ctx, stage, cfg.name, side_cache=side_models)
      kinds[stage] = transformation.target_kind(hs[stage][1], ctx)
    if kinds[stage] != _ROLES[role][0]:
      other = _ROLES["g" if role == "h" else "h"][1]
      raise FCTError(f"stage {cfg.name!r}: row {row!r}: {stage!r} is {other} (its target {hs[stage][1].new!r} is "
                     f"{_TARGETS[kinds[stage]]}), not {_ROLES[role][1]}")
    return hs[stage]

  def psi_of(side):
    """ψ of the eval images computed from the images by ``side`` (once per side-information model)."""
    if side.key not in psi_cache:
      psi_cache[side.key] = side.embed(source, batch_size=bs, mesh=ctx.mesh, transform=common.eval_transform(cfg))
    return psi_cache[side.key]

  def side_target(stage):
    """ψ_{i+1} of the eval images from side-info stage ``stage`` (a g's target)."""
    if stage not in side_models:
      side_models[stage] = side_info.load(ctx, stage, cfg.name)
    return psi_of(side_models[stage])

  applied = {}

  def apply(state, stage, row, phi, psi):
    """Loaded transformation ``stage`` (an h or a g) on (φ, ψ), and its relative error to its target.

    ``state`` names (φ, ψ): the stored vectors the row started from and the hops applied to them so far. Rows of a
    sequence share their first hops (v3/h3(h2(v1)) and v4/h4(h3(h2(v1))) both start with h2 on φ_1, ψ_1), so each
    application is computed once.
    """
    if (state, stage) not in applied:
      fn, tcfg, _ = hs[stage]
      out = fn(phi, psi)
      if kinds[stage] == "backbone":
        common.check_finite_embeddings(out, f"row {row!r} after hop {len(state[1]) + 1}")
        target = backbone(tcfg.new)
      else:
        target = side_target(tcfg.new)
      applied[state, stage] = out, relative_squared_error(out, target)
    return applied[state, stage]

  gallery = {}
  for stage in cfg.backbones:
    gallery[stage] = backbone(stage)
  cases, hop_errors = [(s, s) for s in cfg.backbones], {}
  rows = [ml_collections.ConfigDict(dict(r)) for r in cfg.rows]  # list items stay plain dicts in a ConfigDict
  for row in rows:
    q, _, gname = row.name.partition("/")
    if q != row.query or not gname or gname in cfg.backbones:
      raise FCTError(f"stage {cfg.name!r}: row name {row.name!r} must be '<query>/<gallery>' with query "
                     f"{row.query!r} and a gallery name that is not a backbone")
    hops = [list(h) for h in row.hops]
    if not hops:
      raise FCTError(f"stage {cfg.name!r}: row {row.name!r} has no hops")
    _, first_cfg, first_side = load(hops[0][0], "h", row.name)
    phi, psi = backbone(first_cfg.old), psi_of(first_side)  # φ_1, ψ_1 as stored at v1 time
    errors = hop_errors[row.name] = []
    for i, (h_stage, g_stage) in enumerate(hops):
      _, tcfg, _ = load(h_stage, "h", row.name)
      if psi is None:
        if int(tcfg.side_info.dim) > 0:
          raise FCTError(f"stage {cfg.name!r}: row {row.name!r}: {h_stage!r} takes side-information but the "
                         f"previous hop has no g stage to carry ψ forward")
        psi = np.zeros((len(phi), 0), np.float32)
      state = ((first_cfg.old, first_side.key), tuple(tuple(hop) for hop in hops[:i]))
      new_psi, psi_err = None, None
      if g_stage:
        load(g_stage, "g", row.name)  # a one-line error unless its target is side-information
        new_psi, psi_err = apply(state, g_stage, row.name, phi, psi)
      phi, phi_err = apply(state, h_stage, row.name, phi, psi)
      psi = new_psi
      errors.append({"h": h_stage, "phi_rel_sq_err": phi_err, "g": g_stage or "", "psi_rel_sq_err": psi_err})
    gallery[gname] = phi
    gallery.setdefault(row.query, backbone(row.query))
    cases.append((row.query, gname))

  results = cases_lib.evaluate_cases(gallery, labels, cases)
  table = cases_lib.format_markdown_table(results)
  payload = {"cases": results, "num_eval": int(len(labels)), "hop_errors": hop_errors,
             "rows": {r.name: {"query": r.query, "hops": [list(h) for h in r.hops]} for r in rows},
             "feature_mode": {s: transformation.feature_mode(c) for s, (_, c, _) in hs.items()}}
  common.write_stage_results(stage_dir, payload, table)
  from fct_jax import report  # pylint: disable=g-import-not-at-top  (report imports the gallery, which imports stages)
  # The experiment-level results.md/json and plots, including the compatibility matrix of the v_i rows.
  report.write(ctx.workdir, payload, gallery, labels, cfg=cfg, mesh=ctx.mesh)
  return True
