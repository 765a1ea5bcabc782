"""Exact, fast retrieval evaluation: blocked L2 kernel (`kernel`, its counters in `counting`), CMC/mAP (`metrics`),
the paper's case table (`cases`), linear CKA (`cka`), partial-backfilling curves (`backfill`), nearest neighbours
(`topk`), and what an evaluation stage returns beside its case table (`summary`).

``evaluate(queries, gallery, query_labels, gallery_labels, *, query_is_gallery=False, ks=(1, 5), mesh=None)``
returns ``{"cmc_top1", "cmc_top5", "mAP", "num_queries", "num_skipped"}`` (metrics in percent).
"""

from fct_jax.retrieval.kernel import RankStats, rank_stats
from fct_jax.retrieval.metrics import brute_force_stats, evaluate, metrics_from_stats

__all__ = ["RankStats", "rank_stats", "evaluate", "metrics_from_stats", "brute_force_stats"]
