"""Vector sets (fct_jax.data.vectors, issue 22): the three formats, lazy reads, and bad files refused in one line."""

import os
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest

from fct_jax.data import vectors
from fct_jax.errors import FCTError

N, D_OLD, D_SIDE, D_NEW = 50, 6, 3, 5


def _arrays(n=N, seed=0):
  rng = np.random.default_rng(seed)
  return {"old": rng.normal(size=(n, D_OLD)).astype(np.float32), "psi": rng.normal(size=(n, D_SIDE)).astype(np.float16),
          "new": rng.normal(size=(n, D_NEW)), "label": rng.integers(0, 7, n).astype(np.int32),
          "id": (rng.permutation(n) * 3 + 11).astype(np.uint32), "notes": np.zeros(4)}  # "notes": ignored


def _path(tmp_path, fmt):
  return str(tmp_path / ("set.npz" if fmt == "npz" else f"set_{fmt}"))


def _error(fn, *args, match=None, **kw) -> str:
  """The one-line FCTError ``fn`` raises (its text)."""
  with pytest.raises(FCTError, match=match) as e:
    fn(*args, **kw)
  assert "\n" not in str(e.value), str(e.value)
  return str(e.value)


@pytest.mark.parametrize("fmt", vectors.FORMATS)
def test_round_trip(tmp_path, fmt):
  a = _arrays()
  path = _path(tmp_path, fmt)
  vectors.save_vectors(path, a, fmt=fmt)
  vs = vectors.open_vectors(path, need=("old", "psi", "new", "label", "id"))
  assert vs.num_rows == N and vs.fields == vectors.FIELDS and vs.format == fmt
  assert (vs.dim("old"), vs.dim("psi"), vs.dim("new")) == (D_OLD, D_SIDE, D_NEW)
  for f in ("old", "psi", "new"):
    got = vs.load(f)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, a[f].astype(np.float32))
  for f in ("label", "id"):
    got = vs.load(f)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, a[f])
  np.testing.assert_array_equal(vs.ids(), a["id"])
  np.testing.assert_array_equal(vs.read("old", 7, 19), a["old"][7:19])
  view = vs.rows("psi")
  assert view.shape == (N, D_SIDE) and len(view) == N
  idx = np.array([40, 3, 3, 17])
  np.testing.assert_array_equal(view[idx], a["psi"][idx].astype(np.float32))
  np.testing.assert_array_equal(view[5:9], a["psi"][5:9].astype(np.float32))
  assert view[idx].dtype == np.float32 and vs.rows("label")[idx].dtype == np.int64
  ident = vs.identity()
  assert set(ident["fields"]) == set(vectors.FIELDS) and ident["fields"]["old"]["shape"] == [N, D_OLD]
  # Without an id field the ids are 0..N-1; fields beyond `need` are optional.
  small = _path(tmp_path / "small", fmt)
  vectors.save_vectors(small, {"old": a["old"]}, fmt=fmt)
  vs = vectors.open_vectors(small)
  assert vs.fields == ("old",) and not vs.has("psi")
  np.testing.assert_array_equal(vs.ids(), np.arange(N))


def test_zarr_bfloat16_and_chunked_reads(tmp_path):
  old = np.random.default_rng(1).normal(size=(N, D_OLD)).astype(ml_dtypes.bfloat16)
  path = str(tmp_path / "z")
  vectors.save_vectors(path, {"old": old}, fmt="zarr", chunk_rows=8)
  vs = vectors.open_vectors(path)
  assert vs.stored_dtype("old") == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(vs.read("old", 5, 30), old[5:30].astype(np.float32))
  np.testing.assert_array_equal(vs.load("old", chunk_rows=7), old.astype(np.float32))
  assert type(vs.rows("old").source).__name__ == "TensorStore"
  # bfloat16 has no .npy form: refused rather than written as raw bytes.
  _error(vectors.save_vectors, str(tmp_path / "b"), {"old": old}, match="bfloat16")


@pytest.mark.parametrize("fmt", ["npy", "npz"])
def test_local_npy_is_memory_mapped_not_loaded(tmp_path, fmt):
  """A local .npy (and an uncompressed local .npz member) is read through a memory map: opening the set and reading
  a few rows allocates nothing like the file's size."""
  n, d = 40_000, 256  # 41 MB
  path = _path(tmp_path, fmt)
  old = np.lib.format.open_memmap(str(tmp_path / "big.npy"), mode="w+", dtype=np.float32, shape=(n, d))
  old[:] = 1.0
  old[n - 1] = 2.0
  vectors.save_vectors(path, {"old": old}, fmt=fmt)
  del old
  tracemalloc.start()
  try:
    vs = vectors.open_vectors(path)
    view = vs.rows("old")
    assert isinstance(view.source, np.memmap)
    assert view[np.array([n - 1, 0])][:, 0].tolist() == [2.0, 1.0]
    assert vs.read("old", n - 10, n)[-1, 0] == 2.0
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 4 << 20, peak


def test_compressed_npz_fortran_order_and_remote_reads(tmp_path, monkeypatch):
  a = _arrays()
  path = str(tmp_path / "c.npz")
  np.savez_compressed(path, old=a["old"], label=a["label"])
  vs = vectors.open_vectors(path)
  np.testing.assert_array_equal(vs.read("old", 3, 9), a["old"][3:9])
  np.testing.assert_array_equal(vs.load("label"), a["label"])
  # Fortran-order .npy (np.save of a transposed array) reads the same rows.
  fdir = tmp_path / "fortran"
  os.makedirs(fdir)
  np.save(fdir / "old.npy", np.asfortranarray(a["old"]))
  np.testing.assert_array_equal(vectors.open_vectors(str(fdir)).read("old", 2, 40), a["old"][2:40])
  # The bucket path (byte-range reads of .npy, whole reads of .npz members), exercised on local files.
  vectors.save_vectors(str(tmp_path / "r"), a)
  monkeypatch.setattr(vectors, "_is_local", lambda p: False)
  for p in (str(tmp_path / "r"), str(fdir)):
    vs = vectors.open_vectors(p)
    np.testing.assert_array_equal(vs.read("old", 11, 33), a["old"][11:33])
    np.testing.assert_array_equal(vs.rows("old")[np.array([4, 1])], a["old"][[4, 1]])
    np.testing.assert_array_equal(vs.load("old"), a["old"])
  np.testing.assert_array_equal(vectors.open_vectors(path).read("old", 0, 5), a["old"][:5])


@pytest.mark.parametrize("fmt", vectors.FORMATS)
def test_bad_values_refused(tmp_path, fmt):
  a = _arrays()
  a["old"][37, 2] = np.nan
  path = _path(tmp_path, fmt)
  vectors.save_vectors(path, a, fmt=fmt)
  vs = vectors.open_vectors(path)  # values are checked when read, not at open
  msg = _error(vectors.check_finite, vs, chunk_rows=16, match="row 37 ")
  assert "old" in msg
  _error(vs.read, "old", 32, 48, match="row 37 ")
  vs.read("old", 0, 37)  # the rows before it are fine
  np.testing.assert_array_equal(vs.rows("old")[[36]], a["old"][[36]])  # rows(): no check (training batches)
  # Inf in psi; a float64 beyond float32's range is not silently turned into inf.
  a = _arrays()
  a["psi"][3, 0] = np.inf
  a["new"][45, 1] = 1e300
  vectors.save_vectors(path, a, fmt=fmt)
  vs = vectors.open_vectors(path)
  _error(vectors.check_finite, vs, ["psi"], match="row 3 ")
  _error(vectors.check_finite, vs, ["new"], match="row 45 .*float32's range")
  # Duplicate ids: the id and both rows are named when the ids are loaded.
  a = _arrays()
  a["id"][40] = a["id"][9]
  vectors.save_vectors(path, a, fmt=fmt)
  _error(vectors.open_vectors(path).ids, match=f"id {a['id'][9]} appears more than once \\(rows 9 and 40\\)")


def test_bad_sets_refused(tmp_path):
  a = _arrays()

  def refused(arrays, match, fmt="npy", **kw):
    path = str(tmp_path / f"bad{len(os.listdir(tmp_path))}")
    vectors.save_vectors(path, arrays, fmt=fmt)
    return _error(vectors.open_vectors, path, match=match, **kw)

  msg = refused({**a, "psi": a["psi"][:-1]}, "'psi' has 49 rows")
  assert "psi.npy" in msg and "old.npy" in msg and "50" in msg
  refused({**a, "label": a["label"][:10]}, "'label' has 10 rows", fmt="zarr")
  msg = refused({"old": a["old"]}, "has no 'psi' \\(it has: old\\)", need=("old", "psi"))
  refused({"psi": a["psi"]}, "has no 'old' \\(it has: psi\\)")
  refused({"notes": a["notes"]}, "has no 'old' \\(it has: none of old, psi")
  refused({"old": np.zeros((0, D_OLD), np.float32)}, "has no rows")
  refused({"old": np.zeros((0, D_OLD), np.float32)}, "has no rows", fmt="zarr")
  refused({"old": a["old"][:, 0]}, "'old' has shape \\(50,\\); expected \\[N, d\\]")
  refused({"old": a["old"][:, :0]}, "expected \\[N, d\\] with d ≥ 1")
  refused({"old": a["old"], "label": a["label"][:, None]}, "'label' has shape \\(50, 1\\); expected \\[N\\]")
  refused({"old": np.array([["1", "2"]] * 3)}, "'old' must be float.*string")
  refused({"old": a["old"].astype(np.complex64)}, "complex", fmt="npz")
  refused({"old": a["old"].astype(np.int8)}, "'old' must be float.*int8", fmt="zarr")
  refused({"old": a["old"], "label": np.array(["cat"] * N)}, "'label' must hold integers, not <U3 \\(string\\)")
  refused({"old": a["old"], "id": a["id"] > 20}, "'id' must hold integers, not bool")
  refused({"old": a["old"], "label": a["label"].astype(np.float32)}, "'label' must hold integers, not float32")
  # Object arrays (pickles) are refused from their header, never unpickled.
  obj = str(tmp_path / "obj.npz")
  np.savez(obj, old=np.array([None] * 3, dtype=object))
  _error(vectors.open_vectors, obj, match="object")
  # Not a vector set at all.
  _error(vectors.open_vectors, str(tmp_path / "nothing"), match="does not exist")
  np.save(tmp_path / "one.npy", a["old"])
  _error(vectors.open_vectors, str(tmp_path / "one.npy"), match="is one .npy array")
  (tmp_path / "text.npz").write_text("hello")
  _error(vectors.open_vectors, str(tmp_path / "text.npz"), match="not a readable .npz")
  both = str(tmp_path / "both")
  vectors.save_vectors(both, {"old": a["old"]}, fmt="zarr")
  np.save(os.path.join(both, "old.npy"), a["old"])
  _error(vectors.open_vectors, both, match="holds 'old' twice")
  v3 = tmp_path / "v3" / "old"
  os.makedirs(v3)
  (v3 / "zarr.json").write_text("{}")
  _error(vectors.open_vectors, str(tmp_path / "v3"), match="zarr v3")
  zstr = tmp_path / "zstr" / "old"
  os.makedirs(zstr)
  (zstr / ".zarray").write_text('{"zarr_format": 2, "shape": [3, 2], "chunks": [3, 2], "dtype": "<U4", '
                                '"compressor": null, "fill_value": null, "order": "C", "filters": null}')
  _error(vectors.open_vectors, str(tmp_path / "zstr"), match="string")
  # A truncated .npy (a killed copy) is refused when first read.
  trunc = tmp_path / "trunc"
  vectors.save_vectors(str(trunc), {"old": a["old"]})
  raw = (trunc / "old.npy").read_bytes()
  (trunc / "old.npy").write_bytes(raw[:len(raw) // 2])
  _error(vectors.open_vectors(str(trunc)).load, "old", match="truncated")
  # Ids beyond int64 are not wrapped around.
  big = str(tmp_path / "bigid")
  vectors.save_vectors(big, {"old": a["old"][:3], "id": np.array([1, 2**63 + 5, 3], np.uint64)})
  _error(vectors.open_vectors(big).ids, match="row 1 .*beyond int64")
  _error(vectors.save_vectors, str(tmp_path / "x"), a, fmt="parquet", match="unknown vector format")


def test_widths_must_agree_between_sets(tmp_path):
  a, b = _arrays(), _arrays(n=20)
  b["old"] = b["old"][:, :4]
  vectors.save_vectors(str(tmp_path / "train.npz"), a)
  vectors.save_vectors(str(tmp_path / "eval.npz"), b)
  train = vectors.open_vectors(str(tmp_path / "train.npz"), what="training vectors")
  ev = vectors.open_vectors(str(tmp_path / "eval.npz"), what="evaluation vectors")
  msg = _error(vectors.check_same_widths, train, ev, match="'old' is 4-d but training vectors")
  assert msg.startswith("evaluation vectors") and "eval.npz" in msg and "train.npz" in msg
  vectors.check_same_widths(train, ev, ["psi", "new"])  # these agree
  _error(train.dim, "label", match="1-D")
  _error(ev.read, "notes", 0, 1, match="has no 'notes'")


def test_open_classifier(tmp_path):
  rng = np.random.default_rng(2)
  kernel, bias = rng.normal(size=(8, 5)), rng.normal(size=(5,)).astype(np.float32)
  np.save(tmp_path / "k.npy", kernel)
  k, b = vectors.open_classifier(str(tmp_path / "k.npy"))
  assert k.dtype == np.float32 and b is None
  np.testing.assert_array_equal(k, kernel.astype(np.float32))
  np.savez(tmp_path / "kb.npz", kernel=kernel.astype(np.float16), bias=bias)
  k, b = vectors.open_classifier(str(tmp_path / "kb.npz"))
  np.testing.assert_array_equal(b, bias)
  assert k.shape == (8, 5)
  np.savez(tmp_path / "k_only.npz", kernel=kernel)
  assert vectors.open_classifier(str(tmp_path / "k_only.npz"))[1] is None

  def bad(match, **arrays):
    p = tmp_path / f"bad{len(os.listdir(tmp_path))}.npz"
    np.savez(p, **arrays)
    _error(vectors.open_classifier, str(p), match=match)

  bad("no 'kernel' array \\(it has: w\\)", w=kernel)
  bad("kernel has shape \\(8,\\); expected \\[d, C\\]", kernel=kernel[:, 0])
  bad("bias has 4 entries but the kernel \\(8, 5\\) has 5 classes", kernel=kernel, bias=bias[:4])
  bad("bias has shape \\(5, 1\\)", kernel=kernel, bias=bias[:, None])
  bad("kernel must be float.*int64", kernel=kernel.astype(np.int64))
  bad("kernel must be float.*string", kernel=np.array([["a"]]))
  bad("kernel holds NaN", kernel=np.where(kernel > 1, np.nan, kernel))
  bad("kernel has shape \\(0, 5\\)", kernel=kernel[:0])
  _error(vectors.open_classifier, str(tmp_path / "missing.npy"), match="does not exist")
  (tmp_path / "junk.npy").write_bytes(b"junk")
  _error(vectors.open_classifier, str(tmp_path / "junk.npy"), match="not a readable")
  with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
    z.writestr("kernel.npy", b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
               + b" " * 54 + b"\n")
  _error(vectors.open_classifier, str(tmp_path / "pickled.npz"), match="not a readable")
