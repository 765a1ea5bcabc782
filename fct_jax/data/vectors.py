"""Stored vectors made by any model ("bring your own embeddings"): read lazily, checked, and written.

A *vector set* is rows of named fields, all with the same number of rows N (:data:`FIELDS`):

  old    [N, d_old]  float   φ_old of each item (required everywhere)
  psi    [N, d_side] float   side-information ψ (optional)
  new    [N, d_new]  float   φ_new (optional; what a transformation is trained towards)
  label  [N]         integer class labels (optional; retrieval evaluation)
  id     [N]         integer item ids (optional; default 0..N-1), unique

It is stored as any of three formats, chosen by what is at the path:

  FILE.npz             arrays named by the fields (``np.savez``)
  DIR/<field>.npy      one ``.npy`` file per field
  DIR/<field>/.zarray  one zarr (v2) array per field, read with TensorStore (local or ``gs://``, like the gallery)

A directory may mix ``.npy`` files and zarr arrays (one of the two per field). Arrays with other names are ignored.

Nothing is loaded at open: :func:`open_vectors` reads only the headers (shapes and dtypes) and refuses a bad set
at once with a one-line :class:`~fct_jax.errors.FCTError` naming the file. Rows are read by range
(:meth:`VectorSet.read`), so a file larger than memory is streamed: a local ``.npy`` (and an uncompressed local
``.npz`` member) is memory-mapped, a remote ``.npy`` is read by byte range, a zarr array by chunk. Every float row
that is read is checked to be finite (the error names the file and the row): NaN/Inf never passes silently, nor
does a float64 beyond float32's range. Non-numeric data (strings, objects, bool, complex) is refused, never cast.
"""

import dataclasses
import json
import os
import struct
import zipfile
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import ml_dtypes
import numpy as np
import tensorstore as ts
from etils import epath

from fct_jax.checkpoint import is_local as _is_local
from fct_jax.checkpoint import join as _join
from fct_jax.errors import FCTError

FIELDS = ("old", "psi", "new", "label", "id")
FLOAT_FIELDS = ("old", "psi", "new")
INT_FIELDS = ("label", "id")
FORMATS = ("npz", "npy", "zarr")
# Rows per read in load() and check_finite(), and rows per zarr chunk written by save_vectors().
CHUNK_ROWS = 65536

_BF16 = np.dtype(ml_dtypes.bfloat16)
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), _BF16)
_INT64_MAX = np.iinfo(np.int64).max



def _kind(dtype: np.dtype) -> Optional[str]:
  """``"float"`` (float16/32/64, bfloat16), ``"int"`` (signed or unsigned integers) or None (refused)."""
  if any(dtype == f for f in _FLOATS):  # byte order aside: ">f4" is a float32 too
    return "float"
  if dtype.kind in "iu":
    return "int"
  return None


def _describe(dtype: np.dtype) -> str:
  kinds = {"U": "string", "S": "bytes", "O": "object", "b": "bool", "c": "complex", "V": "raw/void (bfloat16 saved "
           "by np.save reads back as raw bytes)", "M": "datetime", "m": "timedelta"}
  return f"{dtype} ({kinds[dtype.kind]})" if dtype.kind in kinds else str(dtype)


# ----------------------------------------------------------------------------------------------- stored arrays


@dataclasses.dataclass
class _Array:
  """One stored field: where it is, its shape and dtype, and how to read rows of it.

  ``fmt``: npz, npy or zarr. ``get(index)`` returns the rows ``index`` (a slice or an integer array) in the stored
  dtype; ``source`` is the object it reads from once opened (a ``np.memmap`` for a local ``.npy`` or uncompressed
  local ``.npz`` member, a TensorStore for zarr; None when read by range or loaded).
  ``stamp`` is a cheap identity of the bytes (size, mtime) for resumable jobs.
  """
  file: str
  shape: Tuple[int, ...]
  dtype: np.dtype
  fmt: str
  get: Callable = None
  source: object = None
  stamp: dict = dataclasses.field(default_factory=dict)


def _stamp(path: str) -> dict:
  """Size and modification time of a file or directory (what a rerun compares to tell a changed input)."""
  try:
    if _is_local(path):
      st = os.stat(path)
      return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    st = epath.Path(path).stat()
    return {"size": int(st.length), "mtime": int(st.mtime)}
  except (OSError, AttributeError, ValueError, NotImplementedError):
    return {}


def _npy_header(fp, file: str, what: str):
  """``(shape, fortran_order, dtype)`` from an open ``.npy`` stream positioned at its start (then at its data)."""
  try:
    version = np.lib.format.read_magic(fp)
    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
      raise ValueError(f".npy format version {version} is not supported (1.0 or 2.0)")
    shape, fortran, dtype = read(fp)
  except (ValueError, OSError, EOFError, struct.error) as e:
    raise FCTError(f"{what} {file} is not a readable .npy array ({type(e).__name__}: {str(e)[:120]})") from e
  return tuple(int(s) for s in shape), bool(fortran), np.dtype(dtype)


def _check_field(name: str, arr: _Array, what: str):
  """Refuses a dtype or rank that does not fit the field (floats 2-D and non-empty in width, integers 1-D)."""
  kind = _kind(arr.dtype)
  if name in FLOAT_FIELDS:
    if kind != "float":
      raise FCTError(f"{what} {arr.file}: {name!r} must be float16/float32/float64/bfloat16, not "
                     f"{_describe(arr.dtype)}")
    if len(arr.shape) != 2 or arr.shape[1] < 1:
      raise FCTError(f"{what} {arr.file}: {name!r} has shape {arr.shape}; expected [N, d] with d ≥ 1")
  else:
    if kind != "int":
      raise FCTError(f"{what} {arr.file}: {name!r} must hold integers, not {_describe(arr.dtype)}")
    if len(arr.shape) != 1:
      raise FCTError(f"{what} {arr.file}: {name!r} has shape {arr.shape}; expected [N]")


def _bind_memmap(arr: _Array, path: str, offset: int, fortran: bool):
  """Reads ``arr`` through a read-only memory map of ``path`` from byte ``offset``, opened on first use (nothing is
  loaded: the OS pages rows in as they are read)."""
  def get(index):
    if arr.source is None:
      try:
        arr.source = np.memmap(path, dtype=arr.dtype, mode="r", offset=offset, shape=arr.shape,
                               order="F" if fortran else "C")
      except (OSError, ValueError) as e:  # e.g. a truncated file: the map would reach past its end
        raise FCTError(f"cannot map {arr.file}: {type(e).__name__}: {str(e)[:120]} (truncated?)") from e
    return arr.source[index]

  arr.get = get


def _bind_range_reads(arr: _Array, path: str, offset: int, fortran: bool):
  """Reads ``arr`` from a remote ``.npy`` by byte range: a slice of rows is one ranged read; anything else (index
  arrays, Fortran order) loads the field once and keeps it."""
  row_bytes = int(np.prod(arr.shape[1:], dtype=np.int64)) * arr.dtype.itemsize
  held = {}

  def whole():
    if "a" not in held:
      with epath.Path(path).open("rb") as f:
        f.seek(offset)
        held["a"] = _from_bytes(f.read(), arr, fortran)
    return held["a"]

  def get(index):
    if fortran or "a" in held or not isinstance(index, slice) or index.indices(arr.shape[0])[2] != 1:
      return whole()[index]
    start, stop, _ = index.indices(arr.shape[0])
    stop = max(start, stop)
    with epath.Path(path).open("rb") as f:
      f.seek(offset + start * row_bytes)
      data = f.read((stop - start) * row_bytes)
    return _from_bytes(data, dataclasses.replace(arr, shape=(stop - start,) + arr.shape[1:]), False)

  arr.get = get


def _from_bytes(data: bytes, arr: _Array, fortran: bool) -> np.ndarray:
  want = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize
  if len(data) < want:
    raise FCTError(f"{arr.file} is truncated: {len(data)} bytes of data, {want} expected for {arr.shape}")
  return np.frombuffer(data[:want], arr.dtype).reshape(arr.shape, order="F" if fortran else "C")


def _npy_array(path: str, what: str) -> _Array:
  """A ``<field>.npy`` file: memory-mapped when local, read by byte range otherwise."""
  with epath.Path(path).open("rb") as f:
    shape, fortran, dtype = _npy_header(f, path, what)
    offset = f.tell()
  arr = _Array(path, shape, dtype, "npy", stamp=_stamp(path))
  if _kind(dtype) is not None:  # bad dtypes are refused by _check_field; never map them
    (_bind_memmap if _is_local(path) else _bind_range_reads)(arr, path, offset, fortran)
  return arr


def _npz_arrays(path: str, what: str) -> Dict[str, _Array]:
  """The field members of an ``.npz`` file. An uncompressed member of a local file is memory-mapped in place;
  a compressed (``np.savez_compressed``) or remote one is loaded whole on first use and kept."""
  out, stamp = {}, _stamp(path)
  try:
    handle = epath.Path(path).open("rb")
    zf = zipfile.ZipFile(handle)
    members = {i.filename: i for i in zf.infolist()}
  except (zipfile.BadZipFile, OSError, ValueError) as e:
    raise FCTError(f"{what} {path} is not a readable .npz file ({type(e).__name__})") from e
  for name in FIELDS:
    info = members.get(f"{name}.npy")
    if info is None:
      continue
    with zf.open(info) as m:
      shape, fortran, dtype = _npy_header(m, f"{path}:{name}", what)
      header = m.tell()
    arr = _Array(f"{path}:{name}.npy", shape, dtype, "npz", stamp=stamp)
    out[name] = arr
    if _kind(dtype) is None:
      continue
    if _is_local(path) and info.compress_type == zipfile.ZIP_STORED:
      with open(path, "rb") as f:  # the member's data follows its local header (whose extra field may differ)
        f.seek(info.header_offset)
        local = struct.unpack("<4s2B4HL2L2H", f.read(30))
      if local[0] != b"PK\x03\x04":
        raise FCTError(f"{what} {path} is not a readable .npz file (bad local header of {name}.npy)")
      _bind_memmap(arr, path, info.header_offset + 30 + local[-2] + local[-1] + header, fortran)
    else:
      _bind_loaded(arr, lambda info=info, arr=arr: _read_member(zf, info, arr.file, what))
  return out


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, file: str, what: str) -> np.ndarray:
  with zf.open(info) as m:
    try:
      return np.lib.format.read_array(m, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise FCTError(f"{what} {file} is unreadable ({type(e).__name__}: {str(e)[:120]})") from e


def _bind_loaded(arr: _Array, load: Callable[[], np.ndarray]):
  """Reads ``arr`` from the whole field, loaded by ``load()`` on first use and kept (a compressed or remote
  ``.npz`` member, which cannot be read by row range)."""
  held = []

  def get(index):
    if not held:
      held.append(load())
    return held[0][index]

  arr.get = get


def _kvstore(path: str) -> str:
  """A TensorStore kvstore URL for a local path or a bucket URL (``gs://``, …; what TensorStore can open)."""
  return (path if not _is_local(path) else "file://" + os.path.abspath(path)).rstrip("/") + "/"


def _zarr_array(path: str, what: str) -> _Array:
  """A zarr (v2) array directory, its metadata read from ``.zarray`` first (a clear error for a dtype TensorStore
  cannot read), then opened with TensorStore; rows are read by chunk on demand."""
  try:
    meta = json.loads(epath.Path(path, ".zarray").read_text())
    shape = tuple(int(s) for s in meta["shape"])
    raw = meta["dtype"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise FCTError(f"{what} {path}/.zarray is unreadable ({type(e).__name__})") from e
  try:
    dtype = _BF16 if raw == "bfloat16" else np.dtype(raw)
  except TypeError:
    raise FCTError(f"{what} {path}: zarr dtype {raw!r} is not a plain numeric dtype") from None
  arr = _Array(path, shape, dtype, "zarr", stamp={**_stamp(_join(path, ".zarray")), "dir": _stamp(path)})
  if _kind(dtype) is None:
    return arr

  def get(index):
    if arr.source is None:
      try:
        arr.source = ts.open({"driver": "zarr", "kvstore": _kvstore(path)}, open=True, read=True).result()
      except Exception as e:  # tensorstore raises ValueError with long messages
        raise FCTError(f"{what} {path}: cannot open the zarr array ({str(e).splitlines()[0][:160]})") from e
    try:
      return arr.source[index].read().result()
    except Exception as e:
      raise FCTError(f"{what} {path}: cannot read rows ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from e

  arr.get = get
  return arr



def _dir_arrays(path: str, what: str) -> Dict[str, _Array]:
  """The fields of a directory: ``<field>.npy`` or a zarr v2 array ``<field>/`` (one of the two per field)."""
  out = {}
  for name in FIELDS:
    npy, zarr = epath.Path(path, f"{name}.npy"), epath.Path(path, name)
    is_zarr = (zarr / ".zarray").exists()
    if npy.exists() and is_zarr:
      raise FCTError(f"{what} {path} holds {name!r} twice ({name}.npy and the zarr array {name}/); keep one")
    if npy.exists():
      out[name] = _npy_array(str(npy), what)
    elif is_zarr:
      out[name] = _zarr_array(str(zarr), what)
    elif (zarr / "zarr.json").exists():
      raise FCTError(f"{what} {zarr} is a zarr v3 array; write zarr v2 (a .zarray file), e.g. save_vectors(..., "
                     "fmt='zarr')")
  return out


# ----------------------------------------------------------------------------------------------- vector sets


class Rows:
  """A lazy ``[N, d]`` (or ``[N]``) view of one field: ``view[index]`` reads those rows (a slice, an integer or an
  integer array) as float32 (int64 for labels and ids) without loading the rest. No finiteness check (a training
  loop's random batches): check the set once with :func:`check_finite`. ``source`` is the stored array it reads
  (a ``np.memmap`` for a local ``.npy``, a TensorStore for zarr)."""

  def __init__(self, arr: _Array, out_dtype: np.dtype):
    self._arr, self.dtype, self.shape = arr, np.dtype(out_dtype), arr.shape

  @property
  def source(self):
    if self._arr.source is None and self._arr.get is not None:
      self._arr.get(slice(0, 0))  # opens the map / the store
    return self._arr.source

  def __len__(self):
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (list, tuple)):
      index = np.asarray(index)
    return np.asarray(self._arr.get(index)).astype(self.dtype, copy=False)

  def __array__(self, dtype=None, copy=None):
    out = self[slice(0, self.shape[0])]
    return out if dtype is None else out.astype(dtype, copy=False)

  def __repr__(self):
    return f"Rows({self._arr.file}, shape={self.shape}, {self._arr.dtype} → {self.dtype})"


class VectorSet:
  """An opened vector set (see the module docstring): shapes and dtypes checked, rows read on demand.

  Attributes:
    path: where it was opened from.
    num_rows: N, the rows of every field.
    what: how errors name it (e.g. "training vectors").
  """

  def __init__(self, path: str, arrays: Dict[str, _Array], fmt: str, what: str):
    self.path, self.what, self.format = path, what, fmt
    self._arrays = arrays
    self.num_rows = int(arrays["old"].shape[0]) if "old" in arrays else 0

  @property
  def fields(self) -> Tuple[str, ...]:
    """The fields present, in :data:`FIELDS` order."""
    return tuple(f for f in FIELDS if f in self._arrays)

  def has(self, field: str) -> bool:
    return field in self._arrays

  def _array(self, field: str) -> _Array:
    if field not in self._arrays:
      raise FCTError(_missing(self.what, self.path, field, self.fields))
    return self._arrays[field]

  def file(self, field: str) -> str:
    """The file (or zarr directory, or ``FILE.npz:member``) holding ``field``: what errors name."""
    return self._array(field).file

  def dim(self, field: str) -> int:
    """The width of a 2-D field (old, psi, new)."""
    a = self._array(field)
    if len(a.shape) != 2:
      raise FCTError(f"{self.what} {a.file}: {field!r} is 1-D; it has no width")
    return int(a.shape[1])

  def stored_dtype(self, field: str) -> np.dtype:
    return self._array(field).dtype

  def read(self, field: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of ``field``: float32 for old/psi/new (checked finite: the error names the file and
    the first bad row), int64 for label/id. May be a read-only view of a memory map."""
    a = self._array(field)
    if not 0 <= start <= stop <= self.num_rows:
      raise IndexError(f"rows [{start}, {stop}) out of range [0, {self.num_rows}) of {a.file}")
    raw = np.asarray(a.get(slice(start, stop)))
    if field in FLOAT_FIELDS:
      with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: refused just below
        x = raw.astype(np.float32, copy=False)
      _check_rows_finite(x, a, start, self.what)
      return x
    if raw.dtype == np.uint64 and raw.size and raw.max() > _INT64_MAX:
      row = start + int(np.argmax(raw > _INT64_MAX))
      raise FCTError(f"{self.what} {a.file}: {field!r} row {row} holds {raw[row - start]}, beyond int64")
    return raw.astype(np.int64, copy=False)

  def load(self, field: str, chunk_rows: int = CHUNK_ROWS) -> np.ndarray:
    """The whole field, checked as :meth:`read` does (and ids unique), float32 / int64, read in chunks."""
    a = self._array(field)
    out = np.empty(a.shape, np.float32 if field in FLOAT_FIELDS else np.int64)
    for start in range(0, self.num_rows, chunk_rows):
      stop = min(start + chunk_rows, self.num_rows)
      out[start:stop] = self.read(field, start, stop)
    if field == "id":
      check_unique_ids(out, a.file, self.what)
    return out

  def ids(self) -> np.ndarray:
    """The item ids: the ``id`` field (checked unique) or ``0..N-1``."""
    return self.load("id") if self.has("id") else np.arange(self.num_rows, dtype=np.int64)

  def rows(self, field: str) -> Rows:
    """A lazy view of ``field`` (see :class:`Rows`): for training from host memory or a memory map without
    loading the file."""
    return Rows(self._array(field), np.float32 if field in FLOAT_FIELDS else np.int64)

  def identity(self) -> dict:
    """A cheap identity of the stored bytes (path, format, each field's file, shape, dtype, size and mtime): what a
    resumable job records, so that a rerun on a changed file is a different job (the data is not hashed)."""
    return {"path": self.path, "format": self.format,
            "fields": {f: {"file": a.file, "shape": list(a.shape), "dtype": str(a.dtype), **a.stamp}
                       for f, a in self._arrays.items()}}

  def __repr__(self):
    return (f"VectorSet({self.path}, {self.num_rows} rows, "
            + ", ".join(f"{f}{list(a.shape[1:])}" for f, a in self._arrays.items()) + ")")


def _missing(what: str, path: str, field: str, have: Sequence[str]) -> str:
  return f"{what} {path} has no {field!r} (it has: {', '.join(have) or 'none of ' + ', '.join(FIELDS)})"


def _check_rows_finite(x: np.ndarray, a: _Array, start: int, what: str):
  if not np.isfinite(x).all():
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0]
    raise FCTError(f"{what} {a.file}: row {start + int(bad)} is not finite (NaN/Inf"
                   + (", or beyond float32's range)" if a.dtype == np.float64 else ")"))


def check_unique_ids(ids: np.ndarray, file: str, what: str = "vectors"):
  """One-line error naming a repeated id and two rows that hold it."""
  order = np.argsort(ids, kind="stable")
  s = ids[order]
  dup = np.flatnonzero(s[1:] == s[:-1])
  if len(dup):
    j = int(dup[0])
    raise FCTError(f"{what} {file}: id {int(s[j])} appears more than once (rows {int(order[j])} and "
                   f"{int(order[j + 1])}); ids must be unique")


def open_vectors(path: str, *, need: Sequence[str] = ("old",), what: str = "vectors") -> VectorSet:
  """Opens a vector set and checks its metadata at once (nothing is loaded).

  Checks: the path exists and is an ``.npz`` file or a directory of ``.npy`` files / zarr v2 arrays; every field
  in ``need`` is present; float fields are 2-D float16/32/64 or bfloat16, label and id 1-D integers; ``old`` has
  N ≥ 1 rows and every other field as many. Values are checked when read (finite floats; ids unique when loaded;
  :func:`check_finite` scans a whole set). Arrays with other names are ignored.

  Args:
    path: local path or any etils.epath URL (``gs://…``).
    need: fields that must be present (``old`` is needed by every use).
    what: how the one-line errors name the set (e.g. ``"training vectors"``).
  """
  path = str(path)
  p = epath.Path(path)
  if _is_local(path):
    path = os.path.abspath(path)
  try:
    exists, is_dir = p.exists(), p.is_dir()
  except OSError as e:
    raise FCTError(f"{what} {path} is unreadable ({type(e).__name__})") from e
  if not exists:
    raise FCTError(f"{what} {path} does not exist")
  if is_dir:
    arrays = _dir_arrays(path, what)
  elif path.endswith(".npy"):
    raise FCTError(f"{what} {path} is one .npy array; a vector set is a directory of <field>.npy files "
                   f"({', '.join(FIELDS)}) or an .npz file")
  else:
    arrays = _npz_arrays(path, what)
  for field in list(need) + ["old"]:
    if field not in FIELDS:
      raise ValueError(f"unknown field {field!r}; fields: {FIELDS}")
    if field not in arrays:
      raise FCTError(_missing(what, path, field, [f for f in FIELDS if f in arrays]))
  for name, a in arrays.items():
    _check_field(name, a, what)
  n = arrays["old"].shape[0]
  if n < 1:
    raise FCTError(f"{what} {arrays['old'].file} has no rows")
  for name, a in arrays.items():
    if a.shape[0] != n:
      raise FCTError(f"{what} {path}: {name!r} has {a.shape[0]} rows ({a.file}) but 'old' has {n} "
                     f"({arrays['old'].file})")
  return VectorSet(path, arrays, "+".join(sorted({a.fmt for a in arrays.values()})), what)


def check_same_widths(reference: VectorSet, other: VectorSet, fields: Sequence[str] = FLOAT_FIELDS):
  """One-line error when ``other`` (e.g. the evaluation vectors) has another width than ``reference`` (the
  training vectors) for a float field both hold: vectors of different models cannot be mixed."""
  for f in fields:
    if reference.has(f) and other.has(f) and reference.dim(f) != other.dim(f):
      raise FCTError(f"{other.what} {other.file(f)}: {f!r} is {other.dim(f)}-d but {reference.what} "
                     f"{reference.file(f)} has {reference.dim(f)}-d {f!r}")


def check_finite(vs: VectorSet, fields: Optional[Sequence[str]] = None, chunk_rows: int = CHUNK_ROWS):
  """Reads every row of the float fields (default: all present) and raises a one-line error naming the file and
  the first row that is NaN/Inf."""
  fields = [f for f in FLOAT_FIELDS if vs.has(f)] if fields is None else list(fields)
  for f in fields:
    for start in range(0, vs.num_rows, chunk_rows):
      vs.read(f, start, min(start + chunk_rows, vs.num_rows))


# ----------------------------------------------------------------------------------------------- writing


def _write_local_atomic(path: str, write: Callable):
  """``write(file object)`` to ``path`` through a temp file renamed over it (a killed writer leaves no torn file)."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_file(path: str, write: Callable):
  if _is_local(path):
    _write_local_atomic(path, write)
  else:
    with epath.Path(path).open("wb") as f:
      write(f)


def save_vectors(path: str, arrays: Mapping[str, np.ndarray], *, fmt: str = "", chunk_rows: int = CHUNK_ROWS):
  """Writes arrays (by field name) as a vector set that :func:`open_vectors` reads.

  Args:
    path: an ``.npz`` file, or a directory (created) for ``npy`` / ``zarr``; local or a bucket URL.
    arrays: the fields (any names are written; :func:`open_vectors` reads those of :data:`FIELDS`).
    fmt: ``npz`` | ``npy`` | ``zarr``; default: ``npz`` for a path ending in ``.npz``, else ``npy``.
    chunk_rows: rows per zarr chunk.

  Arrays are written as given (no cast). bfloat16 is refused for ``npz``/``npy`` (NumPy would write raw bytes that
  read back as void); use ``zarr`` or float16/float32.
  """
  path = str(path)
  fmt = fmt or ("npz" if path.endswith(".npz") else "npy")
  if fmt not in FORMATS:
    raise FCTError(f"unknown vector format {fmt!r}; valid: {', '.join(FORMATS)}")
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  if fmt != "zarr":
    for k, v in arrays.items():
      if v.dtype == _BF16:
        raise FCTError(f"cannot save {k!r} as bfloat16 in {fmt} ({path}): .npy has no bfloat16; use fmt='zarr' or "
                       "cast to float32")
  if fmt == "npz":
    if _is_local(path):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_file(path, lambda f: np.savez(f, **arrays))
    return
  epath.Path(path).mkdir(parents=True, exist_ok=True)
  for k, v in arrays.items():
    if fmt == "npy":
      _write_file(_join(path, f"{k}.npy"), lambda f, v=v: np.save(f, v, allow_pickle=False))
      continue
    dtype = "bfloat16" if v.dtype == _BF16 else v.dtype.str
    rows = max(1, min(chunk_rows, v.shape[0] if v.ndim else 1))
    spec = {"driver": "zarr", "kvstore": _kvstore(_join(path, k)),
            "metadata": {"shape": list(v.shape), "chunks": [rows] + list(v.shape[1:]), "dtype": dtype,
                         "compressor": None}}
    try:
      t = ts.open(spec, create=True, delete_existing=True).result()
      t.write(v).result()
    except Exception as e:
      raise FCTError(f"cannot write {k!r} ({v.dtype}, {v.shape}) as zarr to {path}: "
                     f"{str(e).splitlines()[0][:160]}") from e


# ----------------------------------------------------------------------------------------------- classifier


def open_classifier(path: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
  """A linear classifier ``logits = x @ kernel (+ bias)`` stored as ``.npy`` (the ``[d, C]`` kernel) or ``.npz``
  (``kernel`` and an optional ``bias`` [C]): ``(kernel, bias or None)`` as float32, checked (shapes, real float
  dtypes, finite), one-line errors naming the file."""
  path = str(path)
  what = "classifier"
  if not epath.Path(path).exists():
    raise FCTError(f"{what} {path} does not exist")
  try:
    with epath.Path(path).open("rb") as f:
      data = np.load(f, allow_pickle=False)
      if isinstance(data, np.lib.npyio.NpzFile):
        if "kernel" not in data.files:
          raise FCTError(f"{what} {path} has no 'kernel' array (it has: {', '.join(data.files) or 'nothing'})")
        kernel, bias = data["kernel"], (data["bias"] if "bias" in data.files else None)
      else:
        kernel, bias = data, None
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise FCTError(f"{what} {path} is not a readable .npy/.npz file ({type(e).__name__}: {str(e)[:120]})") from e
  out = []
  for name, x, rank in (("kernel", kernel, 2), ("bias", bias, 1)):
    if x is None:
      out.append(None)
      continue
    if _kind(x.dtype) != "float":
      raise FCTError(f"{what} {path}: {name} must be float16/float32/float64, not {_describe(x.dtype)}")
    if x.ndim != rank or min(x.shape) < 1:
      raise FCTError(f"{what} {path}: {name} has shape {x.shape}; expected {'[d, C]' if rank == 2 else '[C]'}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
      raise FCTError(f"{what} {path}: {name} holds NaN/Inf")
    out.append(x)
  kernel, bias = out
  if bias is not None and bias.shape[0] != kernel.shape[1]:
    raise FCTError(f"{what} {path}: bias has {bias.shape[0]} entries but the kernel {kernel.shape} has "
                   f"{kernel.shape[1]} classes")
  return kernel, bias
