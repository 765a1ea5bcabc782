"""Random-access data sources and the dataset registry.

A source is anything with ``__len__`` and ``__getitem__(i) -> dict of numpy arrays`` (what grain's
``MapDataset.source`` reads). ``get_source(data_config, split)`` returns ``(source, info)`` where ``info`` holds
``num_classes`` and ``num_examples`` (after any class filtering, so that epochs and schedules are right).

Datasets: ``shapes`` (embedded demo), ``digits`` (scikit-learn's bundled digits), and the paper's datasets read
from TFDS array_record files (:data:`TFDS_DATASETS`: ``imagenet2012``, ``places365``, ``vggface2``,
``cifar100``), whose splits are ``old_train`` (the first ``old_classes`` classes), ``new_train`` (all classes),
``train_<K>`` (the first K classes, for update sequences) and ``eval``. ``get_image_spec(data_config)`` is how
the dataset's images become network inputs (normalisation and resize method; see :mod:`fct_jax.data.image_spec`).

ml-fct: its old model's classifier is as wide as the *new* class count (e.g. 1000 logits, 500 of them never a
target); ours has ``SplitInfo.num_classes`` = the classes of the training split (500). Only label smoothing's
uniform part differs (spread over 500 rather than 1000 classes).
"""

import dataclasses
import functools
import re
from typing import Callable, Dict, Mapping, Tuple

import numpy as np

from fct_jax import config_schema
from fct_jax.data import image_spec, shapes, tfds_source
from fct_jax.errors import FCTError


class ArraySource:
  """A source over in-memory arrays of equal length: element i is ``{k: arrays[k][i]}``."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise FCTError(f"arrays of different lengths: {lengths}")
    self.arrays = dict(arrays)
    self._n = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i):
    return {k: v[i] for k, v in self.arrays.items()}

  def __repr__(self):
    return f"ArraySource(n={self._n}, keys={sorted(self.arrays)})"


@dataclasses.dataclass(frozen=True)
class SplitInfo:
  num_examples: int
  num_classes: int
  image_size: int


def _shapes_source(cfg, split: str) -> Tuple[ArraySource, SplitInfo]:
  sizes = {"old_train": cfg.num_old_train, "new_train": cfg.num_new_train, "eval": cfg.num_eval}
  m = TRAIN_K.match(split)
  if m:
    # Update sequences (v1 → v2 → v3): the new_train images of the first K shapes, labelled (shape, colour); the
    # labels are those of new_train, so class ids nest across versions like ImageNet's first-K-classes subsets.
    k = int(m.group(1))
    if not 1 <= k <= len(shapes.SHAPES):
      raise FCTError(f"split {split!r}: K must be in [1, {len(shapes.SHAPES)}] shapes")
    full = shapes.make_split("new_train", num_examples=int(cfg.num_new_train), seed=int(cfg.seed),
                             image_size=int(cfg.image_size), num_old_shapes=int(cfg.num_old_shapes))
    keep = full["shape"] < k
    src = ArraySource({key: v[keep] for key, v in full.items()})
    return src, SplitInfo(len(src), k * len(shapes.COLOURS), int(cfg.image_size))
  if split not in sizes:
    raise FCTError(f"unknown split {split!r} for dataset 'shapes'; valid: {', '.join(sizes)}, train_<K> (the "
                   "first K shapes of new_train)")
  arrays = shapes.make_split(split, num_examples=int(sizes[split]), seed=int(cfg.seed),
                             image_size=int(cfg.image_size), num_old_shapes=int(cfg.num_old_shapes))
  src = ArraySource(arrays)
  return src, SplitInfo(len(src), shapes.num_classes(split), int(cfg.image_size))


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """A paper dataset prepared with TFDS, and its old/new class split.

  Attributes:
    tfds_name: TFDS registered name (``data.tfds_name`` overrides it, e.g. to pin a version ``name:x.y.z``).
    train_split, eval_split: TFDS split names for training and for the retrieval evaluation (query = gallery).
    num_classes: classes of the full ("new") training set.
    old_classes: the old model's training classes: labels ``< old_classes`` (the paper's "first K classes").
    image_size: network input side after augmentation.
    keys: fields kept from each record.
    decode_images: decode in the source (small images); otherwise the transform decodes the encoded bytes.
  """
  tfds_name: str
  train_split: str
  eval_split: str
  num_classes: int
  old_classes: int
  image_size: int
  keys: Tuple[str, ...] = ("image", "label")
  decode_images: bool = False


# TFDS label order is the order ml-fct's ImageFolder sees (sorted synsets / sorted category names), so "the first
# K classes" selects the same classes as the paper.
TFDS_DATASETS: Dict[str, TfdsDataset] = {
    # ImageNet-500 → ImageNet-1k (sequence: train_250 → train_500 → new_train); eval: the 50k validation images.
    "imagenet2012": TfdsDataset("imagenet2012", "train", "validation", 1000, 500, 224),
    # Places-182 → Places-365 (256×256 "small" images); eval: the 36.5k validation images.
    "places365": TfdsDataset("places365_small", "train", "validation", 365, 182, 224),
    # VGGFace2-863 → VGGFace2-8631 (first 10% of the sorted subject ids); eval: 50 fixed random images of each
    # of the 500 test ("validation" in the paper) subjects, whose labels are 8631..9130 (see vggface2_builder).
    # (The 50 is the data block's default ``eval_per_class``: fct_jax/config_schema.py.)
    "vggface2": TfdsDataset("vggface2", "train", "test", 8631, 863, 224, keys=("image", "label", "bbox")),
    # ml-fct's quick start: CIFAR-50 → CIFAR-100; eval: the 10k test images.
    # ml-fct: its ImageFolder sorts class folders as strings ("0", "1", "10", ...), so its "first 50 classes" are
    # {0..5, 10..53}; we take labels 0..49, the paper's meaning.
    "cifar100": TfdsDataset("cifar100", "train", "test", 100, 50, 32, decode_images=True),
}

# A split of the first K classes (shapes: of the first K shapes) of new_train.
TRAIN_K = re.compile(r"^train_(\d+)$")


_REPORTED = set()
_TFDS_SPLITS = "old_train, new_train, train_<K> (first K classes), eval"


def _tfds_source(name: str, cfg, split: str) -> Tuple[tfds_source.TfdsSource, SplitInfo]:
  """A paper dataset's split: ``old_train`` / ``new_train`` / ``train_<K>`` / ``eval`` (see :class:`TfdsDataset`).

  Config fields (``data.*``): ``data_dir`` (TFDS data_dir, local or gs://; "" = TFDS default), ``tfds_name``,
  ``old_classes``, ``image_size``, ``eval_per_class``, ``eval_subsample_seed``, ``label_cache_dir`` and
  ``mock_num_examples`` (> 0: ``tfds.testing.mock_data`` with that many random examples per split, for
  ``runlocal``).
  """
  spec = TFDS_DATASETS[name]
  tfds_name = cfg.tfds_name or spec.tfds_name
  data_dir = cfg.data_dir
  mock = int(cfg.mock_num_examples)
  image_size = int(cfg.image_size or spec.image_size)
  m = TRAIN_K.match(split)
  if split == "eval":
    tfds_split, k = spec.eval_split, None
  elif split in ("old_train", "new_train") or m:
    tfds_split = spec.train_split
    k = (int(cfg.old_classes or spec.old_classes) if split == "old_train"
         else int(m.group(1)) if m else spec.num_classes)
    if not 0 < k <= spec.num_classes:
      raise FCTError(f"split {split!r} of {name!r} asks for {k} classes; the dataset has {spec.num_classes}")
  else:
    raise FCTError(f"unknown split {split!r} for dataset {name!r}; valid: {_TFDS_SPLITS}")

  with tfds_source.maybe_mock(mock):
    ds = tfds_source.open_split(tfds_name, tfds_split, data_dir)
  per_class = int(cfg.eval_per_class) if k is None else 0
  # Mock labels are uniform over the ClassLabel's range, so filter even where real data needs no filtering.
  # Evaluation always needs its labels (query/gallery matches): read them through the cache too.
  needs_labels = k is None or k < spec.num_classes or bool(mock)
  labels = indices = None
  if needs_labels:
    labels = tfds_source.cached_labels(ds, tfds_name=tfds_name, split=tfds_split, data_dir=data_dir,
                                       cache_dir=cfg.label_cache_dir, use_cache=not mock)
    if k is not None:
      indices = tfds_source.first_classes(labels, k)
    elif per_class > 0:
      indices = tfds_source.per_class_subsample(labels, per_class, int(cfg.eval_subsample_seed))
  src = tfds_source.TfdsSource(ds, indices=indices, labels=labels, keys=spec.keys, name=f"{tfds_name}:{split}",
                                 decode_images=spec.decode_images)
  if k is None:
    k = len(np.unique(src.arrays["label"]))
  line = (f"[data] {name} {split}: {len(src)} examples, {k} classes (tfds {tfds_name} {tfds_split}"
          f"{', mock' if mock else ''}{', data_dir=' + data_dir if data_dir else ''})")
  if line not in _REPORTED:  # stages reopen sources (e.g. for an upstream model's class count): report once
    _REPORTED.add(line)
    print(line, flush=True)
  return src, SplitInfo(len(src), int(k), image_size)


def _digits_source(cfg, split: str) -> Tuple[ArraySource, SplitInfo]:
  """scikit-learn's bundled handwritten digits (1,797 8×8 images; no download): a real-image quick run.

  A fixed permutation (``cfg.seed``) holds out ``cfg.num_eval`` images for evaluation; ``old_train`` keeps the
  digits ``< cfg.old_classes`` of the rest, ``new_train`` all ten. Images are upsampled (nearest) to
  ``cfg.image_size`` and replicated to 3 channels, uint8.
  """
  try:
    from sklearn import datasets as skd  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise FCTError("dataset 'digits' needs scikit-learn: pip install scikit-learn (the fct_jax[digits] extra)") from e
  valid = ("old_train", "new_train", "eval")
  if split not in valid:
    raise FCTError(f"unknown split {split!r} for dataset 'digits'; valid: {', '.join(valid)}")
  d = skd.load_digits()
  images, labels = d.images, d.target.astype(np.int32)
  perm = np.random.default_rng(int(cfg.seed)).permutation(len(labels))
  n_eval = int(cfg.num_eval)
  idx = perm[len(perm) - n_eval:] if split == "eval" else perm[:len(perm) - n_eval]
  idx = np.sort(idx)
  if split == "old_train":
    idx = idx[labels[idx] < int(cfg.old_classes)]
  size = int(cfg.image_size)
  rep = -(-size // 8)
  img = np.round(images[idx] * (255.0 / 16.0)).astype(np.uint8)
  img = np.repeat(np.repeat(img, rep, axis=1), rep, axis=2)[:, :size, :size]
  src = ArraySource({"image": np.repeat(img[..., None], 3, axis=-1), "label": labels[idx]})
  k = int(cfg.old_classes) if split == "old_train" else 10
  return src, SplitInfo(len(src), k, size)


DATASETS: Dict[str, Callable] = {
    "shapes": _shapes_source,
    "digits": _digits_source,
    **{name: functools.partial(_tfds_source, name) for name in TFDS_DATASETS},
}


# Each dataset's input convention: the tiny in-memory arrays resize in numpy, the paper's photos with PIL.
IMAGE_SPECS: Dict[str, image_spec.ImageSpec] = {
    "shapes": image_spec.SMALL_ARRAYS,
    "digits": image_spec.SMALL_ARRAYS,
    **dict.fromkeys(TFDS_DATASETS, image_spec.PHOTOS),
}


def get_image_spec(data_cfg) -> image_spec.ImageSpec:
  """The :class:`~fct_jax.data.image_spec.ImageSpec` of ``data_cfg.name``: what every transform of its images uses."""
  name = data_cfg["name"]
  if name not in IMAGE_SPECS:
    raise FCTError(f"unknown dataset {name!r}; valid: {', '.join(sorted(IMAGE_SPECS))}")
  return IMAGE_SPECS[name]


def get_source(data_cfg, split: str):
  """Returns ``(source, SplitInfo)`` for ``data_cfg.name``; unknown names raise listing the valid ones.

  The data block is resolved against its dataset's schema first (``config_schema.resolve_data``: every field
  present, with the defaults written there), so a hand-made block works like a stage config's.
  """
  name = data_cfg["name"]
  if name not in DATASETS:
    raise FCTError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
  src, info = DATASETS[name](config_schema.resolve_data(data_cfg), split)
  if info.num_examples == 0:
    raise FCTError(f"dataset {name!r} split {split!r} is empty")
  return src, info


class AugmentedViews:
  """Random-access source of ``views`` augmented copies of every example: index ``k·N + i`` is view k of image i.

  Each view's randomness is a fixed function of (seed, k, i), so a recomputation gives the same features.
  """

  def __init__(self, source, transform: Callable, views: int, seed: int):
    self.source, self.transform, self.views, self.seed = source, transform, int(views), int(seed)

  def __len__(self):
    return self.views * len(self.source)

  def __getitem__(self, j):
    k, i = divmod(int(j), len(self.source))
    return self.transform(self.source[i], np.random.default_rng([self.seed, k, i]))
