"""CMC top-k and mAP from the exact rank statistics of `kernel.rank_stats`, plus a NumPy brute-force oracle.

Definitions (the paper, Sec. 4.1, and ml-fct's ``utils/eval_utils.py``):

* CMC top-k: the percentage of queries whose best positive ranks in the first k (first-match-break CMC).
* mAP: the mean over queries of the average precision over the full ranking (mAP@R=1.0), in percent.
* Queries with no positive in the gallery are skipped (not counted as misses) and reported as ``num_skipped``.
  # ml-fct: raises "No valid query" when every query is skipped; we return NaN metrics and the counts instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fct_jax.retrieval import kernel


def _shape_of(x, name: str):
  shape = getattr(x, "shape", None)
  if shape is None:
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  return tuple(shape)


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
  """CMC cut-offs as a sorted tuple of unique positive ints; a one-line ValueError otherwise."""
  ks = tuple(sorted({int(k) for k in ks}))
  if not ks or ks[0] < 1:
    raise ValueError(f"ks must be positive integers, got {ks}")
  return ks


def validate_inputs(queries, gallery, query_labels, gallery_labels, *, query_is_gallery: bool,
                    ks: Sequence[int] = (1,)) -> tuple[int, ...]:
  """Raises a one-line ValueError naming the cause; returns ks as a sorted tuple of unique ints."""
  qs, gs = _shape_of(queries, "queries"), _shape_of(gallery, "gallery")
  if len(qs) != 2 or len(gs) != 2:
    raise ValueError(f"queries and gallery must be 2-D (count, dim), got shapes {qs} and {gs}")
  if qs[0] == 0 or gs[0] == 0:
    raise ValueError(f"empty query or gallery set: shapes {qs} and {gs}")
  if qs[1] != gs[1]:
    raise ValueError(f"embedding dimensions differ: queries {qs[1]} vs gallery {gs[1]}")
  if qs[1] == 0:
    raise ValueError("embedding dimension is 0")
  ql, gl = _shape_of(query_labels, "query_labels"), _shape_of(gallery_labels, "gallery_labels")
  if ql != (qs[0],):
    raise ValueError(f"query_labels must have shape ({qs[0]},) to match queries, got {ql}")
  if gl != (gs[0],):
    raise ValueError(f"gallery_labels must have shape ({gs[0]},) to match gallery, got {gl}")
  if query_is_gallery:
    if qs[0] != gs[0]:
      raise ValueError(f"query_is_gallery=True needs as many queries as gallery items, got {qs[0]} and {gs[0]}")
    if not np.array_equal(np.asarray(query_labels), np.asarray(gallery_labels)):
      raise ValueError("query_is_gallery=True but query_labels differ from gallery_labels")
  for name, x in (("queries", queries), ("gallery", gallery)):
    if name == "gallery" and gallery is queries:  # one array on both sides: checked once
      break
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.number) and a.dtype.kind != "V":
      raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
      bad = np.argwhere(~np.isfinite(a))[0]
      raise ValueError(f"{name} contains NaN or inf (first at row {bad[0]}) or overflows float32")
  return check_ks(ks)


def metrics_from_stats(stats: kernel.RankStats, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
  """CMC and mAP (percent, python floats) and counts from per-query rank statistics."""
  valid = stats.num_pos > 0
  n_valid = int(valid.sum())
  out = {}
  for k in ks:
    hits = (stats.first_rank[valid] < k).sum()
    out[f"cmc_top{k}"] = float(100.0 * hits / n_valid) if n_valid else float("nan")
  # float64 mean: M float32 APs summed in float32 would lose digits at ImageNet's 50k queries.
  out["mAP"] = float(100.0 * stats.ap[valid].astype(np.float64).mean()) if n_valid else float("nan")
  out["num_queries"] = int(stats.num_pos.shape[0])
  out["num_skipped"] = int(stats.num_pos.shape[0] - n_valid)
  return out


def evaluate(queries, gallery, query_labels, gallery_labels, *, query_is_gallery: bool = False,
             ks: Sequence[int] = (1, 5), mesh=None, query_block: int | None = None,
             gallery_chunk: int | None = None,
             count_method: str = "auto", progress: kernel.ProgressFactory | None = None) -> dict[str, float]:
  """Exact L2 retrieval metrics: CMC top-k and mAP over the full ranking.

  Args:
    queries: (M, d) embeddings of the queries (numpy or jax; cast to float32).
    gallery: (N, d) embeddings of the gallery (may come from another model, e.g. h(φ_old, ψ)).
    query_labels: (M,) class or identity labels.
    gallery_labels: (N,) labels.
    query_is_gallery: query i is gallery item i (the paper's set-up); it is removed from its own ranking.
    ks: the CMC cut-offs; one ``cmc_top{k}`` key each. k may exceed N.
    mesh: a jax Mesh with a ``data`` axis over which the gallery is sharded; default: all devices.
    query_block: queries per block (default: by platform); memory is O(query_block × gallery chunk).
    gallery_chunk: gallery items per chunk on one device; default: automatic (see `kernel.rank_stats`).
    count_method: "auto", "reduce_pairs", "reduce" or "histogram" (same results; speed differs, see
      `kernel`).
    progress: reports queries done on long jobs (a `kernel.ProgressFactory`; see `kernel.rank_stats`).

  Returns:
    ``{"cmc_top1": ..., "cmc_top5": ..., "mAP": ..., "num_queries": M, "num_skipped": S}``; metrics in percent
    over the M − S queries that have at least one positive (NaN if none has).

  Raises:
    ValueError: on mismatched shapes or dimensions, empty sets, NaN/inf embeddings, bad ks.
  """
  ks = check_ks(ks)
  stats = checked_stats(queries, gallery, query_labels, gallery_labels, query_is_gallery=query_is_gallery,
                        mesh=mesh, query_block=query_block, gallery_chunk=gallery_chunk, count_method=count_method,
                        progress=progress)
  return metrics_from_stats(stats, ks)


def checked_stats(queries, gallery, query_labels, gallery_labels, *, query_is_gallery: bool = False,
                  **kernel_kwargs) -> kernel.RankStats:
  """`kernel.rank_stats` after :func:`validate_inputs`: the per-query statistics every metric is read from (CMC at
  any k, mAP), so callers that need several (the case table and the CMC curves) run the kernel once.

  ``kernel_kwargs``: ``mesh``, ``query_block``, ``gallery_chunk``, ``count_method``, ``progress`` (as in
  :func:`evaluate`).
  """
  validate_inputs(queries, gallery, query_labels, gallery_labels, query_is_gallery=query_is_gallery)
  return kernel.rank_stats(queries, gallery, query_labels, gallery_labels, query_is_gallery=query_is_gallery,
                           **kernel_kwargs)


def brute_force_stats(queries, gallery, query_labels, gallery_labels, *,
                      query_is_gallery: bool = False) -> kernel.RankStats:
  """The slow, obvious oracle (tests, benchmarks): full float32 score matrix, stable argsort per row.

  Uses the same float32 scores as the kernel (|g|² − 2 q·g) so that ties are the same ties. O(M × N) memory.
  """
  q = np.asarray(queries, np.float32)
  g = np.asarray(gallery, np.float32)
  ql, gl = np.asarray(query_labels), np.asarray(gallery_labels)
  s = np.einsum("nd,nd->n", g, g, dtype=np.float32)[None, :] - np.float32(2) * (q @ g.T)
  m, n = s.shape
  num_pos = np.zeros(m, np.int32)
  first_rank = np.zeros(m, np.int32)
  ap = np.zeros(m, np.float32)
  for i in range(m):
    keep = np.ones(n, bool)
    if query_is_gallery:
      keep[i] = False
    idx = np.nonzero(keep)[0]
    si, match = s[i, idx], gl[idx] == ql[i]
    order = np.argsort(si, kind="stable")  # ties: lower gallery index first
    num_pos[i] = match.sum()
    if not num_pos[i]:
      continue
    first_rank[i] = np.nonzero(match[order])[0][0]
    # AP with tied scores grouped (scikit-learn's rule): each positive scores (#pos ≤ s) / (#items ≤ s).
    ts = si[match]
    rank_le = (si[None, :] <= ts[:, None]).sum(1)
    pos_le = (ts[None, :] <= ts[:, None]).sum(1)
    ap[i] = np.mean(pos_le / rank_le)
  return kernel.RankStats(num_pos=num_pos, first_rank=first_rank, ap=ap)
