"""fct_jax.retrieval against a NumPy brute force (stable argsort per row) and scikit-learn.

Exact ties come from small integer-valued embeddings: their float32 scores are exact integers, so every summation
order (matmul blocking, shards, chunks) gives the same bits and the tie rule is what is tested.
"""

import math
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from fct_jax import retrieval
from fct_jax.retrieval import backfill, cases, cka, kernel, metrics, topk
from fct_jax.stages import evaluation

MESH1 = Mesh(np.asarray(jax.devices()[:1]), ("data",))


def _mesh8():
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 (simulated) devices")
  return Mesh(np.asarray(jax.devices()[:8]), ("data",))


def _tied_set(seed, n=97, d=4, classes=15):
  """Integer embeddings in {-1, 0, 1}: many exact ties and duplicates; a few classes of size 1."""
  rng = np.random.default_rng(seed)
  x = rng.integers(-1, 2, (n, d)).astype(np.float32)
  x[5] = x[17]  # duplicates inside and across classes
  x[30] = x[31]
  labels = rng.integers(0, classes, n)
  labels[-3:] = [1000, 1001, 1002]  # singletons: no positive once the query's own item is removed
  return x, labels


def _assert_same(stats, ref):
  np.testing.assert_array_equal(stats.num_pos, ref.num_pos)
  has = ref.num_pos > 0
  np.testing.assert_array_equal(stats.first_rank[has], ref.first_rank[has])
  np.testing.assert_allclose(stats.ap, ref.ap, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["histogram", "reduce", "reduce_pairs"])
@pytest.mark.parametrize("devices,chunk", [(1, None), (1, 24), (8, None), (8, 8)])
def test_ties_duplicates_singletons_match_brute_force(method, devices, chunk):
  mesh = MESH1 if devices == 1 else _mesh8()
  x, labels = _tied_set(0)
  ref = metrics.brute_force_stats(x, x, labels, labels, query_is_gallery=True)
  assert (ref.num_pos == 0).sum() >= 3
  got = kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, mesh=mesh, count_method=method,
                          gallery_chunk=chunk, query_block=32)
  _assert_same(got, ref)


class _Lines:
  """A progress factory that records each report, as a caller's bar would print it."""

  def __init__(self):
    self.lines = []

  def __call__(self, total):
    return lambda done: self.lines.append((done, total))


@pytest.mark.parametrize("devices", [1, 8])
def test_progress_reporting_gives_the_same_results(devices, monkeypatch):
  """A progress factory on a long job: the blocks run in several calls (the last padded), one report per call;
  the same numbers. Short jobs keep one call and report nothing."""
  mesh = MESH1 if devices == 1 else _mesh8()
  x, labels = _tied_set(11, n=150)
  ref = kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, mesh=mesh, query_block=8)
  short = _Lines()
  kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, mesh=mesh, query_block=8, progress=short)
  assert short.lines == []  # 150 × 150 scores: far below PROGRESS_MIN_SCORES
  monkeypatch.setattr(kernel, "PROGRESS_MIN_SCORES", {"cpu": 0, "accelerator": 0})  # every job is long
  bar = _Lines()
  got = kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, mesh=mesh, query_block=8, progress=bar)
  # 150 queries in blocks of 8 = 19 blocks, one per call (PROGRESS_CALLS = 20); the last report says all are done.
  assert len(bar.lines) == 19 and bar.lines[-1] == (150, 150), bar.lines
  assert [d for d, _ in bar.lines] == sorted(d for d, _ in bar.lines)
  _assert_same(got, ref)
  bar = _Lines()
  r = retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, mesh=mesh, query_block=64, progress=bar)
  assert len(bar.lines) == 3  # 3 blocks of 64
  assert r == retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, mesh=mesh, query_block=64)


def test_progress_bar_from_writers(monkeypatch, capsys):
  """The bar callers build from writers.Progress (the kernel itself never prints)."""
  monkeypatch.setattr(kernel, "PROGRESS_MIN_SCORES", {"cpu": 0, "accelerator": 0})
  x, labels = _tied_set(11, n=150)
  kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, mesh=MESH1, query_block=8,
                    progress=evaluation.retrieval_progress)
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 19 and all(l.startswith("[retrieval] ") for l in lines), lines
  assert lines[-1].startswith("[retrieval] 150/150 queries") and "ETA" in lines[-1]


def test_query_not_gallery_float_data_and_missing_classes():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((41, 6)).astype(np.float32)  # e.g. φ_new queries
  g = rng.standard_normal((73, 6)).astype(np.float32) * 2 + 0.5  # e.g. h(φ_old, ψ) gallery
  ql, gl = rng.integers(0, 9, 41), rng.integers(0, 7, 73)  # query classes 7, 8 have no gallery item
  ref = metrics.brute_force_stats(q, g, ql, gl)
  for method in ("histogram", "reduce", "reduce_pairs"):
    got = kernel.rank_stats(q, g, ql, gl, mesh=MESH1, count_method=method, query_block=16)
    _assert_same(got, ref)
  r = retrieval.evaluate(q, g, ql, gl, mesh=MESH1, query_block=16)
  assert r["num_skipped"] == int(np.isin(ql, [7, 8]).sum()) > 0
  assert r["num_queries"] == 41


def test_eight_devices_identical_to_one_on_float_data():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((150, 8)).astype(np.float32)
  labels = rng.integers(0, 6, 150)
  one = retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=(1, 5, 10), mesh=MESH1, query_block=32)
  eight = retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=(1, 5, 10), mesh=_mesh8(),
                             query_block=32)
  default = retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, ks=(1, 5, 10), query_block=32)
  assert one == eight == default


def test_map_equals_sklearn_per_query_with_and_without_ties():
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(3)
  for x, labels in [(rng.standard_normal((60, 5)).astype(np.float32), rng.integers(0, 5, 60)), _tied_set(4, n=60)]:
    got = kernel.rank_stats(x, x, labels, labels, query_is_gallery=True, mesh=MESH1, query_block=32)
    s = metrics.brute_force_stats(x, x, labels, labels, query_is_gallery=True)
    d = np.sum(x * x, 1)[None] - 2 * (x @ x.T)  # float32 scores, as the kernel ranks them
    for i in range(len(x)):
      keep = np.arange(len(x)) != i
      y = labels[keep] == labels[i]
      if y.any():
        # ml-fct's AP: average_precision_score(y_true, -distance); equal scores form one threshold.
        assert got.ap[i] == pytest.approx(sk.average_precision_score(y, -d[i, keep]), abs=1e-6)
      else:
        assert s.num_pos[i] == got.num_pos[i] == 0


def test_cmc_definition_k_larger_than_gallery_and_types():
  # 1-D toy: query 0 at 0; gallery items at distances 1 (neg), 2 (pos), 2 (neg), 3 (pos).
  q = np.array([[0.0]], np.float32)
  g = np.array([[1.0], [2.0], [-2.0], [3.0]], np.float32)
  r = retrieval.evaluate(q, g, np.array([7]), np.array([0, 7, 0, 7]), ks=(1, 2, 3, 100), mesh=MESH1)
  assert r["cmc_top1"] == 0.0 and r["cmc_top2"] == 100.0 and r["cmc_top100"] == 100.0
  # The positive at 2 ties with a negative: the group {pos, neg} counts at its end (precision 1/3), then 2/4.
  assert r["mAP"] == pytest.approx(100 * (1 / 3 + 2 / 4) / 2)
  assert all(type(v) in (float, int) for v in r.values())
  # Tie at distance 2: the positive (index 1) precedes the negative (index 2) by the index rule...
  assert retrieval.evaluate(q, g[[0, 1, 2, 3]], np.array([7]), np.array([0, 7, 0, 7]), ks=(2,), mesh=MESH1)[
      "cmc_top2"] == 100.0
  # ...and follows it when the negative has the lower index; AP is order-free (tied group counted at its end).
  r2 = retrieval.evaluate(q, g[[0, 2, 1, 3]], np.array([7]), np.array([0, 0, 7, 7]), ks=(2,), mesh=MESH1)
  assert r2["cmc_top2"] == 0.0
  assert r2["mAP"] == pytest.approx(100 * (1 / 3 + 2 / 4) / 2)


def test_all_skipped_gives_nan_and_counts():
  x = np.eye(3, dtype=np.float32)
  r = retrieval.evaluate(x, x, np.arange(3), np.arange(3), query_is_gallery=True, mesh=MESH1)
  assert r["num_skipped"] == 3 and math.isnan(r["mAP"]) and math.isnan(r["cmc_top1"])


def test_string_labels_and_jax_inputs():
  rng = np.random.default_rng(5)
  x = rng.standard_normal((20, 3)).astype(np.float32)
  labels = np.array(list("abcde") * 4)
  ints = np.repeat(np.arange(5)[None], 4, 0).reshape(-1)
  a = retrieval.evaluate(jax.numpy.asarray(x), x, labels, labels, query_is_gallery=True, mesh=MESH1)
  b = retrieval.evaluate(x, x, ints, ints, query_is_gallery=True, mesh=MESH1)
  assert a == b


@pytest.mark.parametrize("args,kwargs,match", [
    (((5, 3), (6, 4), 5, 6), {}, "dimensions differ"),
    (((0, 3), (6, 3), 0, 6), {}, "empty"),
    (((5, 3), (6, 3), 4, 6), {}, "query_labels must have shape"),
    (((5, 3), (6, 3), 5, 7), {}, "gallery_labels must have shape"),
    (((5, 3), (6, 3), 5, 6), {"query_is_gallery": True}, "as many queries"),
    (((5, 3), (6, 3), 5, 6), {"ks": (0,)}, "ks must be positive"),
    (((5,), (6, 3), 5, 6), {}, "2-D"),
])
def test_bad_inputs_raise_one_line_errors(args, kwargs, match):
  qs, gs, nq, ng = args
  with pytest.raises(ValueError, match=match) as e:
    retrieval.evaluate(np.ones(qs, np.float32), np.ones(gs, np.float32), np.zeros(nq), np.zeros(ng), **kwargs)
  assert "\n" not in str(e.value)


def test_nan_embeddings_raise():
  x = np.ones((4, 2), np.float32)
  x[2, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    retrieval.evaluate(x, x, np.zeros(4), np.zeros(4), query_is_gallery=True)
  with pytest.raises(ValueError, match="differ from gallery_labels"):
    retrieval.evaluate(np.ones((4, 2)), np.ones((4, 2)), np.zeros(4), np.ones(4), query_is_gallery=True)


def test_case_table_rows_markdown_and_json():
  x, labels = _tied_set(6, n=40)
  rng = np.random.default_rng(6)
  emb = {"old": x, "new": x + rng.standard_normal(x.shape).astype(np.float32) * 0.1, "h": x * 2}
  res = cases.evaluate_cases(emb, labels, mesh=MESH1, query_block=32)
  assert list(res) == ["old/old", "new/old", "new/new", "h/h", "new/h"]
  assert res["old/old"] == retrieval.evaluate(x, x, labels, labels, query_is_gallery=True, mesh=MESH1)
  table = cases.format_markdown_table(res)
  assert table.count("\n") == 6 and "| new/h |" in table and "CMC top-5" in table
  assert cases.to_jsonable(res)["h/h"]["num_queries"] == 40
  only = cases.evaluate_cases({"old": x, "bct": x}, labels, [("bct", "old")], mesh=MESH1, query_block=32)
  assert list(only) == ["bct/old"]
  with pytest.raises(ValueError, match="available"):
    cases.evaluate_cases(emb, labels, [("new", "bct")])


def _gram_cka_unbiased(x, y):
  """Song et al. (2012) unbiased HSIC on Gram matrices: the slow definition."""
  def hsic(k, l):
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + one @ k @ one * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one)
  k, l = x @ x.T, y @ y.T
  return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("group", [1, 4, 16])
def test_two_stage_local_topk_is_exact_with_ties(group):
  """The grouped selection equals one lax.top_k, ties included: small integers, so rows are full of equal values,
  and equal minima in several groups."""
  rng = np.random.default_rng(group)
  s = rng.integers(0, 6, (9, 256)).astype(np.float32)
  s[0] = 3.0  # a constant row: the answer is the first k columns
  s[1, ::16] = -1.0  # equal minima at the start of every group
  # The k-th value tied between a group chosen first (smaller minimum, higher columns) and one chosen second: the
  # lower column must win (stage 2 sees the chosen groups in column order).
  s[2] = 10.0
  s[2, [16, 20, 0, 3]] = [1.0, 5.0, 3.0, 5.0]
  s[3:] = rng.integers(0, 40, (6, 256))  # distinct group minima, ties across groups
  for k in (1, 3, 5, 16):
    val, pos = jax.jit(topk._local_topk, static_argnums=(1, 2))(s, k, group)
    want = np.argsort(s, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(pos), want)
    np.testing.assert_array_equal(np.asarray(val), np.take_along_axis(s, want, 1))


@pytest.mark.parametrize("devices", [1, 8])
def test_topk_search_matches_brute_force_with_ties(devices, monkeypatch):
  """Galleries large enough for the two-stage path on every shard (and one that is not), padded shards."""
  mesh = MESH1 if devices == 1 else _mesh8()
  rng = np.random.default_rng(3)
  g = rng.integers(-1, 2, (8 * 470 + 3, 4)).astype(np.float32)  # 471 per shard on 8 devices, + padding
  q = np.concatenate([g[:7], rng.integers(-1, 2, (9, 4)).astype(np.float32)])
  d2 = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
  for k in (1, 7):
    idx, dist = topk.topk(q, g, k, mesh=mesh, query_block=8)
    want = np.argsort(d2, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, want, 1)), atol=1e-5)
  # With progress reports: 16 queries in 3 calls of blocks of 6 (the last padded), the same neighbours.
  monkeypatch.setattr(kernel, "PROGRESS_MIN_SCORES", {"cpu": 0, "accelerator": 0})
  bar = _Lines()
  idx_p, dist_p = topk.topk(q, g, 7, mesh=mesh, query_block=6, progress=bar)
  np.testing.assert_array_equal(idx_p, idx)
  np.testing.assert_array_equal(dist_p, dist)
  assert len(bar.lines) == 3


def test_linear_cka():
  rng = np.random.default_rng(7)
  x = rng.standard_normal((50, 6))
  y = rng.standard_normal((50, 4))
  assert cka.linear_cka(x, x) == pytest.approx(1.0)
  q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
  assert cka.linear_cka(x, 3 * x @ q + 1) == pytest.approx(1.0)  # invariant to rotation, scale, shift
  # Gram-matrix definition: HSIC(K, L) with centred linear kernels.
  h = np.eye(50) - 1 / 50
  k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
  assert cka.linear_cka(x, y) == pytest.approx(np.sum(k * l) / np.sqrt(np.sum(k * k) * np.sum(l * l)))
  assert cka.linear_cka(x, y, debiased=True) == pytest.approx(_gram_cka_unbiased(x - x.mean(0), y - y.mean(0)))
  assert cka.linear_cka(x, np.zeros((50, 3))) == 0.0  # "no side-information"
  with pytest.raises(ValueError, match="same number of rows"):
    cka.linear_cka(x, y[:10])


def _backfill_data(n=48, d=4, seed=8):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n)
  new = (np.eye(d)[labels % d] * 3 + rng.standard_normal((n, d)) * 0.5).astype(np.float32)
  transformed = new + rng.standard_normal((n, d)).astype(np.float32) * 2
  return labels, new, transformed


def test_backfill_curve_endpoints_grid_and_auc():
  labels, new, transformed = _backfill_data()
  r = backfill.backfill_curve(transformed, new, labels, mesh=MESH1, query_block=16)
  assert len(r["fractions"]) == 22 and r["fractions"][1] == pytest.approx(1 / 21)
  assert backfill.cutoffs(r["fractions"], 48).tolist() == [(i * 48) // 21 for i in range(22)]  # the official cut
  # β = 0 is new/h and β = 1 is new/new exactly, whether recomputed or read from the case statistics.
  start = retrieval.evaluate(new, transformed, labels, labels, query_is_gallery=True, mesh=MESH1)
  end = retrieval.evaluate(new, new, labels, labels, query_is_gallery=True, mesh=MESH1)
  for k in backfill.METRICS:
    assert r[k][0] == start[k] and r[k][-1] == end[k]
    assert r["auc"][k] == pytest.approx(np.mean(r[k]))  # the AUC is the mean over the grid points
  ends = tuple(metrics.checked_stats(new, g, labels, labels, query_is_gallery=True, mesh=MESH1)
               for g in (transformed, new))
  assert backfill.backfill_curve(transformed, new, labels, ends=ends, mesh=MESH1) == r


def test_backfill_orders_are_permutations():
  labels, new, transformed = _backfill_data()
  gap = np.linalg.norm(transformed - new, axis=1)
  s = np.random.default_rng(1).standard_normal((48, 1))
  s[3] = s[7] = s.max() + 1  # a tie: the lower index first
  for order, kw in (("random", {}), ("distance", {}), ("sigma", {"log_var": s})):
    p = backfill.backfill_order(transformed, new, order, **kw)
    np.testing.assert_array_equal(np.sort(p), np.arange(48))
  np.testing.assert_array_equal(backfill.backfill_order(transformed, new, "distance"), np.argsort(-gap))
  sig = backfill.backfill_order(transformed, new, "sigma", log_var=s)
  assert sig[:2].tolist() == [3, 7] and np.all(np.diff(s[sig, 0]) <= 0)
  wide = np.tile(s, (1, 4)) + np.array([0, 1, -1, 0])  # per-dimension s: ordered by its mean
  np.testing.assert_array_equal(backfill.backfill_order(transformed, new, "sigma", log_var=wide), sig)
  with pytest.raises(ValueError, match="order must be"):
    backfill.backfill_order(transformed, new, "oracle")
  with pytest.raises(ValueError, match="uncertainty"):
    backfill.backfill_order(transformed, new, "sigma")
  with pytest.raises(ValueError, match="finite"):
    backfill.backfill_order(transformed, new, "sigma", log_var=np.full(48, np.nan))


def test_backfill_curves_key_galleries_and_skip_sigma_without_uncertainty():
  labels, new, transformed = _backfill_data()
  s = np.linalg.norm(transformed - new, axis=1, keepdims=True)  # a perfect uncertainty: sigma = distance
  out = backfill.backfill_curves(new, {"h[none]": (transformed, None), "h[fastfill]": (transformed, s)}, labels,
                                 mesh=MESH1)
  assert list(out) == ["h[none]:random", "h[none]:distance", "h[fastfill]:random", "h[fastfill]:sigma",
                       "h[fastfill]:distance"]
  assert out["h[fastfill]:sigma"]["cmc_top1"] == out["h[fastfill]:distance"]["cmc_top1"]
  assert out["h[fastfill]:sigma"]["gallery"] == "h[fastfill]" and out["h[fastfill]:sigma"]["ordering"] == "sigma"
  with pytest.raises(ValueError, match="unknown backfill ordering"):
    backfill.backfill_curves(new, {"h": (transformed, None)}, labels, orderings=("oracle",), mesh=MESH1)


def test_reduce_pairs_counts_past_16_bits():
  """More than 65,535 items rank before a positive: the packed 16-bit counters must not overflow (the gallery is
  cut into chunks of at most 65,528 items, the counts summed in int32)."""
  rng = np.random.default_rng(5)
  n = 70_000
  g = np.concatenate([rng.uniform(0, 1, (n - 10, 1)), rng.uniform(5, 6, (10, 1))]).astype(np.float32)
  gl = np.concatenate([np.arange(n - 10) % 7 + 1, np.zeros(10, int)])  # the 10 far items are the positives
  q, ql = np.zeros((1, 1), np.float32), np.zeros(1, int)
  got = kernel.rank_stats(q, g, ql, gl, mesh=MESH1, count_method="reduce_pairs")
  _assert_same(got, metrics.brute_force_stats(q, g, ql, gl))
  assert got.first_rank[0] == n - 10


def test_retrieval_imports_only_lower_layers():
  """retrieval sits below the writers, stages and report: importing it loads none of them (progress comes in as a
  callback)."""
  code = ("import sys, fct_jax.retrieval.summary, fct_jax.retrieval.topk, fct_jax.retrieval.cases; "
          "print(' '.join(sorted(m for m in sys.modules if m.startswith('fct_jax'))))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
  assert set(out) - {"fct_jax", "fct_jax.errors", "fct_jax.sharding"} <= {m for m in out
                                                                         if m.startswith("fct_jax.retrieval")}, out
