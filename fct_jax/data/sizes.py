"""Split sizes known without reading a dataset (for a dry run: the plan's steps per epoch before any data exists).

The shapes demo's sizes are config fields; digits' come from scikit-learn's bundled labels (a 14 KB array, no
images); TFDS datasets use :data:`KNOWN_SPLIT_SIZES` / :data:`KNOWN_FIRST_CLASSES`; ``runlocal``'s mock data has
``mock_num_examples`` per split with random labels, so a class subset keeps about its share.
"""

from typing import Optional, Tuple

import numpy as np

from fct_jax import config_schema
from fct_jax.data import shapes, sources, vectors
from fct_jax.errors import FCTError

# TFDS split sizes of the prepared datasets, and the class-filtered counts we know (ImageNet's first 500 classes,
# counted once; CIFAR-100 has 500 training images per class). Anything else is counted from the label index when
# the data is prepared, so a dry run cannot know it.
KNOWN_SPLIT_SIZES = {
    ("imagenet2012", "train"): 1_281_167, ("imagenet2012", "validation"): 50_000,
    ("places365_small", "train"): 1_803_460, ("places365_small", "validation"): 36_500,
    ("cifar100", "train"): 50_000, ("cifar100", "test"): 10_000,
    ("vggface2", "train"): 3_141_890, ("vggface2", "test"): 169_396,  # the VGGFace2 release (8631 / 500 subjects)
}
KNOWN_FIRST_CLASSES = {("imagenet2012", 500): 640_542, **{("cifar100", k): 500 * k for k in range(1, 101)}}
UNKNOWN = "unknown (not prepared)"

Size = Tuple[Optional[int], str]


def split_size(data_cfg, split: str) -> Size:
  """``(num_examples or None, note)`` of a split, from the config and known sizes only: no data is read."""
  name = data_cfg["name"]
  if name in config_schema.DATA:
    data_cfg = config_schema.resolve_data(data_cfg)
  if name == "shapes":
    return _shapes_size(data_cfg, split)
  if name == "digits":
    return _digits_size(data_cfg, split)
  if name == "vectors":  # a vector set's header (its row count), not its rows
    path = data_cfg[split] if split in data_cfg else ""
    if not path:
      return None, f"no vector set for split {split!r}"
    try:
      return vectors.open_vectors(path).num_rows, "vector file"
    except FCTError as e:
      return None, str(e)
  if name not in sources.TFDS_DATASETS:
    return None, f"unknown dataset {name!r}"
  return _tfds_size(name, data_cfg, split)


def _shapes_size(data_cfg, split: str) -> Size:
  fields = {"old_train": "num_old_train", "new_train": "num_new_train", "eval": "num_eval"}
  if split in fields:
    return int(data_cfg[fields[split]]), "config"
  m = sources.TRAIN_K.match(split)
  if m:  # the first K shapes of new_train
    pairs = shapes.balanced_pairs(int(data_cfg["num_new_train"]), len(shapes.SHAPES))
    return int((pairs // len(shapes.COLOURS) < int(m.group(1))).sum()), "config"
  return None, f"unknown split {split!r}"


def _digits_size(data_cfg, split: str) -> Size:
  try:
    from sklearn import datasets as skd  # pylint: disable=g-import-not-at-top  (optional dependency)
  except ImportError:
    return None, "unknown (needs scikit-learn)"
  labels = skd.load_digits().target
  n_eval = int(data_cfg.num_eval)
  if split == "eval":
    return n_eval, "scikit-learn digits"
  perm = np.random.default_rng(int(data_cfg.seed)).permutation(len(labels))
  rest = labels[perm[:len(perm) - n_eval]]
  k = int(data_cfg.old_classes) if split == "old_train" else 10
  return int((rest < k).sum()), "scikit-learn digits"


def _tfds_size(name: str, data_cfg, split: str) -> Size:
  spec = sources.TFDS_DATASETS[name]
  tfds_name = (data_cfg.tfds_name or spec.tfds_name).split(":")[0]
  m = sources.TRAIN_K.match(split)
  if split == "eval":
    k = None
  elif split in ("old_train", "new_train") or m:
    k = (int(data_cfg.old_classes or spec.old_classes) if split == "old_train"
         else int(m.group(1)) if m else spec.num_classes)
  else:
    return None, f"unknown split {split!r}"
  mock = int(data_cfg.mock_num_examples)
  if mock:
    # Mock labels are uniform over all classes: a subset of k classes keeps about k/num_classes of them.
    share = 1.0 if k is None else k / spec.num_classes
    return max(1, round(mock * share)), "mock data, random labels: approximate"
  if k is None:
    total = KNOWN_SPLIT_SIZES.get((tfds_name, spec.eval_split))
    per_class = int(data_cfg.eval_per_class)
    if per_class and total is not None:
      # Every VGGFace2 test subject has more than 50 images, so the subsample is exactly 50 per subject.
      return 500 * per_class if name == "vggface2" else None, f"{per_class} per class of tfds {spec.eval_split}"
    return total, f"tfds {tfds_name} {spec.eval_split}" if total else UNKNOWN
  if k == spec.num_classes:
    total = KNOWN_SPLIT_SIZES.get((tfds_name, spec.train_split))
    return total, f"tfds {tfds_name} {spec.train_split}" if total else UNKNOWN
  n = KNOWN_FIRST_CLASSES.get((tfds_name, k))
  return n, f"first {k} classes of tfds {tfds_name} {spec.train_split}" if n else UNKNOWN
