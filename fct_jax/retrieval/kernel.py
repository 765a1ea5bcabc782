"""Exact blocked L2 retrieval kernel: per-query rank statistics without the N×N matrix or a row sort.

For every query the kernel returns three numbers, from which CMC top-k and mAP follow exactly
(`fct_jax.retrieval.metrics`):

* ``num_pos``: how many gallery items share the query's label (the query's own item excluded);
* ``first_rank``: the 0-based rank of the best positive;
* ``ap``: the average precision over the *full* ranking (mAP@R=1.0).

How (per block of B queries, per gallery chunk of C items, memory O(B × C), never N×N):

1. Scores ``s[b, n] = |g_n|² − 2 q_b·g_n`` by one matmul. Ranking by ``s`` equals ranking by the squared L2 distance
   (``|q_b|²`` is constant along a row; leaving it out also avoids one rounding). Gallery padding scores ``+inf``
   (its ``|g|²`` is set to ``+inf``), above every threshold; the query's own item (index i when ``query_is_gallery``)
   is never a threshold, and its contribution is subtracted from the counts once per row (no (B, C) mask in the
   hot loop).
2. The scores of the query's positives, gathered from that same ``s`` (so a positive compares equal to itself
   bitwise): the thresholds ``t[b, j]``. Positives come from a host-built class table (gallery indices per class).
3. Counting instead of sorting. AP needs, for each positive j, only ``rank_le(j) = #{n : s_n ≤ t_j}`` and
   ``pos_le(j) = #{positives k : t_k ≤ t_j}``: ``AP = (1/P) Σ_j pos_le(j) / rank_le(j)``. ``rank_le`` is counted
   in one pass over the row; ``pos_le`` is a P×P comparison.

Tie rule (deterministic, documented; ties are between *computed* float32 scores):

* mAP: tied items form one group that is counted at its end, i.e. exactly scikit-learn's
  ``average_precision_score(y_true, -distance)`` (which groups equal scores into one threshold). The reference,
  ml-fct, calls that same function, so its ties are handled identically; no gallery order enters.
* CMC: ties are broken by gallery index, lower index first — the order of a stable argsort and of ``lax.top_k``.
  ``first_rank = #{n : s_n < t*} + #{n : s_n = t*, n < j*}`` where t* is the best positive score and j* the lowest
  gallery index among the positives scoring t*.
  # ml-fct: np.argsort (quicksort, unstable) leaves the order of tied items unspecified; ours is fixed.

Counting methods: `counting` (identical integer results; ``"reduce_pairs"`` by default).

Sharding: the gallery is sharded over the mesh's ``data`` axis (so a gallery larger than one device works), queries
are replicated, and thresholds (``pmin``) and counts (``psum``) are combined across devices. All combined quantities
are exact (a min of values, sums of integers), so results equal the one-device results whenever the per-shard matmul
rounds each score the same way (always for integer-valued data; in practice for float data).

Galleries larger than one device's memory per block are processed in chunks with two passes (thresholds, then
counts); the matmul is recomputed in the second pass rather than stored, and being the same compiled op on the same
shapes it reproduces the scores bitwise.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fct_jax import sharding
from fct_jax.retrieval import counting

COUNT_METHODS = ("auto",) + tuple(counting.COUNTERS)
# With a progress factory, progress is reported from this many query × gallery scores on (about 10 s of work on a
# 2-core CPU at d=128; on accelerators about as long at their speed), in about PROGRESS_CALLS calls: shorter jobs
# keep one jitted call.
PROGRESS_MIN_SCORES = {"cpu": 2_000_000_000, "accelerator": 200_000_000_000}
PROGRESS_CALLS = 20

# How callers get progress without this module printing (retrieval sits below fct_jax.writers): called with the
# number of queries when a long job starts, it returns a callback that takes how many are done after each call.
# E.g. ``lambda total: writers.Progress(total, unit="queries").update``.
ProgressFactory = Callable[[int], Callable[[int], None]]


class RankStats(NamedTuple):
  """Per-query rank statistics (host numpy arrays, length M = number of queries).

  Attributes:
    num_pos: (M,) int32, number of positives in the gallery (own item excluded). 0 means "skipped".
    first_rank: (M,) int32, 0-based rank of the best positive under the index tie-break (undefined if num_pos == 0).
    ap: (M,) float32, average precision over the full ranking (0 if num_pos == 0).
  """
  num_pos: np.ndarray
  first_rank: np.ndarray
  ap: np.ndarray


def _to_host(x) -> np.ndarray:
  """numpy copy of x; a jax.Array spread over several processes is gathered first (multi-host)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(x)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _class_table(query_labels: np.ndarray, gallery_labels: np.ndarray):
  """Maps labels to class ids and lists the gallery indices of each class.

  Returns:
    q_cls: (M,) int32 class id per query; queries whose class has no gallery item get the empty row C.
    table: (C + 1, P) int32 gallery indices per class in increasing order, padded with N (the sentinel); the last
      row is all sentinel. P = the largest gallery class among the query classes (at least 1).
  """
  n = gallery_labels.shape[0]
  classes, g_cls = np.unique(gallery_labels, return_inverse=True)
  g_cls = g_cls.reshape(-1)
  num_classes = classes.shape[0]
  pos = np.searchsorted(classes, query_labels)
  pos_c = np.minimum(pos, num_classes - 1)
  found = classes[pos_c] == query_labels
  q_cls = np.where(found, pos_c, num_classes).astype(np.int32)
  counts = np.bincount(g_cls, minlength=num_classes)
  used = np.unique(q_cls[found])
  p = max(1, int(counts[used].max()) if used.size else 1)
  order = np.argsort(g_cls, kind="stable")  # within a class: increasing gallery index
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  table = np.full((num_classes + 1, p), n, dtype=np.int32)
  slot = np.arange(n) - starts[g_cls[order]]
  keep = slot < p  # classes no query asks for may be larger than P; they are never looked up
  table[g_cls[order][keep], slot[keep]] = order[keep]
  return q_cls, table


@functools.lru_cache(maxsize=64)
def _build(mesh: Mesh, *, n_total: int, n_local: int, chunk: int, block: int, p: int, self_exclude: bool,
           method: str):
  """A jitted function (q, q_cls, q_idx, g, g_sq, table) -> (num_pos, first_rank, ap), cached per static config."""
  n_chunks = n_local // chunk
  inf = jnp.float32(jnp.inf)
  count_fn = counting.COUNTERS[method]

  def per_device(q, q_cls, q_idx, g, g_sq, table):
    offset = lax.axis_index("data") * n_local
    g = g.reshape(n_chunks, chunk, -1)
    g_sq = g_sq.reshape(n_chunks, chunk)
    gidx_all = (offset + jnp.arange(n_local, dtype=jnp.int32)).reshape(n_chunks, chunk)

    def one_block(args):
      qb, qc, qi = args
      pos = table[qc]  # (B, P) global gallery indices, n_total = padding
      valid = pos < n_total
      if self_exclude:
        valid = valid & (pos != qi[:, None])

      def thresholds_of(c, s):
        local = pos - (offset + c * chunk)
        inside = valid & (local >= 0) & (local < chunk)
        got = jnp.take_along_axis(s, jnp.clip(local, 0, chunk - 1), axis=1)
        return jnp.where(inside, got, inf)

      if n_chunks == 1:
        s0 = scores(qb, g[0], g_sq[0])
        t = thresholds_of(0, s0)
      else:
        def pass1(t, c):
          s = scores(qb, g[c], g_sq[c])
          return jnp.minimum(t, thresholds_of(c, s)), None
        t, _ = lax.scan(pass1, jnp.full(pos.shape, inf), jnp.arange(n_chunks))
      # Each positive lives on exactly one device; elsewhere it is +inf, so a min recovers it exactly.
      t = lax.pmin(t, "data")
      t = jnp.where(valid, t, inf)
      num_pos = valid.sum(axis=1, dtype=jnp.int32)
      t_star = t.min(axis=1)
      j_star = jnp.where(valid & (t == t_star[:, None]), pos, jnp.int32(n_total)).min(axis=1)

      def count(c, s):
        # Excluded items: gallery padding scores +inf (|g|² = +inf for padding rows, set on the host), above every
        # threshold. The query's own item (query_is_gallery) is counted with the rest, then its contribution is
        # taken out once per row: the same counter on that one score (the same value, the same compares, bitwise).
        # No (B, C) mask in the hot loop: on XLA:CPU a mask built from the query index compiles the fused counting
        # to a scalar loop.
        acc = count_fn(s, gidx_all[c][None, :], t, t_star, j_star)
        if self_exclude:
          loc = qi - (offset + c * chunk)
          col = jnp.clip(loc, 0, chunk - 1)
          own = count_fn(jnp.take_along_axis(s, col[:, None], axis=1), gidx_all[c][col][:, None], t, t_star, j_star)
          acc = acc - own * ((loc >= 0) & (loc < chunk)).astype(jnp.int32)[:, None]
        return acc

      if n_chunks == 1:
        acc = count(0, s0)
      else:
        def pass2(acc, c):
          s = scores(qb, g[c], g_sq[c])
          return acc + count(c, s), None
        shape = (block, p + 3) if method == "histogram" else (block, p + 1)
        acc, _ = lax.scan(pass2, jnp.zeros(shape, jnp.int32), jnp.arange(n_chunks))
      first_rank, ap = _ranks(lax.psum(acc, "data"), t, valid, num_pos, p=p, method=method)
      return num_pos, first_rank, ap

    return lax.map(one_block, (q, q_cls, q_idx))

  fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P("data"), P("data"), P()),
                     out_specs=(P(), P(), P()), check_vma=False)
  return jax.jit(fn)


def _ranks(acc, t, valid, num_pos, *, p: int, method: str):
  """``(first_rank, ap)`` of a query block from its summed counts ``acc`` and its positives' thresholds ``t``."""
  if method == "histogram":
    special = acc[:, p + 2]
    first_rank = acc[:, 0] + special  # bin 0: scores < t*
    # With lt[j] = #{thresholds < t_j}: s ≤ t_j ⟺ bin(s) ≤ lt[j] + 1 (for valid j, t_j ≥ t*). Invalid
    # thresholds are +inf and never below anything.
    lt = (t[:, None, :] < t[:, :, None]).sum(axis=2, dtype=jnp.int32)
    cum = jnp.cumsum(acc[:, :p + 2], axis=1)
    rank_le = jnp.take_along_axis(cum, jnp.clip(lt + 1, 0, p + 1), axis=1) + special[:, None]
  else:
    rank_le, first_rank = acc[:, :p], acc[:, p]
  pos_le = (valid[:, None, :] & (t[:, None, :] <= t[:, :, None])).sum(axis=2, dtype=jnp.int32)
  terms = jnp.where(valid, pos_le.astype(jnp.float32) / jnp.maximum(rank_le, 1).astype(jnp.float32), 0.0)
  return first_rank, terms.sum(axis=1) / jnp.maximum(num_pos, 1).astype(jnp.float32)


def rank_stats(queries, gallery, query_labels, gallery_labels, *, query_is_gallery: bool = False,
               mesh: Mesh | None = None, query_block: int | None = None, gallery_chunk: int | None = None,
               max_block_bytes: int = 1 << 28, count_method: str = "auto",
               progress: ProgressFactory | None = None) -> RankStats:
  """Exact per-query rank statistics for L2 retrieval (inputs assumed validated; see `metrics.evaluate`).

  Args:
    queries: (M, d) float array (numpy or jax).
    gallery: (N, d) float array; may come from a different model than the queries.
    query_labels: (M,) labels (any numpy-comparable dtype).
    gallery_labels: (N,) labels.
    query_is_gallery: the i-th query is gallery item i; it is excluded from its own ranking (M must equal N).
    mesh: a Mesh with a ``data`` axis to shard the gallery over; default: all devices.
    query_block: queries per block (B); default 256 on CPU (cache-sized), on accelerators the power of two
      (256 to 4096) whose B × shard scores fill about ``max_block_bytes`` (fewer, larger steps).
    gallery_chunk: gallery items per chunk on one device (C); default: the whole shard if B×C×4 bytes fits
      ``max_block_bytes``, else the largest chunk that does (then two passes).
    max_block_bytes: memory budget of one B×C score block.
    count_method: "auto" (= "reduce_pairs"), "reduce_pairs", "reduce" or "histogram" (see `counting`; same
      results). The reductions fall back to "histogram" for classes larger than 128 (their unrolled
      compares would compile slowly).
    progress: a :data:`ProgressFactory` to report queries done while the query blocks run, in about
      :data:`PROGRESS_CALLS` jitted calls instead of one; used only for long jobs, M × N at or above
      :data:`PROGRESS_MIN_SCORES` for the platform (about 10 s or more). None (default): no reporting. Results do
      not depend on it.

  Returns:
    RankStats of numpy arrays, length M.
  """
  if count_method not in COUNT_METHODS:
    raise ValueError(f"count_method must be one of {COUNT_METHODS}, got {count_method!r}")
  mesh = mesh or sharding.make_mesh()
  if "data" not in mesh.axis_names:
    raise ValueError(f"mesh needs a 'data' axis, has {mesh.axis_names}")
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  if count_method == "auto":
    count_method = "reduce_pairs"
  q = _to_host(queries).astype(np.float32, copy=False)
  g = _to_host(gallery).astype(np.float32, copy=False)
  ql, gl = _to_host(query_labels).reshape(-1), _to_host(gallery_labels).reshape(-1)
  m, d = q.shape
  n = g.shape[0]
  q_cls, table = _class_table(ql, gl)
  p = table.shape[1]
  if count_method != "histogram" and p > counting.UNROLL_MAX:
    count_method = "histogram"

  n_dev = mesh.shape["data"]
  block, chunk, n_local = plan_blocks(m, n, n_dev, on_cpu=on_cpu, query_block=query_block,
                                      gallery_chunk=gallery_chunk, max_block_bytes=max_block_bytes,
                                      count_method=count_method)
  progress, per_call, m_pad = plan_calls(m, n, block, progress, on_cpu)
  g_p, g_sq = pad_gallery(g, n_local * n_dev)
  q_p, q_cls_p, q_idx = _pad_queries(q, q_cls, table.shape[0] - 1, m_pad)
  nb = m_pad // block

  fn = _build(mesh, n_total=n, n_local=n_local, chunk=chunk, block=block, p=p, self_exclude=query_is_gallery,
              method=count_method)
  rep = NamedSharding(mesh, P())
  shard = NamedSharding(mesh, P("data"))

  num_pos, first_rank, ap = run_calls(
      fn, (q_p.reshape(nb, block, d), q_cls_p.reshape(nb, block), q_idx.reshape(nb, block)),
      (put(g_p, shard), put(g_sq, shard), put(table, rep)), mesh=mesh, per_call=per_call, rows=m,
      progress=progress)
  return RankStats(num_pos=num_pos, first_rank=first_rank, ap=ap)


def plan_blocks(m: int, n: int, n_dev: int, *, on_cpu: bool, query_block: int | None, gallery_chunk: int | None,
                max_block_bytes: int, count_method: str):
  """``(block, chunk, n_local)``: queries per block, gallery items per chunk on one device, and the padded shard
  length (a multiple of ``chunk``), from the defaults described in :func:`rank_stats`."""
  per_dev = -(-n // n_dev)
  if query_block is None:
    query_block = 256
    if not on_cpu:
      fit = max_block_bytes // (4 * max(per_dev, 1))
      query_block = int(min(4096, max(256, 2 ** int(np.log2(max(fit, 1))))))
  block = max(1, min(query_block, m))
  if gallery_chunk is None:
    gallery_chunk = max(256, max_block_bytes // (4 * block))
  if count_method == "reduce_pairs":
    gallery_chunk = min(gallery_chunk, counting.PAIR_MAX_CHUNK)
  chunk = min(_round_up(per_dev, 8), _round_up(gallery_chunk, 8))
  return block, chunk, _round_up(per_dev, chunk)


def _pad_queries(q: np.ndarray, q_cls: np.ndarray, empty_class: int, rows: int):
  """Queries, their class rows and indices padded to ``rows``: padding queries have the empty class row (no
  positive: never counted) and index −1 (no self to exclude)."""
  m = len(q)
  q_p = q
  if rows != m:
    q_p = np.zeros((rows, q.shape[1]), np.float32)
    q_p[:m] = q
  q_cls_p = np.full((rows,), empty_class, np.int32)
  q_cls_p[:m] = q_cls
  q_idx = np.full((rows,), -1, np.int32)
  q_idx[:m] = np.arange(m)
  return q_p, q_cls_p, q_idx


def scores(q, g, g_sq):
  """``s = |g|² − 2 q·g`` (B, C): the squared L2 distance minus the row-constant ``|q|²``, the ranking score of
  this kernel and of `topk`."""
  # HIGHEST: TF32/bf16 matmul passes on accelerators would reorder neighbours.
  return g_sq[None, :] - 2.0 * jnp.dot(q, g.T, precision=lax.Precision.HIGHEST)


def pad_gallery(g: np.ndarray, rows: int):
  """``(g_p, g_sq)``: the gallery zero-padded to ``rows`` and its squared norms, +inf for the padding rows, so
  that a padding row scores +inf (`scores`): ranked after every real item, never counted."""
  g = np.ascontiguousarray(g, np.float32)
  g_p = g
  if rows != len(g):
    g_p = np.zeros((rows, g.shape[1]), np.float32)
    g_p[:len(g)] = g
  g_sq = np.full((rows,), np.inf, np.float32)
  g_sq[:len(g)] = np.einsum("nd,nd->n", g, g, dtype=np.float32)
  return g_p, g_sq


def put(x: np.ndarray, where: NamedSharding) -> jax.Array:
  """A host array onto the mesh; works the same on one host and on many (every process holds all of x)."""
  return jax.make_array_from_callback(x.shape, where, lambda idx: x[idx])


def plan_calls(m: int, n: int, block: int, progress: ProgressFactory | None, on_cpu: bool):
  """How the query blocks are split into jitted calls: ``(progress, blocks_per_call, padded_query_count)``.

  All blocks in one call, or, for a job to report progress on, about :data:`PROGRESS_CALLS` calls of one compiled
  shape, the last padded with empty queries, so that progress can be reported between calls. A job reports when
  ``progress`` is given and M × N is at or above :data:`PROGRESS_MIN_SCORES` for the platform; the returned
  ``progress`` is the factory then, else None.
  """
  if progress is not None and m * n < PROGRESS_MIN_SCORES["cpu" if on_cpu else "accelerator"]:
    progress = None
  blocks = -(-m // block)
  per_call = -(-blocks // PROGRESS_CALLS) if progress is not None else blocks
  return progress, per_call, -(-blocks // per_call) * per_call * block


def run_calls(fn, blocked, shared, *, mesh: Mesh, per_call: int, rows: int,
              progress: ProgressFactory | None = None):
  """Runs ``fn(*blocked_slices, *shared)`` over ``per_call`` blocks at a time (host arrays of leading size
  blocks, replicated onto ``mesh``); returns fn's outputs as host arrays, blocks flattened, cut to ``rows``.
  With ``progress`` (a :data:`ProgressFactory`), reports the rows done after each call."""
  rep = NamedSharding(mesh, P())
  n_calls = blocked[0].shape[0] // per_call
  bar = progress(rows) if progress is not None else None
  outs = []
  for i in range(n_calls):
    sl = slice(i * per_call, (i + 1) * per_call)
    out = fn(*(put(b[sl], rep) for b in blocked), *shared)
    if bar is not None:
      out = tuple(np.asarray(o) for o in out)  # waits for this call
      bar(min(rows, (i + 1) * per_call * blocked[0].shape[1]))
    outs.append(out)
  return tuple(np.concatenate([np.asarray(o[k]).reshape((-1,) + o[k].shape[2:]) for o in outs])[:rows]
               for k in range(len(outs[0])))
