"""Partial-backfilling curves (FastFill, Jaeckle et al., ICLR 2023, the follow-up to FCT).

The gallery starts fully transformed (h(φ_old, ψ) for every item) and items are re-embedded with φ_new one by one in
a chosen order. After backfilling a fraction f, the gallery holds φ_new for the first ⌈f·N⌉ items of the order and
h(φ_old, ψ) for the rest; queries are φ_new. The curve is CMC/mAP against f, summarised by its area (trapezoid rule
over f ∈ [0, 1], in the metric's percent units): a better order reaches the new model's accuracy sooner.

Orders: ``"random"`` (seeded permutation), ``"distance"`` (largest |h − φ_new| first: an oracle, since it needs
φ_new of every item), or a per-item score array (e.g. FastFill's predicted uncertainty; highest first).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from fct_jax.retrieval import metrics

ORDERS = ("random", "distance")


def backfill_order(transformed, new, order="random", *, seed: int = 0) -> np.ndarray:
  """The item order in which to backfill.

  Args:
    transformed: (N, d) h(φ_old, ψ) gallery embeddings.
    new: (N, d) φ_new embeddings of the same items.
    order: "random", "distance", or an (N,) array of scores (backfilled highest first; ties: lower index first).
    seed: seed of the random order.

  Returns:
    (N,) int64 permutation of the gallery indices.
  """
  n = np.shape(transformed)[0]
  if isinstance(order, str):
    if order == "random":
      return np.random.default_rng(seed).permutation(n)
    if order == "distance":
      gap = np.linalg.norm(np.asarray(transformed, np.float64) - np.asarray(new, np.float64), axis=1)
      return np.argsort(-gap, kind="stable")
    raise ValueError(f"order must be one of {ORDERS} or an array of per-item scores, got {order!r}")
  scores = np.asarray(order, np.float64).reshape(-1)
  if scores.shape[0] != n:
    raise ValueError(f"order scores must have one entry per gallery item ({n}), got {scores.shape[0]}")
  if not np.isfinite(scores).all():
    raise ValueError("order scores contain NaN or inf")
  return np.argsort(-scores, kind="stable")


def backfill_curve(transformed, new, labels, *, queries=None, order="random",
                   fractions: Sequence[float] = tuple(np.linspace(0.0, 1.0, 11)), ks: Sequence[int] = (1, 5),
                   seed: int = 0, mesh=None, **evaluate_kwargs) -> dict:
  """CMC/mAP after backfilling each fraction of the gallery, and the area under each curve.

  Args:
    transformed: (N, d) gallery embeddings before backfilling, h(φ_old, ψ).
    new: (N, d) φ_new embeddings of the same N items.
    labels: (N,) labels.
    queries: (N, d) query embeddings of the same N items (default: ``new``); each query's own item is excluded.
    order: see `backfill_order`.
    fractions: backfilled fractions in [0, 1], increasing.
    ks: CMC cut-offs.
    seed: seed of the random order.
    mesh: optional jax Mesh with a ``data`` axis.
    **evaluate_kwargs: passed to `metrics.evaluate`.

  Returns:
    ``{"order": name, "fractions": [...], "cmc_top1": [...], ..., "mAP": [...], "auc": {"cmc_top1": ...,
    "mAP": ...}}``, metric values in percent (JSON-friendly python lists and floats).
  """
  t = np.asarray(transformed, np.float32)
  nw = np.asarray(new, np.float32)
  if t.shape != nw.shape or t.ndim != 2:
    raise ValueError(f"transformed and new must have the same 2-D shape, got {t.shape} and {nw.shape}")
  fr = np.asarray(fractions, np.float64)
  if fr.ndim != 1 or fr.size == 0 or (fr < 0).any() or (fr > 1).any() or (np.diff(fr) <= 0).any():
    raise ValueError(f"fractions must be increasing values in [0, 1], got {list(fractions)}")
  q = nw if queries is None else queries
  perm = backfill_order(t, nw, order, seed=seed)
  n = t.shape[0]
  curves = {}
  for f in fr:
    gallery = t.copy()
    done = perm[:int(np.ceil(f * n - 1e-9))]
    gallery[done] = nw[done]
    r = metrics.evaluate(q, gallery, labels, labels, query_is_gallery=True, ks=ks, mesh=mesh, **evaluate_kwargs)
    for key, v in r.items():
      if key.startswith("cmc_top") or key == "mAP":
        curves.setdefault(key, []).append(v)
  # Area under the curve over f ∈ [0, 1] (normalised by the covered span, so a partial grid is still comparable).
  span = fr[-1] - fr[0]
  trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
  auc = {k: float(trapezoid(v, fr) / span) if span > 0 else float(v[0]) for k, v in curves.items()}
  name = order if isinstance(order, str) else "scores"
  return {"order": name, "fractions": [float(f) for f in fr], **curves, "auc": auc}
