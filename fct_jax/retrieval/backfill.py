"""Partial-backfilling curves (FastFill, Jaeckle et al., ICLR 2023, the follow-up to FCT), as its official protocol
computes them (ml-fct@1a7f8b5, ``utils/eval_utils.cmc_evaluate``).

The gallery starts fully transformed (h(φ_old, ψ) for every item) and items are re-embedded with φ_new in a chosen
order. After backfilling a fraction f, the gallery holds φ_new for the first ⌊f·n⌋ items of the order and h for the
rest; queries are φ_new (the evaluation set is query and gallery, each query's own item excluded). The curve is
CMC top-1, top-5 and mAP at every f of a grid (FastFill's: f = i/21, i = 0…21), summarised by its **AUC, the mean
over the grid points** (FastFill's number; with an even grid it equals the trapezoid area up to half the end
points' weight). At f = 0 the curve is the case new/h, at f = 1 the case new/new, exactly: the callers pass those
cases' rank statistics and the end points reuse them.

Orderings (:data:`ORDERINGS`):

* ``random``: FCT's; a seeded permutation.
* ``sigma``: FastFill's; largest predicted uncertainty s = log σ² first (the mean over its dimensions when h's
  head is wider than 1). It comes free with the pass of h that upgrades the gallery.
* ``distance``: an oracle, largest ‖φ_new − h‖ first: it needs φ_new of every item, i.e. the images; for reference.

Ties in ``sigma`` and ``distance`` go to the lower gallery index first (a stable sort).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from fct_jax.retrieval import kernel, metrics

ORDERINGS = ("random", "sigma", "distance")
GRID = tuple(i / 21 for i in range(22))  # FastFill's: 20 intermediate points between 0 and 1
METRICS = ("cmc_top1", "cmc_top5", "mAP")


def backfill_order(transformed, new, order: str = "random", *, log_var=None, seed: int = 0) -> np.ndarray:
  """The item order in which to backfill: a permutation of ``range(N)``.

  Args:
    transformed: (N, d) h(φ_old, ψ) gallery embeddings.
    new: (N, d) φ_new embeddings of the same items (read by ``distance`` only).
    order: ``"random"``, ``"sigma"`` or ``"distance"``.
    log_var: (N,) or (N, k) predicted log σ² (``sigma`` only; h's uncertainty head).
    seed: seed of the random order.

  Raises:
    ValueError: an unknown order, ``sigma`` without (finite, one per item) ``log_var``.
  """
  n = np.shape(transformed)[0]
  if order == "random":
    return np.random.default_rng(seed).permutation(n)
  if order == "distance":
    gap = np.linalg.norm(np.asarray(transformed, np.float64) - np.asarray(new, np.float64), axis=1)
    return np.argsort(-gap, kind="stable")
  if order == "sigma":
    if log_var is None:
      raise ValueError("the sigma order needs h's predicted uncertainty (an h trained with method='fastfill')")
    s = np.asarray(log_var, np.float64).reshape(n, -1).mean(axis=1) if np.size(log_var) else np.zeros(0)
    if s.shape[0] != n or not np.isfinite(s).all():
      raise ValueError(f"sigma scores must be finite, one row per gallery item ({n}); got shape "
                       f"{np.shape(log_var)}")
    return np.argsort(-s, kind="stable")
  raise ValueError(f"order must be one of {', '.join(ORDERINGS)}, got {order!r}")


def check_fractions(fractions: Sequence[float]) -> np.ndarray:
  """The fractions as an array, checked: increasing, in [0, 1], at least one."""
  fr = np.asarray(fractions, np.float64)
  if fr.ndim != 1 or fr.size == 0 or (fr < 0).any() or (fr > 1).any() or (np.diff(fr) <= 0).any():
    raise ValueError(f"fractions must be increasing values in [0, 1], got {list(fractions)}")
  return fr


def cutoffs(fractions: Sequence[float], n: int) -> np.ndarray:
  """⌊f·n⌋ backfilled items per fraction (the official ``(i·n) // 21`` on its grid; a tolerance absorbs the float
  rounding of i/21)."""
  return np.floor(check_fractions(fractions) * n + 1e-9).astype(np.int64)


def _values(stats: kernel.RankStats, ks: Sequence[int]) -> dict:
  m = metrics.metrics_from_stats(stats, ks)
  return {k: m[k] for k in METRICS if k in m}


def backfill_curve(transformed, new, labels, *, order: str = "random", log_var=None,
                   fractions: Sequence[float] = GRID, seed: int = 0, ends: Optional[tuple] = None,
                   ks: Sequence[int] = (1, 5), **kernel_kwargs) -> dict:
  """One backfilling curve: CMC/mAP (percent) at each fraction and the AUC (mean over the fractions).

  Args:
    transformed: (N, d) h(φ_old, ψ); new: (N, d) φ_new of the same items (also the queries); labels: (N,).
    order, log_var, seed: see :func:`backfill_order`.
    fractions: increasing fractions in [0, 1].
    ends: optional ``(stats of new/h, stats of new/new)`` (`kernel.RankStats`, e.g. from the case table): the
      points with no item (or every item) backfilled are read from them instead of recomputed.
    ks: CMC cut-offs (1 and 5 are reported).
    **kernel_kwargs: ``mesh``, ``query_block``, ``gallery_chunk``, ``count_method``, ``progress``.

  Returns:
    ``{"ordering", "fractions", "cmc_top1", "cmc_top5", "mAP", "auc": {metric: mean over the fractions}}``, plain
    Python floats.
  """
  t = np.asarray(transformed, np.float32)
  nw = np.asarray(new, np.float32)
  if t.shape != nw.shape or t.ndim != 2:
    raise ValueError(f"transformed and new must have the same 2-D shape, got {t.shape} and {nw.shape}")
  n = t.shape[0]
  fr = check_fractions(fractions)
  perm = backfill_order(t, nw, order, log_var=log_var, seed=seed)
  curves = {k: [] for k in METRICS}
  for c in cutoffs(fr, n):
    if ends is not None and c in (0, n):
      stats = ends[0] if c == 0 else ends[1]
    else:
      gallery = t.copy()
      gallery[perm[:c]] = nw[perm[:c]]
      stats = metrics.checked_stats(nw, gallery, labels, labels, query_is_gallery=True, **kernel_kwargs)
    for k, v in _values(stats, ks).items():
      curves[k].append(float(v))
  auc = {k: float(np.mean(v)) for k, v in curves.items() if v}
  return {"ordering": order, "fractions": [float(f) for f in fr], **curves, "auc": auc}


def backfill_curves(new, galleries: Mapping[str, tuple], labels, *, orderings: Sequence[str] = ORDERINGS,
                    fractions: Sequence[float] = GRID, seed: int = 0,
                    stats: Optional[Mapping[str, kernel.RankStats]] = None, **kernel_kwargs) -> dict:
  """Backfilling curves of several transformed galleries, each in several orderings.

  Args:
    new: (N, d) φ_new of the evaluation items (queries, and what backfilling writes).
    galleries: gallery model name (as in the case rows, e.g. ``"h[fastfill]"``) → ``(h embeddings (N, d),
      log_var (N, k) or None)``.
    labels: (N,).
    orderings: which of :data:`ORDERINGS` to draw; ``sigma`` is skipped for a gallery without ``log_var``.
    fractions, seed: as in :func:`backfill_curve`.
    stats: optional case statistics ``{"new/<gallery>": RankStats, "new/new": RankStats}``: the end points reuse
      them (then they equal the case table's rows exactly).
    **kernel_kwargs: the kernel's options.

  Returns:
    ``{"<gallery>:<ordering>": {"gallery", "ordering", "fractions", "cmc_top1", "cmc_top5", "mAP", "auc"}}``.
  """
  bad = [o for o in orderings if o not in ORDERINGS]
  if bad:
    raise ValueError(f"unknown backfill ordering {bad[0]!r}; valid: {', '.join(ORDERINGS)}")
  out = {}
  for name, (emb, log_var) in galleries.items():
    ends = None
    if stats is not None and f"new/{name}" in stats and "new/new" in stats:
      ends = (stats[f"new/{name}"], stats["new/new"])
    for order in orderings:
      if order == "sigma" and log_var is None:
        continue
      curve = backfill_curve(emb, new, labels, order=order, log_var=log_var, fractions=fractions, seed=seed,
                             ends=ends, **kernel_kwargs)
      out[f"{name}:{order}"] = {"gallery": name, **curve}
  return out
