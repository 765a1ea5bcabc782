"""The retrieval kernel's per-row counters: for each query row of scores, how many items score at or below each of
its positives' thresholds, and how many rank before its best positive (`kernel` says why counting replaces sorting).

Three methods, identical integer results (tested against each other); measurements and the variants tried and not
kept are in ``docs/performance.md``:

* ``"reduce_pairs"`` (the kernel's default): one variadic row reduction whose operands are the P+1 0/1 indicators
  ``[s ≤ t_j]`` (and the CMC "ranks before the best positive" test), packed two per uint32 (16-bit fields; a chunk
  holds at most :data:`PAIR_MAX_CHUNK` items so no field overflows). Each score is read once and every compare stays
  in registers: the fastest on CPU and GPU.
* ``"reduce"``: the same reduction with one int32 output per indicator (XLA:GPU writes the indicators to memory
  first, which makes it slower).
* ``"histogram"``: each score gets a bucket = the number of thresholds below it, then one scatter-add histogram per
  row; ``rank_le(j)`` is the cumulative histogram at ``#{k : t_k < t_j}``. Used for classes larger than
  :data:`UNROLL_MAX`, where the unrolled reductions would compile slowly.

Every counter takes ``(s, gidx, t, t_star, j_star)``: the (B, C) scores, their gallery indices (broadcastable to
(B, C)), the (B, P) thresholds, and per row the best positive score and its lowest gallery index.
"""

import jax.numpy as jnp
from jax import lax

# Above this many thresholds the bucket loop is rolled (lax.fori_loop) to bound compile time.
UNROLL_MAX = 128
# "reduce_pairs" counts in 16-bit fields: at most this many gallery items per chunk (a multiple of 8).
PAIR_MAX_CHUNK = 65528


def _bucket(s, thr):
  """(B, C) int32 number of thresholds strictly below each score; thr: (B, K)."""
  k = thr.shape[1]
  if k <= UNROLL_MAX:
    # Unrolled: one fused, vectorised elementwise pass with K compares per score.
    c = jnp.zeros(s.shape, jnp.int32)
    for j in range(k):
      c = c + (thr[:, j:j + 1] < s).astype(jnp.int32)
    return c
  return lax.fori_loop(0, k, lambda j, c: c + (lax.dynamic_slice_in_dim(thr, j, 1, 1) < s).astype(jnp.int32),
                       jnp.zeros(s.shape, jnp.int32))


def _bins(s, gidx, t, t_star, j_star):
  """(B, C) int32 histogram bin of each score, in [0, P+2] (how they are read: `kernel._build`); gidx: the scores'
  gallery indices, broadcastable to (B, C)."""
  p = t.shape[1]
  # Bin of a score: #{thresholds < s} + [s ≥ t*], in [0, P+1]. The extra term splits "s < t*" (bin 0, what CMC
  # needs) from "s = t*" (bin 1). Not nextafter(t*, -inf) as a threshold: XLA:CPU flushes denormals, and
  # nextafter(0) would become 0.
  c = _bucket(s, t) + (s >= t_star[:, None]).astype(jnp.int32)
  # Scores tied with the best positive but earlier in the gallery go to a separate bin: they rank before it (CMC
  # tie rule) and sit at or below every threshold (for rank_le).
  tie_before = (s == t_star[:, None]) & (gidx < j_star[:, None])
  return jnp.where(tie_before, p + 2, c)


def _count_histogram(s, gidx, t, t_star, j_star):
  """Histogram counting. Returns (B, P+3) int32 per-row histogram of the bins of `_bins`; gidx: the
  scores' gallery indices, broadcastable to (B, C)."""
  b, p = t.shape
  nb = p + 3
  # XLA:CPU's scatter is a scalar loop on one thread. A flat 1-D scatter-add is ~2x faster than a 2-D one, and
  # skipping the bounds checks (all indices are in bounds by construction) saves another ~10-30%.
  flat = _bins(s, gidx, t, t_star, j_star) + (jnp.arange(b, dtype=jnp.int32) * nb)[:, None]
  return jnp.zeros((b * nb,), jnp.int32).at[flat.reshape(-1)].add(1, mode="promise_in_bounds").reshape(b, nb)


def _rank_indicators(s, gidx, t, t_star, j_star):
  """The P+1 (B, C) 0/1 indicators summed by the reduce counters: [s ≤ t_j] for each threshold, then
  [s ranks before the best positive] (CMC tie rule); gidx broadcastable to (B, C)."""
  ops = [s <= t[:, j:j + 1] for j in range(t.shape[1])]
  ops.append((s < t_star[:, None]) | ((s == t_star[:, None]) & (gidx < j_star[:, None])))
  return ops


def _sum_rows(ops, dtype):
  zeros = tuple(dtype(0) for _ in ops)
  return lax.reduce(tuple(o.astype(dtype) for o in ops), zeros, lambda a, b: tuple(x + y for x, y in zip(a, b)),
                    (1,))


def _count_reduce(s, gidx, t, t_star, j_star):
  """Variadic-reduction counting. Returns (B, P+1) int32: rank_le for each threshold, then first_rank."""
  return jnp.stack(_sum_rows(_rank_indicators(s, gidx, t, t_star, j_star), jnp.int32), axis=1)


def _count_reduce_pairs(s, gidx, t, t_star, j_star):
  """As `_count_reduce`, with two indicators packed into one uint32 (16-bit fields): half as many reduction
  outputs. Exact while a chunk holds at most 65535 items (`kernel.rank_stats` caps the chunk)."""
  ops = _rank_indicators(s, gidx, t, t_star, j_star)
  if len(ops) % 2:
    ops.append(jnp.zeros_like(ops[0]))
  u = jnp.uint32
  words = _sum_rows([a.astype(u) | (b.astype(u) << 16) for a, b in zip(ops[0::2], ops[1::2])], u)
  out = []
  for w in words:
    out += [(w & 0xFFFF).astype(jnp.int32), (w >> 16).astype(jnp.int32)]
  return jnp.stack(out[:t.shape[1] + 1], axis=1)


# method name -> counter; "histogram" returns (B, P+3) bin counts, the reductions (B, P+1) counts.
COUNTERS = {"histogram": _count_histogram, "reduce": _count_reduce, "reduce_pairs": _count_reduce_pairs}
