"""Gallery stores built from stored vectors (``build --from-vectors``, issue 22), and transformations trained on
vectors as gallery upgrades (a fake stage directory: its training is the stages' side)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fct_jax import artifacts
from fct_jax.data import vectors
from fct_jax.errors import FCTError
from fct_jax.gallery import backfill as backfill_lib
from fct_jax.gallery import build as build_lib
from fct_jax.gallery import loader
from fct_jax.gallery import store as store_lib
from fct_jax.gallery import upgrade as upgrade_lib
from fct_jax.models.transformation import FCTTransformation
import gallery_cli  # tests/gallery_cli.py  pylint: disable=g-bad-import-order

N, CHUNK, D_OLD, D_SIDE, D_NEW = 100, 16, 8, 4, 6  # 7 chunks, the last one partial


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  return {"old": rng.normal(size=(N, D_OLD)).astype(np.float32), "psi": rng.normal(size=(N, D_SIDE)).astype(np.float32),
          "id": (rng.permutation(N) + 500).astype(np.int64)}


_cli = gallery_cli.run_cli


def _tree_bytes(version):
  return {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in version.read_all().items()}


@pytest.mark.parametrize("fmt", vectors.FORMATS)
def test_cli_build_search_info(tmp_path, capsys, fmt):
  a = _arrays()
  src = str(tmp_path / ("v.npz" if fmt == "npz" else "v"))
  vectors.save_vectors(src, a, fmt=fmt)
  store = str(tmp_path / "gallery")
  code, out, err = _cli(["build", "--from-vectors", src, "--old-model", "clip", "--side-model", "ae", "--to", store,
                         "--chunk-size", str(CHUNK)], capsys)
  assert code == 0, err
  assert "items/s" in out
  v = store_lib.Store(store).open()
  assert (v.count, v.num_chunks, v.embedding_dim, v.side_info_dim) == (N, 7, D_OLD, D_SIDE)
  assert v.model == {"embedding": {"stage": "clip", "fingerprint": "vectors:clip", "dim": D_OLD},
                     "side_info": {"kind": "stored", "stage": "ae", "fingerprint": "vectors:ae", "dim": D_SIDE}}
  assert v.manifest["job"]["vectors"]["path"] == os.path.abspath(src)
  got = v.read_all()
  np.testing.assert_array_equal(got["ids"], a["id"])
  np.testing.assert_array_equal(got["embeddings"], a["old"])
  np.testing.assert_array_equal(got["side_info"], a["psi"])
  q = str(tmp_path / "q.npy")
  np.save(q, a["old"][[5, 60, 99]])
  code, out, err = _cli(["search", "--store", store, "--queries", q, "--k", "2", "--out", str(tmp_path / "h.npz")],
                        capsys)
  assert code == 0, err
  np.testing.assert_array_equal(np.load(tmp_path / "h.npz")["ids"][:, 0], a["id"][[5, 60, 99]])
  code, out, err = _cli(["info", "--store", store, "--verify"], capsys)
  assert code == 0 and "'clip' vectors:clip" in out and out.count("checksums ok") == 1, out + err
  # The same command again: the committed version, nothing new.
  code, out, _ = _cli(["build", "--from-vectors", src, "--old-model", "clip", "--side-model", "ae", "--to", store,
                       "--chunk-size", str(CHUNK)], capsys)
  assert code == 0 and "already done" in out and len(store_lib.Store(store).versions()) == 1


def test_no_psi_bfloat16_and_default_ids(tmp_path):
  a = _arrays()
  vectors.save_vectors(str(tmp_path / "v.npz"), {"old": a["old"]})
  v = build_lib.build_from_vectors(str(tmp_path / "v.npz"), store_lib.Store(str(tmp_path / "g")), old_model="m",
                                   dtype="bfloat16", chunk_size=32, progress=False)
  assert v.model["side_info"] == {"kind": "none", "stage": "", "fingerprint": "none:0", "dim": 0}
  assert v.side_info_dim == 0 and v.dtype == "bfloat16"
  got = v.read_all()
  np.testing.assert_array_equal(got["ids"], np.arange(N))
  np.testing.assert_array_equal(got["embeddings"], a["old"].astype(store_lib.DTYPES["bfloat16"]))


def test_killed_build_resumes_byte_identical(tmp_path):
  a = _arrays()
  src = str(tmp_path / "v")
  vectors.save_vectors(src, a)
  ref = build_lib.build_from_vectors(src, store_lib.Store(str(tmp_path / "ref")), old_model="m", side_model="s",
                                     chunk_size=CHUNK, progress=False)
  dest = store_lib.Store(str(tmp_path / "dst"))
  kw = dict(old_model="m", side_model="s", chunk_size=CHUNK, progress=False)
  assert build_lib.build_from_vectors(src, dest, stop_after_chunks=3, **kw) is None
  assert dest.current() is None  # "killed" before the commit: nothing visible
  (partial,) = os.listdir(tmp_path / "dst" / "versions")
  assert len(os.listdir(tmp_path / "dst" / "versions" / partial / "progress")) == 3
  resumed = build_lib.build_from_vectors(src, dest, **kw)
  assert resumed.name == partial == ref.name
  assert resumed.manifest["chunks"] == ref.manifest["chunks"]
  assert _tree_bytes(resumed) == _tree_bytes(ref)
  resumed.verify()
  # A changed file is a different job: a new version, not a resume of the old one.
  a["old"][0] += 1
  vectors.save_vectors(src, {"old": np.concatenate([a["old"], a["old"][:1]]), "psi": np.concatenate(
      [a["psi"], a["psi"][:1]]), "id": np.concatenate([a["id"], [7]])})
  again = build_lib.build_from_vectors(src, dest, **kw)
  assert again.name != resumed.name and again.count == N + 1


def test_refusals_one_line_nothing_written(tmp_path, capsys):
  a = _arrays()
  ok = str(tmp_path / "ok")
  vectors.save_vectors(ok, a)
  nopsi = str(tmp_path / "nopsi.npz")
  vectors.save_vectors(nopsi, {"old": a["old"]})
  nan = str(tmp_path / "nan")
  bad = {**a, "psi": a["psi"].copy()}
  bad["psi"][77, 1] = np.nan
  vectors.save_vectors(nan, bad)
  short = str(tmp_path / "short")
  vectors.save_vectors(short, {**a, "psi": a["psi"][:90]})
  dup = str(tmp_path / "dup")
  vectors.save_vectors(dup, {**a, "id": np.concatenate([a["id"][:-1], a["id"][:1]])})
  cases = [
      (["--from-vectors", str(tmp_path / "missing"), "--old-model", "m"], "does not exist"),
      (["--from-vectors", nopsi, "--old-model", "m", "--side-model", "s"], "has no 'psi' \\(it has: old\\)"),
      (["--from-vectors", ok, "--old-model", "m"], "hold 4-d side-information 'psi' but no --side-model"),
      (["--from-vectors", nan, "--old-model", "m", "--side-model", "s"], "psi.npy: row 77 is not finite"),
      (["--from-vectors", short, "--old-model", "m", "--side-model", "s"], "'psi' has 90 rows .* 'old' has 100"),
      (["--from-vectors", dup, "--old-model", "m", "--side-model", "s"], "appears more than once \\(rows 0 and 99\\)"),
      (["--from-vectors", ok], "needs --old-model NAME"),
      (["--from-vectors", ok, "--old-model", "m", "--side-model", "s", "--split", "eval", "--old", "x"],
       "--old, --split: for --experiment builds only"),
      (["--experiment", str(tmp_path), "--old-model", "m"], "--old-model: for --from-vectors builds only"),
      ([], "build needs one source: --experiment EXPERIMENT_DIR .* or --from-vectors PATH"),
      (["--experiment", str(tmp_path), "--from-vectors", ok], "not both"),
  ]
  import re  # pylint: disable=g-import-not-at-top
  for argv, match in cases:
    store = str(tmp_path / "store")
    code, out, err = _cli(["build", *argv, "--to", store, "--chunk-size", str(CHUNK)], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    assert re.search(match, err), (match, err)
    assert not os.path.exists(store), argv


def _fake_vectors_h(tmp_path, monkeypatch, *, side_kind="stored", side_dim=D_SIDE, old_model="clip",
                    side_model="ae", sigma_dim=0):
  """A finished transformation stage directory trained on vectors (config.json, model/), loaded by a stand-in for
  ``artifacts.load_transformation``; returns its directory and h as a numpy function."""
  exp = tmp_path / "exp"
  d = exp / "h_vec"
  os.makedirs(d / "model", exist_ok=True)
  cfg = {"name": "h_vec", "kind": "transformation", "old": "", "new": "",
         "data": {"name": "vectors", "old_model": old_model, "new_model": "siglip", "side_model": side_model},
         "side_info": {"kind": side_kind, "stage": "", "dim": side_dim}}
  (d / "config.json").write_text(json.dumps(cfg))
  (d / "model" / "params").write_bytes(b"weights")
  (d / "DONE").write_text("")
  h = FCTTransformation(old_dim=D_OLD, side_dim=side_dim, new_dim=D_NEW, inner_dim=16)
  variables = h.init({"params": jax.random.key(0, impl="rbg")}, jnp.zeros((2, D_OLD)),
                     jnp.zeros((2, side_dim)) if side_dim else None)
  t = artifacts.Transformation("h_vec", ml_collections.ConfigDict(cfg), h, variables,
                               {"old": D_OLD, "side": side_dim, "new": D_NEW}, "backbone", sigma_dim)

  def load_transformation(ctx, stage, needed_by):
    assert ctx.workdir == str(exp) and stage == "h_vec", (ctx, stage, needed_by)
    return t

  monkeypatch.setattr(artifacts, "load_transformation", load_transformation)
  return str(d), lambda old, side: np.asarray(h.apply(variables, old, side if side_dim else None)["embedding"])


def test_vectors_trained_h_upgrades_a_vectors_store(tmp_path, monkeypatch):
  a = _arrays()
  src = str(tmp_path / "v.npz")
  vectors.save_vectors(src, a)
  st = store_lib.Store(str(tmp_path / "g"))
  built = build_lib.build_from_vectors(src, st, old_model="clip", side_model="ae", chunk_size=CHUNK, progress=False)
  stage_dir, h = _fake_vectors_h(tmp_path, monkeypatch)
  t = loader.load_transformation(stage_dir)
  assert t.expects == {"embedding": {"stage": "clip", "fingerprint": "vectors:clip", "dim": D_OLD},
                       "side_info": {"kind": "stored", "stage": "ae", "fingerprint": "vectors:ae", "dim": D_SIDE}}
  assert t.produces == {"embedding": {"stage": "siglip", "fingerprint": "vectors:siglip", "dim": D_NEW},
                        "side_info": t.expects["side_info"]}
  assert t.expects == built.model  # what build --from-vectors records is what h expects
  new = upgrade_lib.upgrade(built, t, st, progress=False)
  got = new.read_all()
  np.testing.assert_array_equal(got["ids"], a["id"])
  np.testing.assert_allclose(got["embeddings"], h(a["old"], a["psi"]), rtol=1e-5, atol=1e-5)
  assert new.model["embedding"]["fingerprint"] == "vectors:siglip"
  # A store of another model's vectors (another name) is refused; so is ψ of another model.
  other = build_lib.build_from_vectors(src, store_lib.Store(str(tmp_path / "o")), old_model="clip-v2",
                                       side_model="ae", chunk_size=CHUNK, progress=False)
  with pytest.raises(FCTError, match="different model versions"):
    upgrade_lib.upgrade(other, t, store_lib.Store(str(tmp_path / "o")), progress=False)
  other = build_lib.build_from_vectors(src, store_lib.Store(str(tmp_path / "p")), old_model="clip",
                                       side_model="ae2", chunk_size=CHUNK, progress=False)
  with pytest.raises(FCTError, match="side-information"):
    upgrade_lib.upgrade(other, t, store_lib.Store(str(tmp_path / "p")), progress=False)
  # Backfilling re-embeds images with a backbone stage; a store built from vectors has neither: one line.
  with pytest.raises(FCTError) as e:
    backfill_lib.backfill(str(tmp_path / "exp"), st, new="siglip", order="random", budget=0.5, progress=False)
  assert "\n" not in str(e.value)
  assert len(st.versions()) == 2


def test_vectors_trained_h_without_side_info(tmp_path, monkeypatch, capsys):
  a = _arrays()
  src = str(tmp_path / "v")
  vectors.save_vectors(src, {"old": a["old"], "id": a["id"]})
  store = str(tmp_path / "g")
  assert _cli(["build", "--from-vectors", src, "--old-model", "clip", "--to", store], capsys)[0] == 0
  stage_dir, h = _fake_vectors_h(tmp_path, monkeypatch, side_kind="none", side_dim=0, side_model="")
  t = loader.load_transformation(stage_dir)
  assert t.expects["side_info"] == {"kind": "none", "stage": "", "fingerprint": "none:0", "dim": 0}
  code, out, err = _cli(["upgrade", "--from", store, "--transformation", stage_dir, "--to", store], capsys)
  assert code == 0, err
  got = store_lib.Store(store).open().read_all()
  np.testing.assert_allclose(got["embeddings"], h(a["old"], None), rtol=1e-5, atol=1e-5)


def test_vectors_plan_h_upgrades_a_store_built_from_vectors(tmp_path, capsys):
  """End to end, nothing faked: h trained by the plan on vectors (configs/vectors.py, 4 steps) upgrades a store that
  build --from-vectors made with the same model names, and equals h applied in memory; other names are refused."""
  from configs import vectors as vectors_config  # pylint: disable=g-import-not-at-top
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)

  def vector_set(n):
    old, psi = rng.normal(size=(n, D_OLD)).astype(np.float32), rng.normal(size=(n, D_SIDE)).astype(np.float32)
    return {"old": old, "psi": psi, "new": np.tanh(old[:, :D_NEW] + psi[:, :1]), "label": rng.integers(0, 5, n),
            "id": np.arange(n) + 100}

  train, ev = str(tmp_path / "train"), str(tmp_path / "eval.npz")
  vectors.save_vectors(train, vector_set(256))
  vectors.save_vectors(ev, vector_set(64))
  wd = str(tmp_path / "wd")
  experiment.run(vectors_config.get_config(
      f"train={train},eval={ev},side_dim={D_SIDE},old_model=r18,new_model=r50,side_model=ae,epochs=1,batch_size=64,"
      "inner_dim=16,stage=transformation"), wd)
  store = str(tmp_path / "g")
  build = ["build", "--from-vectors", ev, "--old-model", "r18", "--side-model", "ae", "--chunk-size", str(CHUNK)]
  assert _cli(build + ["--to", store], capsys)[0] == 0
  code, _, err = _cli(["upgrade", "--from", store, "--transformation", os.path.join(wd, "transformation"), "--to",
                       store], capsys)
  assert code == 0, err
  v = store_lib.Store(store).open()
  assert v.model["embedding"] == {"stage": "r50", "fingerprint": "vectors:r50", "dim": D_NEW}
  t = artifacts.load_transformation(artifacts.Context(workdir=wd), "transformation", "test")
  s = vectors.open_vectors(ev, need=("old", "psi"))
  np.testing.assert_allclose(v.read_all()["embeddings"], t(s.load("old"), s.load("psi")), rtol=1e-5, atol=1e-5)
  other = str(tmp_path / "other")
  assert _cli(build[:4] + ["r34"] + build[5:] + ["--to", other], capsys)[0] == 0
  code, _, err = _cli(["upgrade", "--from", other, "--transformation", os.path.join(wd, "transformation"), "--to",
                       other], capsys)
  assert code == 2 and "different model versions" in err and err.count("\n") == 1, err
  # backfill re-embeds images with an fct_jax backbone: a store of someone else's vectors is refused, in one line.
  code, _, err = _cli(["backfill", "--store", store, "--experiment", wd, "--order", "random", "--budget", "0.5"],
                      capsys)
  assert code == 2 and "built from stored vectors" in err and err.count("\n") == 1, err
