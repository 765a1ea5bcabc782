r"""A longer update sequence on CIFAR-100: v1 → v2 → … → vN, each version trained on more classes.

The paper's §4.4 mentions "a longer sequence of small updates using subsets of the CIFAR-100 dataset" in its
appendix, which we do not have: the number of versions, the class steps and the recipe here are ours. Version i
of N (``versions=N``, default 5, at least 3) trains on the first ⌊100·i/N⌋ classes (``train_<K>``; the last on all
100, ``new_train``): for N = 5, 20 → 40 → 60 → 80 → 100 classes. Each v_i is a ResNet50-128 with ml-fct's CIFAR-100
quick-start recipe (images resized to 224 with a flip, the backbone recipe of configs/recipes.py, 100 epochs);
v1..v{N-1} each get a SimCLR ResNet50-128 side-information model on their own training images (no labels; the
recipe of configs/imagenet_sequence.py); every update gets an h with ψ and one without, every intermediate version
a g that carries ψ forward, plus the direct h from v1 to vN (see ``configs/common.sequence_stages``). The
evaluation uses the 10,000 test images as query and gallery; its rows include the v1 gallery upgraded hop by hop
to every later version (``v4/h4(h3(h2(v1)))``, …), with and without side-information: the paper's point is that
without ψ the chained upgrades fall behind.

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
  if a.runlocal:
    data = recipes.tfds_data("cifar100", a, mock_num_examples=64, image_size=32)
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8), "stem_stride": 2})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16})
    train = lambda opt, epochs: common.train(batch_size=8, epochs=1, steps=2, optimizer_cfg=opt, log_every_steps=1,
                                             checkpoint_every_steps=2)
    side_kw = dict(projection_hidden_dim=16, projection_dim=8, views={"out_size": 32})
    train_augment, eval_augment, eval_bs = "pad_crop_flip", "default", 16
  else:
    data = recipes.tfds_data("cifar100", a, image_size=224)
    model = ml_collections.ConfigDict({"name": "resnet50", "embedding_dim": 128, "last_nonlin": True})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 2048})
    train = lambda opt, epochs: common.train(batch_size=recipes.BATCH, epochs=epochs, optimizer_cfg=opt,
                                             log_every_steps=100, checkpoint_every_steps=1000)
    side_kw = dict(projection_hidden_dim=2048, projection_dim=128, views={"out_size": 224})
    train_augment, eval_augment, eval_bs = "resize_flip_224", "resize_224", 1024
  stages = common.sequence_stages(
      data=data, splits=splits, backbone_model=model, side_model=model, h_model=h_model,
      backbone_train=lambda i: train(recipes.backbone_sgd(), 100),
      side_train=lambda i: train(recipes.simclr_lars(), 100),
      h_train=lambda name: train(recipes.transformation_adam(), 80),
      backbone_kwargs=dict(augment=train_augment), side_kwargs=dict(temperature=0.1, **side_kw),
      h_kwargs=dict(augment=train_augment, feature_mode="online"), eval_batch_size=eval_bs)
  for s in stages:
    s.eval_augment = eval_augment  # how every stage embeds evaluation images (common.eval_transform)
  return common.experiment(f"cifar100_sequence{n}", stages, a.stage)
