"""Exact L2 top-k search: the k nearest gallery items (indices and distances) of each query.

The gallery is sharded over the mesh's ``data`` axis, queries are replicated and processed in blocks. Each device
ranks its shard by ``s = |g|² − 2 q·g`` (the squared distance minus the row-constant ``|q|²``, as in
:mod:`fct_jax.retrieval.kernel`), keeps its local top-k, and the devices' candidates are gathered and reduced to
the global top-k. Memory is O(block × shard), never M × N.

Ties are broken by gallery index, lower first (``lax.top_k`` keeps the lower position among equal values, and
the gathered candidates are ordered by device, i.e. by global index), so results do not depend on the device
count whenever the scores themselves do not.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fct_jax import sharding
from fct_jax.retrieval import kernel


# Scores per group in the two-stage selection (see `_local_topk`).
_GROUP = 16


def _local_topk(s, k: int, group: int):
  """Exact top-k (smallest first; ties: lower column first) of each row of s, in two stages when group > 1.

  Stage 1 takes each group of ``group`` consecutive columns' minimum and the k best groups; stage 2 the top-k
  among those k·group candidates. Exact: an element outside the k chosen groups sits in a group whose minimum
  comes after k group minima (by value, then column), i.e. after k distinct elements, so it is not in the top-k.
  The chosen groups are put back in column order before stage 2, so ``lax.top_k``'s tie rule (lower position
  first) is the column tie rule. ~5x faster than one ``lax.top_k`` over whole rows on XLA:CPU, whose top-k is a
  scalar loop while a materialised row-group minimum is a fast vectorised reduction.
  """
  b, n = s.shape
  if group <= 1:
    neg, pos = lax.top_k(-s, k)
    return -neg, pos
  # A barrier so that the minimum reduces a stored array (vectorised) rather than re-fusing the score expression
  # into a scalar reduction loop.
  s = lax.optimization_barrier(s)
  _, grp = lax.top_k(-s.reshape(b, n // group, group).min(axis=2), k)
  cols = (jnp.sort(grp, axis=1)[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)).reshape(b, k * group)
  neg, j = lax.top_k(-jnp.take_along_axis(s, cols, axis=1), k)
  return -neg, jnp.take_along_axis(cols, j, axis=1)


@functools.lru_cache(maxsize=32)
def _build(mesh: Mesh, *, n_local: int, k: int, block: int, group: int):
  k_local = min(k, n_local)

  def per_device(q, g, g_sq):
    offset = lax.axis_index("data") * n_local

    def one_block(qb):
      # Padding rows have |g|² = +inf (kernel.pad_gallery), so they never rank ahead of a real item.
      val, pos = _local_topk(kernel.scores(qb, g, g_sq), k_local, group)
      cand_s = lax.all_gather(val, "data", axis=1, tiled=True)  # [B, n_dev * k_local], device-major
      cand_i = lax.all_gather(offset + pos, "data", axis=1, tiled=True)
      neg, j = lax.top_k(-cand_s, k)
      idx = jnp.take_along_axis(cand_i, j, axis=1)
      d2 = jnp.maximum(-neg + jnp.sum(qb * qb, axis=1, keepdims=True), 0.0)
      return idx, jnp.sqrt(d2)

    return lax.map(one_block, q)

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P()),
                     check_vma=False)
  return jax.jit(fn)


def topk(queries, gallery, k: int, *, mesh: Mesh | None = None, query_block: int = 256,
         progress: kernel.ProgressFactory | None = None) -> Tuple[np.ndarray, np.ndarray]:
  """The ``k`` nearest gallery rows of every query under the L2 distance.

  Args:
    queries: [M, d] float array.
    gallery: [N, d] float array (any float dtype; computed in float32).
    k: neighbours per query; at most N.
    mesh: a Mesh with a ``data`` axis to shard the gallery over; default: all devices.
    query_block: queries per block.
    progress: reports queries done on long searches (a `kernel.ProgressFactory`; see `kernel.rank_stats`).

  Returns:
    ``(indices [M, k] int32, distances [M, k] float32)``: gallery row indices, nearest first (ties: lower index
    first), and their Euclidean distances.
  """
  mesh = mesh or sharding.make_mesh()
  q = np.asarray(queries, np.float32)
  g = np.asarray(gallery, np.float32)
  m, d = q.shape
  n = g.shape[0]
  if g.ndim != 2 or g.shape[1] != d:
    raise ValueError(f"gallery shape {g.shape} does not match queries' width {d}")
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must be in [1, {n}] (the gallery size)")
  n_dev = mesh.shape["data"]
  n_local = max(-(-n // n_dev), 1)
  # Two-stage selection where each shard has several groups per wanted neighbour (CPU only: on accelerators
  # lax.top_k is fast and the extra passes would not pay).
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  group = _GROUP if on_cpu and n_local >= 4 * k * _GROUP else 1
  n_local = -(-n_local // group) * group
  g_p, g_sq = kernel.pad_gallery(g, n_local * n_dev)
  block = max(1, min(query_block, m))
  progress, per_call, m_pad = kernel.plan_calls(m, n, block, progress, on_cpu)
  q_p = np.zeros((m_pad, d), np.float32)
  q_p[:m] = q
  fn = _build(mesh, n_local=n_local, k=k, block=block, group=group)
  shard = NamedSharding(mesh, P("data"))
  return kernel.run_calls(fn, (q_p.reshape(-1, block, d),), (kernel.put(g_p, shard), kernel.put(g_sq, shard)),
                          mesh=mesh, per_call=per_call, rows=m, progress=progress)
