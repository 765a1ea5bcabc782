"""Search a gallery store: the top-k stored items (ids + L2 distances) of each query, streamed chunk by chunk."""

from typing import Optional, Tuple

import numpy as np
from jax.sharding import Mesh

from fct_jax import writers
from fct_jax.errors import FCTError
from fct_jax.gallery import store as store_lib
from fct_jax.retrieval import topk as topk_lib

# Queries done per store step, on long steps (the kernel decides what is long).
_PROGRESS = writers.progress_factory("queries", "[search] ")


def search(version: store_lib.Version, queries: np.ndarray, k: int, *, mesh: Optional[Mesh] = None,
           chunks_per_step: int = 1) -> Tuple[np.ndarray, np.ndarray]:
  """Exact L2 top-k of ``queries`` against every stored embedding of ``version``.

  The store is read ``chunks_per_step`` chunks at a time (checksums verified), each step searched with the
  sharded kernel of :func:`fct_jax.retrieval.topk.topk`, and the running top-k merged on the host. Ties keep
  the lower store position, as in one search over the whole gallery.

  Args:
    version: a committed store version; queries must come from the model its ``model.embedding`` names.
    queries: [M, d] float array, d = the store's embedding width.
    k: neighbours per query (at most the store's item count).
    mesh: a ``data`` mesh (default: all devices).
    chunks_per_step: store chunks searched per kernel call.

  Returns:
    ``(ids [M, k] int64, distances [M, k] float32)``: stored item ids, nearest first.
  """
  q = np.asarray(queries, np.float32)
  if q.ndim != 2 or q.shape[1] != version.embedding_dim:
    raise FCTError(f"queries have shape {q.shape}, but the gallery {version.path} holds "
                   f"{version.embedding_dim}-d embeddings")
  if not 1 <= k <= version.count:
    raise FCTError(f"k={k} must be between 1 and the gallery size {version.count}")
  best_d = np.full((q.shape[0], 0), np.inf, np.float32)
  best_id = np.zeros((q.shape[0], 0), np.int64)
  for c0 in range(0, version.num_chunks, chunks_per_step):
    parts = [version.read_chunk(i) for i in range(c0, min(c0 + chunks_per_step, version.num_chunks))]
    emb = np.concatenate([p["embeddings"] for p in parts])
    ids = np.concatenate([p["ids"] for p in parts])
    idx, dist = topk_lib.topk(q, emb, min(k, emb.shape[0]), mesh=mesh, progress=_PROGRESS)
    # Running results first: among equal distances the earlier (lower) store position stays ahead.
    all_d = np.concatenate([best_d, dist], axis=1)
    all_id = np.concatenate([best_id, ids[idx]], axis=1)
    order = np.argsort(all_d, axis=1, kind="stable")[:, :k]
    best_d = np.take_along_axis(all_d, order, axis=1)
    best_id = np.take_along_axis(all_id, order, axis=1)
  return best_id, best_d
