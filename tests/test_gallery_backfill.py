"""FastFill on the gallery store: the upgrade stores s = log σ², and ``gallery backfill`` re-embeds items with φ_new
in the order of s, resumably, into versions that share unchanged chunks and that ``search`` serves.

The synthetic tests need no experiment; the end-to-end ones train a tiny experiment once per module (old, new and a
FastFill h with ψ := φ_old and an 8-d uncertainty head: ``side_info.kind="old"``, ``fastfill.sigma_dim`` = d_new).
"""

import copy
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fct_jax import artifacts
from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.gallery import backfill as backfill_lib
from fct_jax.gallery import loader
from fct_jax.gallery import store as store_lib
from fct_jax.gallery import upgrade as upgrade_lib
from fct_jax.models.transformation import FCTTransformation
import gallery_cli  # tests/gallery_cli.py  pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, CHUNK, D_OLD, D_SIDE, D_NEW = 50, 8, 6, 3, 5
MODEL = {"embedding": {"stage": "old", "fingerprint": "f-old", "dim": D_OLD},
         "side_info": {"kind": "simclr", "stage": "side_info", "fingerprint": "f-side", "dim": D_SIDE}}
FF_STAGE = "transformation_fastfill_old"


def synthetic_source(root):
  rng = np.random.default_rng(0)
  old = rng.normal(size=(N, D_OLD)).astype(np.float32)
  side = rng.normal(size=(N, D_SIDE)).astype(np.float32)
  w = store_lib.Store(root).begin("build-test", {"op": "test"}, count=N, chunk_size=CHUNK, embedding_dim=D_OLD,
                                  side_info_dim=D_SIDE, dtype="float32")
  for i in range(w.num_chunks):
    a, b = w.chunk_rows(i)
    w.write_chunk(i, np.arange(a, b), old[a:b], side[a:b])
  return w.commit(model=MODEL, lineage=[{"op": "build"}]), old, side


def fastfill_transform(sigma_dim=1):
  """A random FastFill h (with its uncertainty head) as a Transform, and its numpy reference."""
  h = FCTTransformation(old_dim=D_OLD, side_dim=D_SIDE, new_dim=D_NEW, inner_dim=16, sigma_dim=sigma_dim)
  v = h.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros((2, D_OLD)), jnp.zeros((2, D_SIDE)))

  def apply(variables, old, side):
    out = h.apply(variables, old, side)
    return out["embedding"], None, out["log_var"]

  produces = {"embedding": {"stage": "new", "fingerprint": "f-new", "dim": D_NEW}, "side_info": MODEL["side_info"]}
  t = upgrade_lib.Transform(name="ff", apply=apply, variables=v, old_dim=D_OLD, side_dim=D_SIDE, new_dim=D_NEW,
                            fingerprint="f-ff", expects=MODEL, produces=produces, sigma_dim=sigma_dim)
  return t, lambda old, side: jax.tree.map(np.asarray, h.apply(v, old, side))


def test_upgrade_stores_log_var(tmp_path):
  src, old, side = synthetic_source(str(tmp_path / "g"))
  t, ref = fastfill_transform(sigma_dim=D_NEW)
  st = store_lib.Store(str(tmp_path / "g"))
  new = upgrade_lib.upgrade(src, t, st, dtype="bfloat16", progress=False)
  got, want = new.read_all(), ref(old, side)
  assert new.log_var_dim == D_NEW and new.manifest["arrays"]["log_var"] == {"dtype": "float32", "shape": [N, D_NEW]}
  assert got["log_var"].dtype == np.float32  # s stays float32 whatever the storage dtype of the vectors
  np.testing.assert_allclose(got["log_var"], want["log_var"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got["embeddings"].astype(np.float32), want["embedding"], rtol=1e-2, atol=1e-2)
  assert all("log_var" in c for c in new.manifest["chunks"])
  progress = json.load(open(os.path.join(new.path, "progress", "chunk-000000.json")))
  assert set(progress["checksums"]) == {"ids", "embeddings", "side_info", "log_var"}
  # The source (no s) reads as before; s is checksummed like the other arrays.
  assert src.log_var_dim == 0 and "log_var" not in src.read_chunk(0) and "log_var_dim" not in src.manifest
  f = os.path.join(new.path, "log_var", "2.0")
  raw = open(f, "rb").read()
  open(f, "wb").write(bytes([raw[0] ^ 1]) + raw[1:])
  with pytest.raises(FCTError, match="chunk 2 of 'log_var' fails its checksum"):
    store_lib.Store(str(tmp_path / "g")).open(new.name).verify()


def test_plain_upgrade_manifest_has_no_new_fields(tmp_path):
  """A plain h's version carries none of FastFill's fields: its manifest is what it was before they existed."""
  src, _, _ = synthetic_source(str(tmp_path / "g"))
  t, _ = fastfill_transform()
  apply = t.apply
  plain = dataclasses.replace(t, apply=lambda v, o, s: apply(v, o, s)[:2], sigma_dim=0, name="plain")
  v = upgrade_lib.upgrade(src, plain, store_lib.Store(str(tmp_path / "g")), progress=False)
  assert set(v.manifest) == {"format", "name", "sequence", "count", "chunk_size", "num_chunks", "embedding_dim",
                             "side_info_dim", "dtype", "arrays", "checksum", "model", "lineage", "job", "chunks"}
  assert set(v.manifest["arrays"]) == {"ids", "embeddings", "side_info"}
  assert all(set(c) == {"ids", "embeddings", "side_info"} for c in v.manifest["chunks"])
  assert not os.path.exists(os.path.join(v.path, "log_var")) and backfill_lib.describe(v) == []
  # A Transform that says it has a head must give s, and one without must not.
  with pytest.raises(FCTError, match="none was given"):
    upgrade_lib.upgrade(src, dataclasses.replace(plain, sigma_dim=1, name="liar"),
                        store_lib.Store(str(tmp_path / "h")), progress=False)


def test_sigma_order_is_a_stable_permutation_following_s(tmp_path):
  """The order of a version storing a 5-d s (what an upgrade writes): largest mean s first, ties by position."""
  s = np.random.default_rng(3).integers(0, 4, size=(N, D_NEW)).astype(np.float32)  # few distinct means: ties
  w = store_lib.Store(str(tmp_path / "g")).begin("ff", {"op": "t"}, count=N, chunk_size=CHUNK, embedding_dim=D_NEW,
                                                 side_info_dim=0, dtype="float32", log_var_dim=D_NEW)
  for i in range(w.num_chunks):
    a, b = w.chunk_rows(i)
    w.write_chunk(i, np.arange(a, b), np.zeros((b - a, D_NEW)), np.zeros((b - a, 0)), s[a:b])
  v = w.commit(model=MODEL, lineage=[])
  order = backfill_lib.compute_order(v, "sigma", None)
  assert sorted(order.tolist()) == list(range(N))
  mean = s.astype(np.float64).mean(axis=1)
  assert (np.diff(mean[order]) <= 0).all()  # largest s first
  for a, b in zip(order[:-1], order[1:]):
    if mean[a] == mean[b]:
      assert a < b  # ties: lower position first
  np.testing.assert_array_equal(backfill_lib.compute_order(v, "random", 7), np.random.default_rng(7).permutation(N))
  assert backfill_lib.step_size(40, budget=0.2, items=None) == 8
  assert backfill_lib.step_size(40, budget=0.001, items=None) == 1
  assert backfill_lib.step_size(40, budget=None, items=3) == 3
  for bad in (dict(budget=0.0, items=None), dict(budget=1.5, items=None), dict(budget=0.2, items=3),
              dict(budget=None, items=None), dict(budget=None, items=0)):
    with pytest.raises(FCTError):
      backfill_lib.step_size(40, **bad)


# --------------------------------------------------------------------------------- end to end (tiny experiment)


@pytest.fixture(scope="module")
def exp_dir(tmp_path_factory):
  """old, new and a FastFill h (ψ := φ_old, 8-d s) of the demo's runlocal data, trained once (a few steps)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config("runlocal")
  ff = copy.deepcopy(cfg.stages.transformation_fastfill_none)
  ff.name = FF_STAGE
  ff.side_info.kind, ff.side_info.dim = "old", int(cfg.stages.old.model.embedding_dim)
  ff.fastfill.sigma_dim = int(cfg.stages.new.model.embedding_dim)
  cfg.stages[FF_STAGE] = ff
  cfg.plan = ["old", "new", FF_STAGE]
  wd = str(tmp_path_factory.mktemp("ffexp"))
  experiment.run(cfg, wd)
  return wd


_cli = gallery_cli.run_cli


@pytest.fixture(scope="module")
def upgraded(exp_dir, tmp_path_factory):
  """A store of the eval split (chunks of 4 items; no stored ψ) upgraded by the FastFill h: its root, the build and
  the upgraded version names, φ_new of the split (in memory) and h's outputs."""
  root = str(tmp_path_factory.mktemp("store") / "g")
  from fct_jax.gallery import build as build_lib  # pylint: disable=g-import-not-at-top
  built = build_lib.build(exp_dir, store_lib.Store(root), side_info="none", chunk_size=4, progress=False)
  t = loader.load_transformation(os.path.join(exp_dir, FF_STAGE))
  up = upgrade_lib.upgrade(built, t, store_lib.Store(root), progress=False)
  ctx = artifacts.Context(workdir=exp_dir)
  module, variables, new_cfg = artifacts.load_backbone(ctx, "new", "test")
  source, _ = sources.get_source(new_cfg.data, "eval")
  phi_new = artifacts.embed(module, variables, source, batch_size=16, transform=artifacts.eval_transform(new_cfg))
  h = artifacts.load_transformation(ctx, FF_STAGE, "test")
  old = built.read_all()["embeddings"]
  emb, log_var = h.with_uncertainty(old, old)  # ψ := φ_old
  return {"root": root, "built": built.name, "up": up.name, "phi_new": phi_new, "h": emb, "log_var": log_var}


def _copy(upgraded, tmp_path, name="g"):
  dst = str(tmp_path / name)
  shutil.copytree(upgraded["root"], dst)
  return store_lib.Store(dst)


def test_fastfill_checkpoint_upgrade_stores_s(upgraded, exp_dir, capsys):
  st = store_lib.Store(upgraded["root"])
  up = st.open(upgraded["up"])
  assert up.side_info_dim == 0 and up.model["side_info"]["kind"] == "none"  # ψ := φ_old is not stored twice
  assert up.log_var_dim == 8 and up.model["embedding"]["stage"] == "new"
  got = up.read_all()
  np.testing.assert_allclose(got["embeddings"], upgraded["h"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got["log_var"], upgraded["log_var"], rtol=1e-5, atol=1e-5)
  code, out, err = _cli(["info", "--store", upgraded["root"]], capsys)
  assert code == 0, err
  assert "stores s = log σ² (8-d" in out


def _check_mixed(version, upgraded, order, k):
  """The first k items of ``order`` hold φ_new (from images), every other one h, byte for byte as upgraded."""
  got = version.read_all()
  base = store_lib.Store(upgraded["root"]).open(upgraded["up"]).read_all()
  np.testing.assert_array_equal(got["ids"], base["ids"])
  np.testing.assert_array_equal(got["log_var"], base["log_var"])
  mask = np.zeros(version.count, bool)
  mask[order[:k]] = True
  np.testing.assert_allclose(got["embeddings"][mask], upgraded["phi_new"][got["ids"][mask]], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got["embeddings"][~mask], base["embeddings"][~mask])
  assert not np.allclose(got["embeddings"][mask], base["embeddings"][mask])
  return got


def test_backfill_steps_info_and_search(upgraded, exp_dir, tmp_path, capsys):
  st = _copy(upgraded, tmp_path)
  root = st.root
  args = ["backfill", "--store", root, "--experiment", exp_dir, "--new", "new", "--split", "eval"]
  code, out, err = _cli(args + ["--order", "sigma", "--budget", "0.2"], capsys)
  assert code == 0, err
  assert "items/s" in out
  b1 = st.open()
  order = np.argsort(-upgraded["log_var"].astype(np.float64).mean(axis=1), kind="stable")
  np.testing.assert_array_equal(b1.read_aux("order"), order)  # sigma: largest mean s first, recorded
  assert b1.backfill["backfilled"] == 8 and b1.backfill["order"] == {"kind": "sigma", "seed": None}
  first = _check_mixed(b1, upgraded, order, 8)
  # Only the chunks holding a backfilled item were written; the others are shared with the upgraded version.
  touched = sorted(set((order[:8] // 4).tolist()))
  assert sorted(i for i, c in enumerate(b1.manifest["chunks"]) if "at" not in c) == touched
  assert sorted(os.listdir(os.path.join(b1.path, "progress"))) == (
      ["aux-order.json"] + [f"chunk-{i:06d}.json" for i in touched])

  # The next call continues in the recorded order; --items; then clipped to what is left; then nothing left.
  code, _, err = _cli(args + ["--budget", "0.2"], capsys)
  assert code == 0, err
  b2 = st.open()
  _check_mixed(b2, upgraded, order, 16)
  assert b2.manifest["aux"]["order"]["at"] == b1.name
  for i, c in enumerate(st.open(b1.name).read_all()["embeddings"]):  # the committed version is untouched
    np.testing.assert_array_equal(c, first["embeddings"][i])
  code, out, err = _cli(args + ["--items", "5"], capsys)
  assert code == 0, err
  b3 = st.open()
  _check_mixed(b3, upgraded, order, 21)
  code, out, err = _cli(["info", "--store", root, "--verify"], capsys)
  assert code == 0, err
  assert "backfilled 21/40 items (52.5%) with model 'new'" in out and "in sigma order, 3 step(s)" in out
  assert out.count("checksums ok") == 5 and f"shares chunks with '{b1.name}'" in out

  # search serves the mixed gallery: φ_new queries, exact distances to φ_new for backfilled items, h for the rest.
  mixed = b3.read_all()
  q = upgraded["phi_new"][[int(order[0]), int(order[30]), int(order[39])]]
  np.save(tmp_path / "q.npy", q)
  code, out, err = _cli(["search", "--store", root, "--queries", str(tmp_path / "q.npy"), "--k", "40", "--out",
                         str(tmp_path / "hits.npz")], capsys)
  assert code == 0, err
  hits = np.load(tmp_path / "hits.npz")
  d = np.linalg.norm(q[:, None, :] - mixed["embeddings"][None], axis=-1)
  # (The kernel's ‖q‖² + ‖g‖² − 2q·g leaves ~1e-7 under the square root of a self-match: atol 1e-3.)
  np.testing.assert_allclose(np.take_along_axis(d, hits["ids"], 1), hits["distances"], rtol=1e-4, atol=1e-3)
  assert hits["ids"][0, 0] == order[0] and hits["distances"][0, 0] < 1e-3  # its own φ_new is in the gallery now
  assert np.take_along_axis(d, hits["ids"], 1)[1:, 0].min() > 1e-3  # the others are still h: no exact match
  code, _, err = _cli(args + ["--budget", "1.0"], capsys)
  assert code == 0, err
  full = st.open()
  _check_mixed(full, upgraded, order, 40)
  code, out, _ = _cli(args + ["--budget", "0.5"], capsys)
  assert code == 0 and "nothing left" in out and st.current() == full.name


def test_backfill_random_order_and_plain_h_store(upgraded, exp_dir, tmp_path, capsys):
  """A version upgraded by a plain h (no s): --order sigma is refused, random works and follows its seed."""
  st = _copy(upgraded, tmp_path)
  t = loader.load_transformation(os.path.join(exp_dir, FF_STAGE))
  apply = t.apply
  plain = dataclasses.replace(t, apply=lambda v, o, s: apply(v, o, s)[:2], sigma_dim=0, name="plain")
  v = upgrade_lib.upgrade(st.open(upgraded["built"]), plain, st, progress=False)
  args = ["backfill", "--store", st.root, "--experiment", exp_dir]
  code, _, err = _cli(args + ["--order", "sigma", "--budget", "0.2"], capsys)
  assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "stores no uncertainty" in err, err
  code, _, err = _cli(args + ["--budget", "0.25", "--order", "random", "--seed", "5"], capsys)
  assert code == 0, err
  b = st.open()
  perm = np.random.default_rng(5).permutation(40)
  np.testing.assert_array_equal(b.read_aux("order"), perm)
  got = b.read_all()["embeddings"]
  np.testing.assert_allclose(got[perm[:10]], upgraded["phi_new"][perm[:10]], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(got[perm[10:]], v.read_all()["embeddings"][perm[10:]])
  code, _, err = _cli(args + ["--budget", "0.25", "--seed", "6"], capsys)
  assert code == 2 and "seed 5, not 6" in err


def test_backfill_bad_inputs(upgraded, exp_dir, tmp_path, capsys):
  st = _copy(upgraded, tmp_path)
  args = ["backfill", "--store", st.root, "--experiment", exp_dir]
  bad = [(["--budget", "0"], "--budget must be a fraction in (0, 1]"),
         (["--budget", "1.5"], "--budget must be a fraction in (0, 1]"),
         (["--budget", "0.2", "--items", "3"], "exactly one of --budget"),
         ([], "exactly one of --budget"),
         (["--items", "0"], "--items must be at least 1"),
         (["--budget", "0.2", "--order", "distance"], "unknown backfill order 'distance'"),
         (["--budget", "0.2", "--version", "nope"], "'nope'"),
         (["--budget", "0.2", "--version", upgraded["built"]], "not of 'new'"),
         (["--budget", "0.2", "--split", "old_train"], "built from split 'eval'"),
         (["--budget", "0.2", "--new", "old"], "not of 'old'"),
         (["--budget", "0.2", "--seed", "3"], "--seed applies to --order random only")]
  for extra, want in bad:
    code, _, err = _cli(args + extra, capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and want in err, (extra, err)
  assert [v.name for v in st.versions()] == [upgraded["built"], upgraded["up"]]
  assert _cli(args + ["--budget", "0.1"], capsys)[0] == 0
  code, _, err = _cli(args + ["--budget", "0.1", "--order", "random"], capsys)
  assert code == 2 and "being backfilled in 'sigma' order" in err and upgraded["up"] in err


def _tree_bytes(version):
  return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in version.read_all().items()}


def test_backfill_stopped_and_killed_resume_byte_equal(upgraded, exp_dir, tmp_path):
  """A run stopped after some chunks (the test hook), or SIGKILLed, finishes like an uninterrupted one (embedding
  passes of 8 items: several of them, so a run may stop inside one)."""
  ref_store = _copy(upgraded, tmp_path, "ref")
  ref = backfill_lib.backfill(exp_dir, ref_store, budget=0.5, group_items=8, progress=False)
  order = ref.read_aux("order")
  touched = [i for i, c in enumerate(ref.manifest["chunks"]) if "at" not in c]
  assert len(touched) >= 4 and ref.manifest["job"]["embedding"] == {"batch_size": 16, "group_items": 8}

  st = _copy(upgraded, tmp_path, "stopped")
  assert backfill_lib.backfill(exp_dir, st, budget=0.5, group_items=8, progress=False, stop_after_chunks=3) is None
  assert st.current() == upgraded["up"]  # nothing visible before the commit
  resumed = backfill_lib.backfill(exp_dir, st, budget=0.5, group_items=8, progress=False)
  assert resumed.name == ref.name and resumed.manifest == ref.manifest
  assert _tree_bytes(resumed) == _tree_bytes(ref)

  st = _copy(upgraded, tmp_path, "killed")
  kill_at = random.Random().randint(1, len(touched) - 1)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "worker", exp_dir, st.root, str(kill_at)],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-2000:])
  assert st.current() == upgraded["up"]
  partial = os.path.join(st.root, "versions", ref.name)
  done = [f for f in os.listdir(os.path.join(partial, "progress")) if f.startswith("chunk-")]
  assert kill_at <= len(done) < len(touched) and not os.path.exists(os.path.join(partial, "manifest.json"))
  resumed = backfill_lib.backfill(exp_dir, st, budget=0.5, group_items=8, progress=False)
  assert resumed.manifest == ref.manifest and _tree_bytes(resumed) == _tree_bytes(ref)
  # Every item backfilled exactly once: the first 20 of the order hold φ_new, all others h (unchanged).
  _check_mixed(resumed, upgraded, order, 20)

  # Killed between the manifest and CURRENT: the rerun only finishes the commit.
  st.set_current(upgraded["up"])
  again = backfill_lib.backfill(exp_dir, st, budget=0.5, group_items=8, progress=False)
  assert again.name == ref.name and st.current() == ref.name and len(st.versions()) == 3


def _worker(exp, root, kill_at):
  """Subprocess: backfill half the store, SIGKILL itself once ``kill_at`` chunks have landed."""
  gallery_cli.sigkill_after_chunks(kill_at)
  backfill_lib.backfill(exp, store_lib.Store(root), budget=0.5, group_items=8, progress=False)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "worker":
  _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
