"""The paper's query/gallery case table (Tables 1–6): rows such as old/old, new/old, new/new, h/h, new/h.

A row ``"q/g"`` ranks the evaluation set embedded by model ``q`` (queries) against the same set embedded by model
``g`` (gallery), with each query's own item removed (the paper's set-up: the validation set is both query and
gallery). ``h`` is the transformed old gallery h(φ_old, ψ); extra rows (``bct/old``, ``bct/bct``, ...) are any
names present in ``embeddings``.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from fct_jax.retrieval import kernel, metrics

# Query model / gallery model. Names are stable: reports and configs refer to them.
DEFAULT_CASES: tuple[tuple[str, str], ...] = (("old", "old"), ("new", "old"), ("new", "new"), ("h", "h"),
                                              ("new", "h"))


def case_name(query_model: str, gallery_model: str) -> str:
  return f"{query_model}/{gallery_model}"


def case_stats(embeddings: Mapping[str, object], labels, cases: Sequence[tuple[str, str]] | None = None, *,
               mesh=None, **kernel_kwargs) -> dict[str, kernel.RankStats]:
  """The per-query rank statistics of each (query model, gallery model) case: one kernel run per case, from which
  the case table (:func:`metrics_table`) and the CMC curves (``summary.cmc_from_stats``) are both read.

  Args and Raises: as :func:`evaluate_cases` (``kernel_kwargs``: query_block, gallery_chunk, count_method,
  progress). Returns ``{"q/g": RankStats}`` in the order of ``cases``.
  """
  if cases is None:
    cases = [c for c in DEFAULT_CASES if c[0] in embeddings and c[1] in embeddings]
    if not cases:
      raise ValueError(f"no default case computable from models {sorted(embeddings)}; need some of "
                       f"{sorted({m for c in DEFAULT_CASES for m in c})}")
  for case in cases:  # every name checked before any work
    if len(case) != 2:
      raise ValueError(f"a case is a (query model, gallery model) pair, got {case!r}")
    for name in case:
      if name not in embeddings:
        raise ValueError(f"case {case_name(*case)!r} needs model {name!r}; available: {sorted(embeddings)}")
  return {case_name(q, g): metrics.checked_stats(embeddings[q], embeddings[g], labels, labels, query_is_gallery=True,
                                                 mesh=mesh, **kernel_kwargs) for q, g in cases}


def metrics_table(stats: Mapping[str, kernel.RankStats], ks: Sequence[int] = (1, 5)) -> dict[str, dict[str, float]]:
  """The case table of :func:`case_stats`: ``{"q/g": {"cmc_top1", "cmc_top5", "mAP", "num_queries",
  "num_skipped"}}`` (see `metrics.metrics_from_stats`)."""
  ks = metrics.check_ks(ks)
  return {name: metrics.metrics_from_stats(s, ks) for name, s in stats.items()}


def evaluate_cases(embeddings: Mapping[str, object], labels, cases: Sequence[tuple[str, str]] | None = None, *,
                   ks: Sequence[int] = (1, 5), mesh=None, **evaluate_kwargs) -> dict[str, dict[str, float]]:
  """Evaluates each (query model, gallery model) case on one evaluation set.

  Args:
    embeddings: model name -> (N, d_model) embeddings of the same N images, in the same order (numpy or jax).
      Query and gallery models of one case must share d.
    labels: (N,) labels of those images.
    cases: (query model, gallery model) pairs. None: those of `DEFAULT_CASES` whose models are all present
      (at least one must be).
    ks: CMC cut-offs.
    mesh: optional jax Mesh with a ``data`` axis (see `metrics.evaluate`).
    **evaluate_kwargs: passed to `metrics.evaluate` (query_block, gallery_chunk, count_method, progress).

  Returns:
    ``{"q/g": {"cmc_top1": ..., "cmc_top5": ..., "mAP": ..., "num_queries": ..., "num_skipped": ...}}`` in the
    order of ``cases``.

  Raises:
    ValueError: a case names a model missing from ``embeddings`` (the message lists the available ones), or no
      default case is computable.
  """
  metrics.check_ks(ks)
  return metrics_table(case_stats(embeddings, labels, cases, mesh=mesh, **evaluate_kwargs), ks)


def _fmt(x: float) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def format_markdown_table(results: Mapping[str, Mapping[str, float]], title: str = "Case") -> str:
  """Renders `evaluate_cases` output as a Markdown table, one row per case, columns in the paper's order."""
  if not results:
    return ""
  first = next(iter(results.values()))
  ks = sorted(int(k[len("cmc_top"):]) for k in first if k.startswith("cmc_top"))
  head = [title] + [f"CMC top-{k} (%)" for k in ks] + ["mAP@1.0 (%)", "queries", "skipped"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for name, r in results.items():
    row = [name] + [_fmt(r.get(f"cmc_top{k}")) for k in ks] + [_fmt(r.get("mAP")), str(r.get("num_queries", "")),
                                                                 str(r.get("num_skipped", ""))]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def to_jsonable(x):
  """A copy of results (nested dicts, lists, tuples) ready for strict JSON: NaN → None (JSON has no NaN), numpy
  scalars → Python numbers, tuples → lists, keys → str; dict order is kept (it is the tables' row order)."""
  if isinstance(x, dict):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  x = x.item() if hasattr(x, "item") else x
  return None if isinstance(x, float) and math.isnan(x) else x
