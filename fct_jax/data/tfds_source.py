"""TFDS array_record splits as random-access sources, with class subsets and cached label indexes.

Reading goes through ``tfds.data_source`` (array_record files; no tf.data, no TensorFlow). Records are
deserialised here with the image left *encoded* (JPEG/PNG bytes), so that the augmentation, running in grain
workers, can decode at reduced resolution (PIL draft mode) when it is about to shrink the image anyway.

Class subsets ("the first K classes") need every example's label. Those are read once per (dataset, version,
split, data_dir) without decoding images — only the serialised proto is parsed — and cached as a ``.npy`` file in
``label_cache_dir`` (default ``~/.cache/fct_jax/labels``; a ``gs://`` path shares it between the hosts of a pod),
so later runs, and the other stages of an experiment, start instantly. ImageNet's training split takes one pass
over its ~140 GB (a few minutes on a local SSD, multi-threaded).

Under ``tfds.testing.mock_data`` (tests and the configs' ``runlocal`` forms, which set ``data.mock_num_examples``)
the reader yields already-decoded examples with random labels; everything else is the same code path.
"""

import concurrent.futures
import contextlib
import hashlib
import os
import threading
import unittest.mock
from typing import Optional, Sequence

import numpy as np
from etils import epath

from fct_jax.errors import FCTError

# How each dataset must be prepared; printed when it is missing. ``manual``: where the user puts the archives.
PREPARE_HINTS = {
    "imagenet2012": "needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/",
    "places365_small": "downloads ~25 GB from places2.csail.mit.edu",
    "cifar100": "downloads ~160 MB",
    "vggface2": "needs the extracted VGGFace2 archives, downloaded by hand after registering",
}
_CHUNK = 1024


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def build_command(tfds_name: str, data_dir: str) -> str:
  """The ``tfds build`` command that prepares ``tfds_name`` as array_record in ``data_dir``."""
  base = tfds_name.split(":")[0].split("/")[0]
  if base == "vggface2":  # not in the TFDS catalogue: our builder, runnable without TensorFlow
    return (f"python -m fct_jax.data.vggface2_builder --data_dir={data_dir or '~/tensorflow_datasets'} "
            "--manual_dir=<dir with train/ test/ bb_landmark/>")
  dd = f" --data_dir={data_dir}" if data_dir else ""
  return f"tfds build {tfds_name}{dd} --file_format=array_record"


def _not_found(tfds_name: str, data_dir: str, detail: str) -> FCTError:
  where = data_dir or "the TFDS default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  base = tfds_name.split(":")[0].split("/")[0]
  hint = PREPARE_HINTS.get(base, "")
  return FCTError(f"dataset {tfds_name!r} is not prepared as array_record in {where} ({detail}); prepare it with: "
                  f"{build_command(tfds_name, data_dir)}" + (f" ({hint})" if hint else ""))


def open_split(tfds_name: str, split: str, data_dir: str = ""):
  """``tfds.data_source(tfds_name, split=split)`` read from ``data_dir`` only (never downloads).

  Raises:
    FCTError: the dataset is missing, unfinished or prepared in a format without random access; the message
      names the ``tfds build`` command to run.
  """
  tfds = _tfds()
  if tfds_name.split(":")[0].split("/")[0] == "vggface2":
    from fct_jax.data import vggface2_builder  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  try:
    return tfds.data_source(tfds_name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except
    # tfds reports a missing dataset in several ways (DatasetNotFoundError, AssertionError, or a
    # NotImplementedError about the TFRECORD format when no files exist); classify by what is on disk.
    detail = _diagnose(tfds, tfds_name, data_dir) or f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    raise _not_found(tfds_name, data_dir, detail) from e


def _diagnose(tfds, tfds_name: str, data_dir: str) -> Optional[str]:
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    return f"unknown TFDS name: {str(e).splitlines()[0][:120]}"
  path = builder.data_path
  if not (path / "dataset_info.json").exists():
    return f"nothing at {path}"
  fmt = getattr(builder.info, "file_format", None)
  fmt = getattr(fmt, "value", fmt)
  if fmt and fmt != "array_record":
    return f"found {fmt} files at {path}; random access needs array_record"
  return None


def _decode_record(rec, features, decoders):
  """One record → dict of numpy values; the image (if any) stays encoded bytes.

  A real array_record reader yields serialised bytes; ``tfds.testing.mock_data``'s reader yields decoded dicts.
  """
  if isinstance(rec, dict):
    return rec
  return features.deserialize_example_np(rec, decoders=decoders)


def _skip_image_decoders(features):
  tfds = _tfds()
  return {k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, tfds.features.Image)}


def read_labels(ds, key: str = "label", num_threads: int = 8) -> np.ndarray:
  """All labels of a TFDS data source, in record order, without decoding images.

  Args:
    ds: a ``tfds.data_source`` split.
    key: the label feature.
    num_threads: parallel readers (array_record reads release the GIL).
  Returns:
    int64 [len(ds)].
  """
  features = ds.dataset_info.features
  # Skip decoding of every feature that is not needed: only `key` is kept from each parsed record.
  decoders = {k: _tfds().decode.SkipDecoding() for k in features.keys() if k != key}
  reader = ds.data_source
  n = len(ds)

  def chunk(start):
    keys = list(range(start, min(n, start + _CHUNK)))
    # mock_data's reader has a broken __getitems__ (an unbound partial); real readers batch the reads.
    batched = hasattr(reader, "__getitems__") and not isinstance(reader, unittest.mock.NonCallableMock)
    recs = reader.__getitems__(keys) if batched else [reader[i] for i in keys]
    return [int(_decode_record(r, features, decoders)[key]) for r in recs]

  out = np.zeros((n,), np.int64)
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for start, labels in zip(range(0, n, _CHUNK), pool.map(chunk, range(0, n, _CHUNK))):
      out[start:start + len(labels)] = labels
  return out


def default_label_cache_dir() -> str:
  return os.environ.get("FCT_JAX_LABEL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "fct_jax", "labels"))


def cached_labels(ds, *, tfds_name: str, split: str, data_dir: str, cache_dir: str = "", key: str = "label",
                  use_cache: bool = True) -> np.ndarray:
  """:func:`read_labels`, memoised in ``cache_dir`` (local or gs://) keyed by dataset, version, split, data_dir."""
  if not use_cache:
    return read_labels(ds, key)
  info = ds.dataset_info
  where = os.path.abspath(data_dir) if data_dir and "://" not in data_dir else data_dir
  ident = f"{tfds_name}|{info.version}|{split}|{where}|{len(ds)}"
  digest = hashlib.sha1(ident.encode()).hexdigest()[:12]
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{info.name}-{info.version}-{split}")
  path = epath.Path(cache_dir or default_label_cache_dir()) / f"{safe}-{key}-{digest}.npy"
  if path.exists():
    with path.open("rb") as f:
      labels = np.load(f)
    if len(labels) == len(ds):
      return labels
  labels = read_labels(ds, key)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    with tmp.open("wb") as f:
      np.save(f, labels)
    tmp.rename(path)  # atomic on local disks: a concurrent reader never sees a partial file
  except OSError:
    pass  # a read-only cache location only costs a re-read next time
  return labels


class TfdsSource:
  """Random-access view of a TFDS split, optionally restricted to ``indices`` (a class subset or subsample).

  Element ``i`` is ``{"image": encoded bytes, "label": int32, ...}`` for record ``indices[i]``; the image is a
  uint8 [H, W, 3] array instead with ``decode_images`` or under ``tfds.testing.mock_data``. ``arrays`` holds the
  fields known without decoding (``label``) so that evaluation reads labels from the cached index, not images.
  """

  def __init__(self, ds, *, indices: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
               keys: Sequence[str] = ("image", "label"), name: str = "", decode_images: bool = False):
    self.ds = ds
    self.indices = None if indices is None else np.asarray(indices, np.int64)
    self._labels = labels  # labels of *all* records of the split, or None (read lazily)
    self.keys = tuple(keys)
    self.name = name
    self._features = ds.dataset_info.features
    # Small images (CIFAR) are decoded here; large ones stay encoded for reduced-size decoding in the transform.
    self._decoders = None if decode_images else _skip_image_decoders(self._features)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.ds) if self.indices is None else len(self.indices)

  def _record(self, i: int) -> int:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(i)
    return i if self.indices is None else int(self.indices[i])

  def __getitem__(self, i):
    ex = _decode_record(self.ds.data_source[self._record(i)], self._features, self._decoders)
    out = {k: ex[k] for k in self.keys if k in ex}
    if "label" in out:
      out["label"] = np.int32(out["label"])
    return out

  @property
  def arrays(self):
    """``{"label": int32 [len(self)]}``, from the label index (read once, without decoding images)."""
    with self._lock:
      if self._labels is None:
        self._labels = read_labels(self.ds)
    labels = self._labels if self.indices is None else self._labels[self.indices]
    return {"label": labels.astype(np.int32)}

  def __repr__(self):
    return f"TfdsSource({self.name}, n={len(self)})"


def first_classes(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Indices of the records whose label is one of the first ``num_classes`` classes, in record order."""
  return np.flatnonzero(np.asarray(labels) < num_classes)


def per_class_subsample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
  """A fixed random subsample of ``per_class`` records of every class (all of a smaller class), sorted.

  Deterministic in (labels, per_class, seed): classes are visited in label order with one generator, so the
  subsample is the same on every host and every run (the VGGFace2 evaluation protocol: 50 images per subject).
  """
  rng = np.random.default_rng(seed)
  labels = np.asarray(labels)
  order = np.argsort(labels, kind="stable")
  classes, starts = np.unique(labels[order], return_index=True)
  ends = np.append(starts[1:], len(order))
  picked = []
  for s, e in zip(starts, ends):
    members = order[s:e]
    picked.append(members if len(members) <= per_class else rng.choice(members, per_class, replace=False))
  return np.sort(np.concatenate(picked)) if picked else np.zeros((0,), np.int64)


@contextlib.contextmanager
def maybe_mock(num_examples: int):
  """``tfds.testing.mock_data(num_examples)`` when ``num_examples > 0`` (runlocal configs), else nothing."""
  if num_examples and int(num_examples) > 0:
    tfds = _tfds()
    with tfds.testing.mock_data(num_examples=int(num_examples), policy=tfds.testing.MockPolicy.USE_CODE):
      yield True
  else:
    yield False
