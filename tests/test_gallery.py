"""Gallery store, upgrade, search, CLI and cost report (issue 8).

Most tests use a synthetic store and a randomly initialised h (fast); the end-to-end tests build a store from the
demo's runlocal experiment (trained once per module) through the CLI.
"""

import os
import random
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fct_jax import artifacts
from fct_jax.errors import FCTError
from fct_jax.gallery import search as search_lib
from fct_jax.gallery import store as store_lib
from fct_jax.gallery import upgrade as upgrade_lib
from fct_jax.models.transformation import FCTTransformation
from fct_jax.retrieval import topk as topk_lib
import gallery_cli  # tests/gallery_cli.py  pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, CHUNK, D_OLD, D_SIDE, D_NEW = 100, 16, 8, 4, 6  # 7 chunks, the last one partial
OLD_MODEL = {"embedding": {"stage": "old", "fingerprint": "f-old", "dim": D_OLD},
             "side_info": {"kind": "simclr", "stage": "side_info", "fingerprint": "f-side", "dim": D_SIDE}}


def synthetic_source(root: str, dtype: str = "float32"):
  """A committed store of N random items (ids 1000 + i) and its float32 arrays."""
  rng = np.random.default_rng(0)
  old = rng.normal(size=(N, D_OLD)).astype(np.float32)
  side = rng.normal(size=(N, D_SIDE)).astype(np.float32)
  st = store_lib.Store(root)
  w = st.begin("build-test", {"op": "test", "dtype": dtype}, count=N, chunk_size=CHUNK, embedding_dim=D_OLD,
               side_info_dim=D_SIDE, dtype=dtype)
  for i in range(w.num_chunks):
    a, b = w.chunk_rows(i)
    w.write_chunk(i, np.arange(a, b) + 1000, old[a:b], side[a:b])
  return w.commit(model=OLD_MODEL, lineage=[{"op": "build"}]), old, side


def synthetic_transform(expects=OLD_MODEL, with_g: bool = False):
  h = FCTTransformation(old_dim=D_OLD, side_dim=D_SIDE, new_dim=D_NEW, inner_dim=16)
  variables = h.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros((2, D_OLD)), jnp.zeros((2, D_SIDE)))

  def apply(v, old, side):
    new = h.apply(v, old, side)["embedding"]
    return new, (jnp.tanh(side + old[:, :D_SIDE]) if with_g else None)  # a stand-in g

  produces = {"embedding": {"stage": "new", "fingerprint": "f-new", "dim": D_NEW}, "side_info": OLD_MODEL["side_info"]}
  t = upgrade_lib.Transform(name="h", apply=apply, variables=variables, old_dim=D_OLD, side_dim=D_SIDE,
                            new_dim=D_NEW, fingerprint="f-h", expects=expects, produces=produces,
                            side_out_dim=D_SIDE if with_g else None)
  return t, lambda old, side: np.asarray(h.apply(variables, old, side)["embedding"])


def test_upgrade_equals_in_memory(tmp_path):
  src, old, side = synthetic_source(str(tmp_path / "g"))
  t, h = synthetic_transform()
  new = upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "g")), progress=False)
  got = new.read_all()
  np.testing.assert_array_equal(got["ids"], np.arange(N) + 1000)
  np.testing.assert_allclose(got["embeddings"], h(old, side), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got["side_info"], side)  # no g: ψ carried over
  st = store_lib.Store(str(tmp_path / "g"))
  assert st.current() == new.name and [v.name for v in st.versions()] == [src.name, new.name]
  np.testing.assert_array_equal(st.open(src.name).read_all()["embeddings"], old)  # the old version stays
  assert new.model["embedding"]["fingerprint"] == "f-new" and new.manifest["lineage"][-1]["op"] == "upgrade"
  # Rerunning the finished job is a no-op that returns the committed version.
  assert upgrade_lib.upgrade(src, t, st, progress=False).name == new.name
  assert len(st.versions()) == 2


def test_g_dtype_and_devices(tmp_path):
  """g's output is stored; bfloat16 storage; 1 device and 8 devices agree."""
  src, old, side = synthetic_source(str(tmp_path / "src"))
  t, h = synthetic_transform(with_g=True)
  one = upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "one")), progress=False,
                            mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  assert len(jax.devices()) == 8
  eight = upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "eight")), progress=False)
  a, b = one.read_all(), eight.read_all()
  np.testing.assert_array_equal(a["ids"], b["ids"])
  np.testing.assert_allclose(a["embeddings"], b["embeddings"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(b["side_info"], np.tanh(side + old[:, :D_SIDE]), rtol=1e-6, atol=1e-6)
  bf = upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "bf")), dtype="bfloat16", progress=False)
  got = bf.read_all()
  assert got["embeddings"].dtype == store_lib.DTYPES["bfloat16"] and bf.dtype == "bfloat16"
  np.testing.assert_allclose(got["embeddings"].astype(np.float32), h(old, side), rtol=1e-2, atol=1e-2)


def _tree_bytes(version):
  d = version.read_all()
  return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in d.items()}


def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
  src, _, _ = synthetic_source(str(tmp_path / "src"))
  t, _ = synthetic_transform()
  ref = upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "ref")), progress=False)
  kill_at = random.Random().randint(1, src.num_chunks - 2)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", str(tmp_path), str(kill_at)],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-2000:])
  dest = store_lib.Store(str(tmp_path / "dst"))
  assert dest.current() is None  # killed before the commit: nothing visible
  partial = os.listdir(tmp_path / "dst" / "versions")
  assert len(partial) == 1
  done = os.listdir(tmp_path / "dst" / "versions" / partial[0] / "progress")
  assert kill_at <= len(done) < src.num_chunks, (kill_at, done)
  resumed = upgrade_lib.upgrade(src, t, dest, progress=False)
  assert resumed.name == partial[0]
  assert resumed.manifest["chunks"] == ref.manifest["chunks"]
  assert _tree_bytes(resumed) == _tree_bytes(ref)
  ids = resumed.read_all()["ids"]
  assert len(np.unique(ids)) == N and (np.sort(ids) == np.arange(N) + 1000).all()


def _worker(tmp, kill_at):
  """Subprocess: upgrade src → dst, SIGKILL itself once ``kill_at`` chunks have landed (others in flight)."""
  src = store_lib.Store(os.path.join(tmp, "src")).open()
  t, _ = synthetic_transform()
  gallery_cli.sigkill_after_chunks(kill_at)
  upgrade_lib.upgrade(src, t, store_lib.Store(os.path.join(tmp, "dst")), progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corrupt_chunk_refused(tmp_path, damage):
  src, _, _ = synthetic_source(str(tmp_path / "src"))
  t, _ = synthetic_transform()
  f = os.path.join(src.path, "embeddings", "3.0")
  raw = open(f, "rb").read()
  if damage == "truncate":
    open(f, "wb").write(raw[:len(raw) // 2])
  elif damage == "flip":
    open(f, "wb").write(bytes([raw[0] ^ 1]) + raw[1:])
  else:
    os.remove(f)  # zarr reads a missing chunk as zeros: only the checksum can tell
  dest = store_lib.Store(str(tmp_path / "dst"))
  with pytest.raises(FCTError, match="chunk 3") as e:
    upgrade_lib.upgrade(src, t, dest, progress=False)
  assert "\n" not in str(e.value)
  assert dest.current() is None and dest.versions() == []
  with pytest.raises(FCTError, match="chunk 3"):
    src.verify()


def test_mismatch_refused_nothing_written(tmp_path):
  src, _, _ = synthetic_source(str(tmp_path / "src"))
  other = {**OLD_MODEL, "embedding": {**OLD_MODEL["embedding"], "fingerprint": "f-other"}}
  t, _ = synthetic_transform(expects=other)
  with pytest.raises(FCTError, match="different model versions") as e:
    upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "dst")), progress=False)
  assert "\n" not in str(e.value)
  t, _ = synthetic_transform(expects={**OLD_MODEL, "side_info": {**OLD_MODEL["side_info"], "fingerprint": "x"}})
  with pytest.raises(FCTError, match="side-information"):
    upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "dst")), progress=False)
  t, _ = synthetic_transform()
  t.old_dim = 16
  with pytest.raises(FCTError, match="expects 16-d"):
    upgrade_lib.upgrade(src, t, store_lib.Store(str(tmp_path / "dst")), progress=False)
  assert not os.path.exists(tmp_path / "dst")
  with pytest.raises(FCTError, match="not a gallery store"):
    store_lib.Store(str(tmp_path / "nothing")).open()


def test_topk_and_search(tmp_path):
  rng = np.random.default_rng(1)
  g = rng.integers(0, 3, size=(37, 4)).astype(np.float32)  # integer data: many exact ties
  q = np.concatenate([g[:5], rng.integers(0, 3, size=(6, 4)).astype(np.float32)])
  d2 = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
  want = np.argsort(d2, axis=1, kind="stable")[:, :7]  # ties: lower index first
  idx, dist = topk_lib.topk(q, g, 7)
  np.testing.assert_array_equal(idx, want)
  np.testing.assert_allclose(dist, np.sqrt(np.take_along_axis(d2, want, 1)), atol=1e-5)
  idx1, _ = topk_lib.topk(q, g, 7, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",)))
  np.testing.assert_array_equal(idx1, want)
  # Through a store, chunk by chunk: the same neighbours, as item ids.
  st = store_lib.Store(str(tmp_path / "s"))
  w = st.begin("v", {"op": "t"}, count=37, chunk_size=8, embedding_dim=4, side_info_dim=0, dtype="float32")
  for i in range(w.num_chunks):
    a, b = w.chunk_rows(i)
    w.write_chunk(i, np.arange(a, b) * 10, g[a:b], np.zeros((b - a, 0)))
  v = w.commit(model=OLD_MODEL, lineage=[])
  ids, sdist = search_lib.search(v, q, 7)
  np.testing.assert_array_equal(ids, want * 10)
  np.testing.assert_allclose(sdist, dist, atol=1e-5)
  with pytest.raises(FCTError, match="4-d"):
    search_lib.search(v, np.zeros((2, 5)), 3)


# --------------------------------------------------------------------------------- end to end (demo runlocal)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
  from configs import demo  # pylint: disable=g-import-not-at-top
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  wd = str(tmp_path_factory.mktemp("demo"))
  experiment.run(demo.get_config("runlocal"), wd)
  return wd


_cli = gallery_cli.run_cli


def test_cli_build_upgrade_search(demo_dir, tmp_path, capsys):
  store = str(tmp_path / "gallery")
  code, out, err = _cli(["build", "--experiment", demo_dir, "--old", "old", "--side-info", "side_info",
                         "--split", "eval", "--to", store, "--chunk-size", "16"], capsys)
  assert code == 0, err
  built = store_lib.Store(store).open()
  assert built.count == 40 and built.num_chunks == 3 and built.model["side_info"]["kind"] == "simclr"
  # A gallery without ψ cannot be upgraded by the transformation trained with ψ: one line, exit 2, no new version.
  nopsi = str(tmp_path / "nopsi")
  assert _cli(["build", "--experiment", demo_dir, "--side-info", "none", "--to", nopsi], capsys)[0] == 0
  code, _, err = _cli(["upgrade", "--from", nopsi, "--transformation", os.path.join(demo_dir, "transformation"),
                       "--to", nopsi], capsys)
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
  assert len(store_lib.Store(nopsi).versions()) == 1

  code, out, err = _cli(["upgrade", "--from", store, "--transformation", os.path.join(demo_dir, "transformation"),
                         "--to", store], capsys)
  assert code == 0, err
  assert "items/s" in out and "ETA" in out
  new = store_lib.Store(store).open()
  assert new.name != built.name and new.model["embedding"]["stage"] == "new"
  # Equals the transformation stage's own in-memory h on the stored arrays.
  h, _, _ = artifacts.load_h(artifacts.Context(workdir=demo_dir), "transformation", "test")
  src = built.read_all()
  np.testing.assert_allclose(new.read_all()["embeddings"], h(src["embeddings"], src["side_info"]),
                             rtol=1e-5, atol=1e-5)
  q = str(tmp_path / "q.npy")
  np.save(q, new.read_all()["embeddings"][:3])
  code, out, err = _cli(["search", "--store", store, "--queries", q, "--k", "2", "--out",
                         str(tmp_path / "hits.npz")], capsys)
  assert code == 0, err
  hits = np.load(tmp_path / "hits.npz")
  np.testing.assert_array_equal(hits["ids"][:, 0], [0, 1, 2])
  code, out, _ = _cli(["info", "--store", store, "--verify"], capsys)
  assert code == 0 and out.count("checksums ok") == 2


def test_cost_report(demo_dir, tmp_path):
  from fct_jax.gallery import cost  # pylint: disable=g-import-not-at-top
  rep = cost.cost_report(os.path.join(demo_dir, "transformation"))
  rows = {r["method"]: r for r in rep["rows"]}
  assert rows["BCT"]["macs"] == 0 and rows["BCT"]["storage_bytes"] == 0
  assert rows["backfilling"]["storage_bytes"] == 16 * 16 * 3
  assert rows["FCT"]["storage_bytes"] == 8 * 4  # 8-d float32 ψ
  # h's matmuls: (8→16→16) ×2 branches, mixer 32→16→16→8 (inner 16, d_new 8); XLA adds BN/ReLU work.
  dense = 8 * 16 + 16 * 16 + 8 * 16 + 16 * 16 + 32 * 16 + 16 * 16 + 16 * 8
  assert dense <= rows["FCT"]["macs"] < 1.5 * dense
  assert rows["backfilling"]["macs"] > rows["FCT"]["macs"]
  assert "backfilling" in cost.format_table(rep)
  paths = cost.save(rep, str(tmp_path / "cost"))
  assert all(os.path.getsize(p) > 0 for p in paths)


def test_precision_cost(demo_dir, tmp_path):
  from fct_jax.gallery import precision  # pylint: disable=g-import-not-at-top
  res = precision.accuracy_cost(os.path.join(demo_dir, "transformation"), workdir=str(tmp_path), chunk_size=16)
  print({k: (round(v["delta_top1"], 2), round(v["delta_mAP"], 2)) for k, v in res.items()})
  assert set(res) == {"float32", "float16", "bfloat16"}
  assert abs(res["float16"]["delta_mAP"]) < 1.0  # 16-bit storage barely moves retrieval
  assert abs(res["bfloat16"]["delta_mAP"]) < 5.0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "worker":
  _worker(sys.argv[2], int(sys.argv[3]))
