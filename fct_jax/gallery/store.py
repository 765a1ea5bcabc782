"""On-disk gallery store: item ids, embeddings and side-information, versioned, checksummed, resumable.

Why TensorStore + zarr (v2): it is already installed (orbax writes checkpoints with it), it reads and writes the
same chunked arrays on local disk and on cloud buckets (``gs://``), its writes of whole, aligned chunks need no
read-modify-write, so several processes may write disjoint chunks of one array at once (multi-host build and
upgrade), and zarr v2 is readable by other tools (zarr-python, xarray). Chunks are stored uncompressed:
embeddings barely compress, and raw chunks are the fastest to encode; corruption is caught by our checksums.

Layout of a store ``ROOT``::

  ROOT/CURRENT                  the committed version readers get by default (one line, replaced atomically)
  ROOT/versions/NAME/job.json   what this version is being built from (checked when a run resumes)
  ROOT/versions/NAME/ids/       zarr [N] int64
  ROOT/versions/NAME/embeddings/  zarr [N, d] float32 | float16 | bfloat16
  ROOT/versions/NAME/side_info/   zarr [N, d_side] (absent when d_side = 0)
  ROOT/versions/NAME/log_var/     zarr [N, sigma_dim] float32: FastFill's predicted s = log σ² per item (present
                                  only in a version upgraded by an h with an uncertainty head)
  ROOT/versions/NAME/order/       zarr [N] int64: a backfill order (present only in the first backfill step's
                                  version; see :mod:`fct_jax.gallery.backfill`)
  ROOT/versions/NAME/progress/chunk-000012.json   one file per finished chunk: its checksums (resume)
  ROOT/versions/NAME/manifest.json   written last: a version without it is unfinished and never read

Commit = write ``manifest.json`` (one object), then replace ``CURRENT`` (one object). Nothing is renamed, so the
same protocol is atomic on a POSIX disk (temp file + ``os.replace``) and on GCS (an object write replaces the
object whole). Older versions are never touched, so readers of the previous version are undisturbed.

Resumability: rows are processed in chunks of ``chunk_size`` items, aligned with the zarr chunks; a chunk's
progress file is written only after all of its array writes completed. A killed run rerun with the same job finds
the same version directory (its name derives from the job), skips the chunks that have progress files and
recomputes the others. Each chunk is a deterministic function of its inputs, so the result equals an
uninterrupted run's, byte for byte.

Shared chunks (backfill versions): ``manifest["chunks"][i]`` may name another committed version of the same store
under ``"at"``; chunk i is then read from that version's arrays (checked against the CRC-32s this manifest holds).
A backfill step writes only the chunks it changes and shares the others, so a version may depend on older ones:
never delete a version that a later one shares chunks with (``info`` lists them).

Checksums are CRC-32 (zlib) of each chunk's raw little-endian bytes, per array: fast (GB/s) and enough to detect
torn, truncated, zero-filled (missing) or bit-flipped chunks; not a defence against deliberate tampering.
"""

import hashlib
import json
import os
import re
import zlib
from typing import Any, Dict, List, Optional

import ml_dtypes
import numpy as np
import tensorstore as ts
from etils import epath

from fct_jax.checkpoint import is_local as _is_local
from fct_jax.checkpoint import join as _join
from fct_jax.errors import FCTError

FORMAT = "fct_jax.gallery/1"
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_ZARR_DTYPE = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16", "int64": "<i8"}
ARRAYS = ("ids", "embeddings", "side_info")
LOG_VAR = "log_var"  # optional array: FastFill's s = log σ², always float32 (it orders a backfill; 4 bytes/item)
DEFAULT_CHUNK = 65536
_NP = {"int64": np.dtype(np.int64), "float32": np.dtype(np.float32)}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


# ----------------------------------------------------------------------------------------------- small files




def _exists(path: str) -> bool:
  return epath.Path(path).exists()


def write_text_atomic(path: str, text: str):
  """Replaces ``path`` with ``text`` atomically (local: temp file + rename; buckets: one object write)."""
  if _is_local(path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
  else:
    epath.Path(path).write_text(text)


def _read_json(path: str, what: str) -> Any:
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, ValueError) as e:
    raise FCTError(f"{what} {path} is unreadable ({type(e).__name__})") from e


def _dump(obj) -> str:
  return json.dumps(obj, indent=1, sort_keys=True)


def canonical(obj) -> Any:
  """``obj`` as it reads back from JSON (tuples become lists), so that saved and fresh jobs compare equal."""
  return json.loads(json.dumps(obj, sort_keys=True))


def fingerprint(obj) -> str:
  """A short stable hash of a JSON-able object (job descriptions, manifests)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def checksum(a: np.ndarray) -> str:
  """CRC-32 of an array's raw C-order bytes (``crc32:xxxxxxxx``); zlib releases the GIL on large buffers."""
  return f"crc32:{zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) & 0xFFFFFFFF:08x}"


def _kvstore(path: str) -> dict:
  if path.startswith("gs://"):
    bucket, _, rest = path[len("gs://"):].partition("/")
    return {"driver": "gcs", "bucket": bucket, "path": rest.rstrip("/") + "/"}
  if not _is_local(path):
    raise FCTError(f"unsupported store location {path!r}: use a local path or gs://bucket/path")
  return {"driver": "file", "path": os.path.abspath(path)}


def _open_array(path: str, *, create: bool, shape=None, chunk_rows=None, dtype=None):
  spec = {"driver": "zarr", "kvstore": _kvstore(path)}
  if create:
    spec["metadata"] = {"shape": list(shape), "chunks": [chunk_rows] + list(shape[1:]),
                        "dtype": _ZARR_DTYPE[dtype], "compressor": None}
    # open=True: a resumed run reopens the array it created (same metadata) instead of erasing its chunks.
    return ts.open(spec, create=True, open=True).result()
  return ts.open(spec, open=True).result()


# ----------------------------------------------------------------------------------------------- reading


class Version:
  """A committed, read-only version of a store.

  Attributes:
    path: the version directory.
    name: its name.
    manifest: the parsed ``manifest.json`` (see :func:`make_manifest`).
  """

  def __init__(self, path: str, name: str, manifest: dict):
    self.path, self.name, self.manifest = path, name, manifest
    self._arrays = {}
    self._versions_dir = str(epath.Path(path).parent)

  # Convenience views of the manifest.
  count = property(lambda self: int(self.manifest["count"]))
  chunk_size = property(lambda self: int(self.manifest["chunk_size"]))
  num_chunks = property(lambda self: int(self.manifest["num_chunks"]))
  embedding_dim = property(lambda self: int(self.manifest["embedding_dim"]))
  side_info_dim = property(lambda self: int(self.manifest["side_info_dim"]))
  dtype = property(lambda self: self.manifest["dtype"])
  model = property(lambda self: self.manifest["model"])
  # Width of the stored s = log σ² (0: none stored), and the backfill record (None: not a backfill version).
  log_var_dim = property(lambda self: int(self.manifest.get("log_var_dim", 0)))
  backfill = property(lambda self: self.manifest.get("backfill"))

  def shared_from(self) -> List[str]:
    """The other versions this one reads chunks from (sorted; empty unless it is a backfill version)."""
    return sorted({c["at"] for c in self.manifest["chunks"] if c.get("at", self.name) != self.name}
                  | {a["at"] for a in self.manifest.get("aux", {}).values() if a["at"] != self.name})

  def chunk_rows(self, i: int):
    """``(start, stop)`` rows of chunk ``i``."""
    start = i * self.chunk_size
    return start, min(start + self.chunk_size, self.count)

  def _array(self, key: str, at: Optional[str] = None):
    """Array ``key`` of this version's directory, or of version ``at`` of the same store (shared chunks)."""
    at = at or self.name
    if not _NAME.match(at) or at in (".", ".."):  # a name read from the manifest stays inside the store
      raise FCTError(f"gallery version {self.path}: its manifest names {at!r}, not a version of this store: corrupt")
    if (at, key) not in self._arrays:
      path = _join(self._versions_dir, at, key)
      try:
        self._arrays[at, key] = _open_array(path, create=False)
      except Exception as e:  # tensorstore raises ValueError/RuntimeError with long messages
        raise FCTError(f"gallery version {self.path}: cannot open array {path} "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
    return self._arrays[at, key]

  def keys(self) -> List[str]:
    """The arrays a chunk holds on disk: ids, embeddings, and side_info / log_var where their width is not 0."""
    return (["ids", "embeddings"] + (["side_info"] if self.side_info_dim else [])
            + ([LOG_VAR] if self.log_var_dim else []))

  def read_chunk(self, i: int, *, verify: bool = True, keys: Optional[List[str]] = None) -> Dict[str, np.ndarray]:
    """Chunk ``i`` as ``{"ids": [n] int64, "embeddings": [n, d], "side_info": [n, d_side]}`` (stored dtype), and
    ``"log_var": [n, sigma_dim] float32`` when the version stores s.

    With ``verify`` every array's CRC-32 is checked against the manifest; a missing, truncated or altered chunk
    raises :class:`FCTError`. A shared chunk (``"at"`` in its manifest entry) is read from the version it names.
    ``keys``: read (and check) only these arrays.
    """
    if not 0 <= i < self.num_chunks:
      raise IndexError(f"chunk {i} out of range [0, {self.num_chunks})")
    start, stop = self.chunk_rows(i)
    keys = self.keys() if keys is None else [k for k in self.keys() if k in keys]
    at = self.manifest["chunks"][i].get("at")
    try:
      futures = {k: self._array(k, at)[start:stop].read() for k in keys}
      out = {k: f.result() for k, f in futures.items()}
    except FCTError:
      raise
    except Exception as e:
      raise FCTError(f"gallery version {self.path}: chunk {i} is corrupt or truncated "
                     f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
    if not self.side_info_dim:
      out["side_info"] = np.zeros((stop - start, 0), DTYPES[self.dtype])
    if verify:
      want = self.manifest["chunks"][i]
      for k in keys:
        got = checksum(out[k])
        if got != want[k]:
          raise FCTError(f"gallery version {self.path}: chunk {i} of {k!r} fails its checksum ({got} != "
                         f"{want[k]}): the store is corrupt; rebuild that version")
    return out

  def read_all(self, *, verify: bool = True) -> Dict[str, np.ndarray]:
    """The whole version in memory (tests, small galleries)."""
    chunks = [self.read_chunk(i, verify=verify) for i in range(self.num_chunks)]
    if not chunks:
      out = {"ids": np.zeros((0,), np.int64), "embeddings": np.zeros((0, self.embedding_dim), DTYPES[self.dtype]),
             "side_info": np.zeros((0, self.side_info_dim), DTYPES[self.dtype])}
      if self.log_var_dim:
        out[LOG_VAR] = np.zeros((0, self.log_var_dim), np.float32)
      return out
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

  def read_aux(self, key: str) -> np.ndarray:
    """A whole auxiliary array of the manifest's ``aux`` block (e.g. a backfill ``order``), CRC-32 checked."""
    rec = self.manifest.get("aux", {}).get(key)
    if rec is None:
      raise FCTError(f"gallery version {self.path} has no {key!r} array")
    arr = self._array(key, rec["at"])
    out = []
    for j, want in enumerate(rec["chunks"]):
      a, b = j * rec["chunk_size"], min((j + 1) * rec["chunk_size"], rec["shape"][0])
      try:
        x = arr[a:b].read().result()
      except Exception as e:
        raise FCTError(f"gallery version {self.path}: chunk {j} of {key!r} is corrupt or truncated "
                       f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e
      if checksum(x) != want:
        raise FCTError(f"gallery version {self.path}: chunk {j} of {key!r} fails its checksum: the store is corrupt")
      out.append(x)
    return np.concatenate(out) if out else np.zeros(rec["shape"], _NP[rec["dtype"]])

  def verify(self):
    """Reads and checks every chunk (and auxiliary array); raises :class:`FCTError` on the first bad one."""
    for i in range(self.num_chunks):
      self.read_chunk(i, verify=True)
    for key in self.manifest.get("aux", {}):
      self.read_aux(key)


# ----------------------------------------------------------------------------------------------- writing


def make_manifest(*, name: str, count: int, chunk_size: int, embedding_dim: int, side_info_dim: int, dtype: str,
                  model: dict, lineage: List[dict], job: dict, chunks: List[dict], sequence: int,
                  log_var_dim: int = 0, extra: Optional[dict] = None) -> dict:
  """The manifest of a version: everything a reader needs to trust and interpret the arrays.

  ``model`` says which models the stored vectors come from: ``{"embedding": {"stage", "fingerprint", "dim"},
  "side_info": {"kind", "stage", "fingerprint", "dim"}}``; an upgrade checks it against the transformation.
  ``lineage`` lists the operations that produced the version (build, then each upgrade). ``chunks[i]`` holds the
  CRC-32 of each array's chunk ``i`` (and ``"at"``: the version holding it, when shared). ``log_var_dim`` > 0
  declares the ``log_var`` array (FastFill's s); ``extra``: further top-level blocks (a backfill's ``backfill`` and
  ``aux``). Without those two the manifest is exactly what it was before they existed.
  """
  manifest = {"format": FORMAT, "name": name, "sequence": sequence, "count": count, "chunk_size": chunk_size,
              "num_chunks": len(chunks), "embedding_dim": embedding_dim, "side_info_dim": side_info_dim,
              "dtype": dtype, "arrays": {"ids": {"dtype": "int64", "shape": [count]},
                                         "embeddings": {"dtype": dtype, "shape": [count, embedding_dim]},
                                         "side_info": {"dtype": dtype, "shape": [count, side_info_dim]}},
              "checksum": "crc32 per chunk of raw little-endian bytes", "model": model, "lineage": lineage,
              "job": job, "chunks": chunks}
  if log_var_dim:
    manifest["log_var_dim"] = int(log_var_dim)
    manifest["arrays"][LOG_VAR] = {"dtype": "float32", "shape": [count, int(log_var_dim)]}
  manifest.update(extra or {})
  return manifest


class VersionWriter:
  """Writes one (possibly resumed) version; thread-safe for distinct chunks.

  Created by :meth:`Store.begin`. Call :meth:`write_chunk` for every chunk of :attr:`to_write` not in :attr:`done`,
  then :meth:`commit` (a version that shares chunks passes the others to it as ``inherited``).
  """

  def __init__(self, store: "Store", name: str, job: dict, *, count: int, chunk_size: int, embedding_dim: int,
               side_info_dim: int, dtype: str, log_var_dim: int = 0, write_only: Optional[List[int]] = None):
    self.store, self.name, self.job = store, name, job
    self.path = _join(store.root, "versions", name)
    self.count, self.chunk_size = count, chunk_size
    self.embedding_dim, self.side_info_dim, self.dtype = embedding_dim, side_info_dim, dtype
    self.log_var_dim = int(log_var_dim)
    self.num_chunks = -(-count // chunk_size)
    self.to_write = list(range(self.num_chunks)) if write_only is None else sorted(write_only)
    rows = max(chunk_size, 1)
    self._arrays = {
        "ids": _open_array(_join(self.path, "ids"), create=True, shape=[count], chunk_rows=rows, dtype="int64"),
        "embeddings": _open_array(_join(self.path, "embeddings"), create=True, shape=[count, embedding_dim],
                                  chunk_rows=rows, dtype=dtype)}
    if side_info_dim:
      self._arrays["side_info"] = _open_array(_join(self.path, "side_info"), create=True,
                                              shape=[count, side_info_dim], chunk_rows=rows, dtype=dtype)
    if self.log_var_dim:
      self._arrays[LOG_VAR] = _open_array(_join(self.path, LOG_VAR), create=True, shape=[count, self.log_var_dim],
                                          chunk_rows=rows, dtype="float32")
    epath.Path(self.path, "progress").mkdir(parents=True, exist_ok=True)
    self.done = self._done_chunks()

  def _progress_path(self, i: int) -> str:
    return _join(self.path, "progress", f"chunk-{i:06d}.json")

  def _done_chunks(self) -> Dict[int, dict]:
    done = {}
    for p in epath.Path(self.path, "progress").glob("chunk-*.json"):
      try:
        rec = json.loads(p.read_text())
        done[int(rec["chunk"])] = rec["checksums"]
      except (OSError, ValueError, KeyError):
        continue  # a torn progress file (killed mid-write): the chunk is simply redone
    return done

  def chunk_rows(self, i: int):
    start = i * self.chunk_size
    return start, min(start + self.chunk_size, self.count)

  def write_chunk(self, i: int, ids: np.ndarray, embeddings: np.ndarray, side_info: np.ndarray,
                  log_var: Optional[np.ndarray] = None) -> dict:
    """Writes chunk ``i`` (rows ``chunk_rows(i)``) and then its progress record; returns its checksums.

    Args:
      i: chunk index.
      ids: [n] integer item ids.
      embeddings: [n, embedding_dim], cast to the store dtype.
      side_info: [n, side_info_dim], cast to the store dtype.
      log_var: [n, log_var_dim] s = log σ², stored float32 (required iff the version has ``log_var_dim`` > 0).
    """
    start, stop = self.chunk_rows(i)
    n = stop - start
    dt = DTYPES[self.dtype]
    data = {"ids": np.asarray(ids, np.int64), "embeddings": np.asarray(embeddings).astype(dt, copy=False),
            "side_info": np.asarray(side_info).astype(dt, copy=False)}
    want = {"ids": (n,), "embeddings": (n, self.embedding_dim), "side_info": (n, self.side_info_dim)}
    if self.log_var_dim:
      if log_var is None:
        raise FCTError(f"chunk {i}: this version stores s = log σ² ({self.log_var_dim}-d), but none was given")
      data[LOG_VAR] = np.asarray(log_var).astype(np.float32, copy=False)
      want[LOG_VAR] = (n, self.log_var_dim)
    elif log_var is not None:
      raise FCTError(f"chunk {i}: s = log σ² given, but this version stores none (log_var_dim = 0)")
    for k, shape in want.items():
      if data[k].shape != shape:
        raise FCTError(f"chunk {i}: {k} has shape {data[k].shape}, expected {shape}")
    keys = [k for k in ARRAYS + (LOG_VAR,) if k in self._arrays]
    # All writes of the chunk in flight at once; the progress record only after every one has landed.
    futures = [self._arrays[k][start:stop].write(data[k]) for k in keys]
    sums = {k: checksum(data[k]) for k in keys}
    for f in futures:
      f.result()
    write_text_atomic(self._progress_path(i), json.dumps({"chunk": i, "rows": [start, stop], "checksums": sums}))
    self.done[i] = sums
    return sums

  def _aux_path(self, key: str) -> str:
    return _join(self.path, "progress", f"aux-{key}.json")

  def aux_done(self, key: str) -> Optional[dict]:
    """The record of auxiliary array ``key`` when a run (perhaps a killed one) finished writing it, else None."""
    p = epath.Path(self._aux_path(key))
    try:
      return json.loads(p.read_text()) if p.exists() else None
    except (OSError, ValueError):
      return None  # torn: rewritten

  def write_aux(self, key: str, values: np.ndarray) -> dict:
    """Writes a 1-D int64 auxiliary array ``key`` (chunked like the version), then its progress record with the
    chunks' CRC-32s; returns the record for the manifest's ``aux`` block."""
    values = np.asarray(values, np.int64)
    rows = max(self.chunk_size, 1)
    arr = _open_array(_join(self.path, key), create=True, shape=list(values.shape), chunk_rows=rows, dtype="int64")
    arr.write(values).result()
    rec = {"at": self.name, "dtype": "int64", "shape": list(values.shape), "chunk_size": rows,
           "chunks": [checksum(values[a:a + rows]) for a in range(0, len(values), rows)]}
    write_text_atomic(self._aux_path(key), json.dumps(rec))
    return rec

  def commit(self, *, model: dict, lineage: List[dict], inherited: Optional[Dict[int, dict]] = None,
             extra: Optional[dict] = None) -> Version:
    """Writes the manifest and points ``CURRENT`` at this version (call from one process, after all chunks).

    ``inherited``: manifest entries (with ``"at"``) of the chunks this version shares instead of writing;
    ``extra``: further manifest blocks (see :func:`make_manifest`).
    """
    done = self._done_chunks()
    inherited = inherited or {}
    missing = [i for i in range(self.num_chunks) if i not in done and i not in inherited]
    if missing:
      raise FCTError(f"cannot commit {self.path}: {len(missing)} chunk(s) unfinished (first: {missing[0]})")
    chunks = [done[i] if i in done else inherited[i] for i in range(self.num_chunks)]
    manifest = make_manifest(name=self.name, count=self.count, chunk_size=self.chunk_size,
                             embedding_dim=self.embedding_dim, side_info_dim=self.side_info_dim, dtype=self.dtype,
                             model=model, lineage=lineage, job=self.job, chunks=chunks,
                             sequence=1 + max([v.manifest["sequence"] for v in self.store.versions()] or [0]),
                             log_var_dim=self.log_var_dim, extra=extra)
    write_text_atomic(_join(self.path, "manifest.json"), _dump(manifest))
    self.store.set_current(self.name)
    return self.store.open(self.name)


class Store:
  """A directory (local or ``gs://``) of gallery versions; see the module docstring for the layout."""

  def __init__(self, root: str):
    self.root = str(root).rstrip("/") if not _is_local(root) else os.path.abspath(root)

  def _version_dir(self, name: str) -> str:
    return _join(self.root, "versions", name)

  def exists(self) -> bool:
    return _exists(_join(self.root, "versions"))

  def current(self) -> Optional[str]:
    p = _join(self.root, "CURRENT")
    return epath.Path(p).read_text().strip() if _exists(p) else None

  def set_current(self, name: str):
    """Points ``CURRENT`` at committed version ``name`` (one atomic replace: the commit's second, last write)."""
    write_text_atomic(_join(self.root, "CURRENT"), name + "\n")

  def versions(self) -> List[Version]:
    """Committed versions, oldest first."""
    d = epath.Path(self.root, "versions")
    if not d.exists():
      return []
    out = [self.open(p.name) for p in d.iterdir() if (p / "manifest.json").exists()]
    return sorted(out, key=lambda v: v.manifest["sequence"])

  def open(self, name: Optional[str] = None) -> Version:
    """A committed version (default: ``CURRENT``); a one-line error if there is none or it is unfinished."""
    if name is None:
      name = self.current()
      if name is None:
        raise FCTError(f"{self.root} is not a gallery store (no CURRENT version); build one first "
                       "(python -m fct_jax.gallery build ...)")
    path = self._version_dir(name)
    mpath = _join(path, "manifest.json")
    if not _exists(mpath):
      state = "is unfinished (no manifest)" if _exists(path) else "does not exist"
      raise FCTError(f"gallery version {name!r} in {self.root} {state}")
    manifest = _read_json(mpath, "gallery manifest")
    if manifest.get("format") != FORMAT:
      raise FCTError(f"{mpath}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return Version(path, name, manifest)

  def begin(self, name: str, job: dict, *, count: int, chunk_size: int, embedding_dim: int, side_info_dim: int,
            dtype: str, log_var_dim: int = 0, write_only: Optional[List[int]] = None) -> VersionWriter:
    """Starts version ``name`` for ``job``, or resumes it when a killed run of the same job left it unfinished.

    ``log_var_dim`` > 0 adds the ``log_var`` array (FastFill's s); ``write_only``: the chunks this version writes
    (default all; the others are shared at commit). Refuses (one-line error, nothing written) a committed version of
    that name, an unfinished one from a different job, a bad dtype or chunk size.
    """
    if not _NAME.match(name):
      raise FCTError(f"bad version name {name!r} (letters, digits, '_', '.', '-')")
    if dtype not in DTYPES:
      raise FCTError(f"unknown storage dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    if chunk_size <= 0:
      raise FCTError(f"chunk_size must be positive, got {chunk_size}")
    path = self._version_dir(name)
    if _exists(_join(path, "manifest.json")):
      raise FCTError(f"gallery version {name!r} in {self.root} is already committed")
    job = canonical(job)
    jpath = _join(path, "job.json")
    if _exists(jpath):
      held = _read_json(jpath, "job file")
      if held != job:
        raise FCTError(f"{path} holds an unfinished run of a different job; remove it or pick another store")
    else:
      epath.Path(path).mkdir(parents=True, exist_ok=True)
      write_text_atomic(jpath, _dump(job))
    return VersionWriter(self, name, job, count=count, chunk_size=chunk_size, embedding_dim=embedding_dim,
                         side_info_dim=side_info_dim, dtype=dtype, log_var_dim=log_var_dim, write_only=write_only)

  def find_job(self, job: dict) -> Optional[Version]:
    """The committed version that ``job`` already produced, if any (reruns of finished jobs are no-ops)."""
    job = canonical(job)
    for v in self.versions():
      if v.manifest.get("job") == job:
        return v
    return None
