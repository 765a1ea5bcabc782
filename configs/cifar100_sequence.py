r"""A longer update sequence on CIFAR-100: v1 → v2 → … → vN, each version trained on more classes.

The paper's §4.4 mentions "a longer sequence of small updates using subsets of the CIFAR-100 dataset" in its
appendix, which we do not have: the number of versions, the class steps and the recipe here are ours. Version i of
N (``versions=N``, default 5, at least 3) trains on the first ⌊100·i/N⌋ classes (``train_<K>``; the last on all
100, ``new_train``): for N = 5, 20 → 40 → 60 → 80 → 100 classes. Each v_i is a ResNet50-128 with ml-fct's CIFAR-100
quick-start recipe (images resized to 224 with a flip, the backbone recipe of configs/recipes.py, 100 epochs);
v1..v{N-1} each get a SimCLR ResNet50-128 side-information model on their own training images (no labels;
``recipes.paper_sequence``, as configs/imagenet_sequence.py); every update gets an h with ψ and one without, every
intermediate version a g that carries ψ forward, plus the direct h from v1 to vN (see
``configs/common.sequence_stages``). The evaluation uses the 10,000 test images as query and gallery; its rows
include the v1 gallery upgraded hop by hop to every later version (``v4/h4(h3(h2(v1)))``, …), with and without
side-information: the paper's point is that without ψ the chained upgrades fall behind.

  tfds build cifar100 --data_dir=$DATA --file_format=array_record
  python -m fct_jax.main --config=configs/cifar100_sequence.py:data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100_sequence.py:versions=10,data_dir=$DATA --workdir=$WD2

Tiny form on ``tfds.testing.mock_data``: ``--config=configs/cifar100_sequence.py:runlocal`` (native 32×32).
"""

import ml_collections

from configs import common, recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage="", runlocal=False, data_dir="", label_cache_dir="", versions=5)
  n = int(a.versions)
  if n < 3:
    raise ValueError(f"versions={n}: an update sequence needs at least 3 versions")
  if n > 100:
    raise ValueError(f"versions={n}: CIFAR-100 has 100 classes, so at most 100 versions")
  splits = tuple(f"train_{100 * i // n}" for i in range(1, n)) + ("new_train",)
  return recipes.paper_sequence(
      f"cifar100_sequence{n}", a, splits=splits, data=recipes.tfds_data("cifar100", a, image_size=224),
      runlocal_data=recipes.tfds_data("cifar100", a, mock_num_examples=128, image_size=32),
      train_augment="resize_flip_224", eval_augment="resize_224",
      runlocal_train_augment="pad_crop_flip", runlocal_eval_augment="default")
