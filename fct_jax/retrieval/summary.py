"""What an evaluation stage computes beyond its case table, and the results object it hands to the experiment.

The sections here need the embeddings of the evaluation set and the mesh (every process computes them when the
kernel's mesh spans hosts), so they are computed where the embeddings are, in the evaluation stages, and returned
with the case table as :class:`EvaluationResults`. The report (``fct_jax.report``, a layer above the stages) adds
the paper's rows and the cost of the update, and renders; it never needs the embeddings.

* CMC curves top-1…top-k per case (from the retrieval kernel's per-query ``first_rank``);
* linear CKA between every pair of evaluated embeddings (old, new, h, …);
* the partial-backfilling curves (`backfill`: new queries, each transformed gallery h → φ_new in each ordering);
* for update sequences (rows such as ``v3/h3(h2(v1))``) the compatibility matrix, query model × gallery model.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from fct_jax.errors import FCTError
from fct_jax.retrieval import backfill as backfill_lib
from fct_jax.retrieval import cases as cases_lib
from fct_jax.retrieval import cka as cka_lib
from fct_jax.retrieval import kernel

_SEQUENCE_MODEL = re.compile(r"^v\d+$")


@dataclasses.dataclass(frozen=True)
class EvaluationResults:
  """What an evaluation stage's ``run`` returns in place of ``True``: the stage finished, here is what it found.

  Truthy like ``True`` (a finished stage); the experiment hands it to the report before marking the stage done.

  Attributes:
    payload: the stage's own results, as its stage directory's ``results.json`` holds them (``cases`` in percent,
      ``num_eval``, …); the report keeps them first, in this order.
    sections: :func:`summarize`'s ``cmc_curves``, ``cka``, ``backfill`` and ``compatibility``.
  """
  payload: dict
  sections: dict


def split_case(case: str) -> tuple[str, str]:
  """``"q/g"`` -> ``("q", "g")``; model names never contain ``/`` (``h3(h2(v1))`` is one name)."""
  q, sep, g = case.partition("/")
  if not sep:
    raise FCTError(f"case {case!r} is not of the form query_model/gallery_model")
  return q, g


def is_sequence(cases: Mapping[str, object]) -> bool:
  """True when the results hold update-sequence rows (query models named ``v1``, ``v2``, …)."""
  return any(_SEQUENCE_MODEL.match(split_case(c)[0]) for c in cases)


def cmc_curves(embeddings: Mapping[str, np.ndarray], labels, cases: Sequence[str], *, max_k: int = 20,
               mesh=None, progress: kernel.ProgressFactory | None = None) -> dict:
  """CMC top-1…top-``max_k`` (percent) of each case, from the retrieval kernel's per-query first positive rank.

  Args:
    embeddings: model name -> (N, d) embeddings of the evaluation set (the set is query and gallery).
    labels: (N,) labels.
    cases: case names ``"q/g"``.
    max_k: the last cut-off (capped at N − 1, the gallery size without the query itself).
    mesh: optional Mesh with a ``data`` axis (every process must call this on a multi-host mesh).
    progress: the kernel's progress factory (see `kernel.rank_stats`).

  Returns:
    ``{"k": [1..K], "cases": {"q/g": [cmc@1, ..., cmc@K]}}``.
  """
  stats = cases_lib.case_stats(embeddings, np.asarray(labels), [split_case(c) for c in cases], mesh=mesh,
                               progress=progress)
  return cmc_from_stats(stats, len(labels), max_k=max_k)


def cmc_from_stats(stats: Mapping[str, kernel.RankStats], num_items: int, *, max_k: int) -> dict:
  """:func:`cmc_curves` from the cases' rank statistics (``cases.case_stats``), computed once for the case table
  too; ``num_items``: the evaluation set's size (the cut-offs stop at the gallery size without the query)."""
  top = max(1, min(int(max_k), num_items - 1))
  ks = np.arange(1, top + 1)
  out = {}
  for case, s in stats.items():
    ranks = s.first_rank[s.num_pos > 0]
    out[case] = ([float(100.0 * np.mean(ranks < k)) for k in ks] if ranks.size else [float("nan")] * len(ks))
  return {"k": [int(k) for k in ks], "cases": out}


def cka_matrix(embeddings: Mapping[str, np.ndarray]) -> dict:
  """Linear CKA between every pair of embeddings of the same images: ``{"models": [...], "values": [[...]]}``."""
  names = list(embeddings)
  vals = [[1.0 if i == j else None for j in range(len(names))] for i in range(len(names))]
  for i, a in enumerate(names):
    for j in range(i + 1, len(names)):
      vals[i][j] = vals[j][i] = float(cka_lib.linear_cka(embeddings[a], embeddings[names[j]]))
  return {"models": names, "values": vals}


def compatibility_matrix(cases: Mapping[str, Mapping[str, float]], metric: str = "cmc_top1") -> dict:
  """The compatibility matrix of a set of cases: rows are query models, columns gallery models.

  Args:
    cases: ``{"q/g": {metric: value, ...}}`` (e.g. ``v3/h3(h2(v1))``).
    metric: which value fills a cell.

  Returns:
    ``{"metric", "queries": [...], "galleries": [...], "values": [[value or None]]}``, models in order of first
    appearance; a pair that was not evaluated is None.
  """
  queries, galleries = [], []
  for c in cases:
    q, g = split_case(c)
    queries += [q] if q not in queries else []
    galleries += [g] if g not in galleries else []
  values = [[cases.get(f"{q}/{g}", {}).get(metric) for g in galleries] for q in queries]
  return {"metric": metric, "queries": queries, "galleries": galleries, "values": values}


def summarize(embeddings: Mapping[str, np.ndarray], labels, cases: Mapping[str, object],
              stats: Mapping[str, kernel.RankStats], *, max_k: int, backfill_fractions: Sequence[float],
              backfill_galleries: Mapping[str, tuple] | None = None,
              backfill_orderings: Sequence[str] = backfill_lib.ORDERINGS, mesh=None,
              progress: kernel.ProgressFactory | None = None) -> dict:
  """The sections of :class:`EvaluationResults` for an evaluated case table.

  Args:
    embeddings: model name -> (N, d) embeddings of the evaluation images (the models the cases name).
    labels: (N,) labels.
    cases: the case table, ``{"q/g": {"cmc_top1", …}}`` (its names and, for sequences, its top-1 values).
    stats: the rank statistics the case table was read from (``cases.case_stats``): the CMC curves come from them,
      and the backfilling curves' end points (rows ``new/<gallery>`` and ``new/new``).
    max_k: last CMC cut-off of the curves.
    backfill_fractions: backfilled fractions of the curves.
    backfill_galleries: transformed gallery name (as in the rows ``new/<name>``) → ``(embeddings, log_var or
      None)``, each drawn in ``backfill_orderings`` (`backfill.backfill_curves`); None: no curves.
    backfill_orderings: orderings of the curves (``sigma`` where a gallery has ``log_var``).
    mesh: Mesh for the retrieval kernel (all processes call this on a multi-host mesh).
    progress: the kernel's progress factory.

  Returns:
    ``{"cmc_curves", "cka", "backfill", "compatibility"}``; the last two None when not applicable.
  """
  used = [m for m in embeddings if any(m in split_case(c) for c in cases)]
  # One array under two names (the evaluation's "h" is also "h[simclr]") would only add a CKA of 1: keep the first.
  used = [m for i, m in enumerate(used) if not any(embeddings[m] is embeddings[p] for p in used[:i])]
  out = {"cmc_curves": cmc_from_stats(stats, len(labels), max_k=max_k),
         "cka": cka_matrix({m: embeddings[m] for m in used}), "backfill": None}
  if backfill_galleries and "new" in embeddings:
    out["backfill"] = backfill_lib.backfill_curves(embeddings["new"], backfill_galleries, labels,
                                                   orderings=tuple(backfill_orderings),
                                                   fractions=tuple(backfill_fractions), stats=stats, mesh=mesh,
                                                   progress=progress)
  out["compatibility"] = compatibility_matrix(cases) if is_sequence(cases) else None
  return out
