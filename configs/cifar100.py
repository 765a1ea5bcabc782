r"""CIFAR-50 → CIFAR-100, ml-fct's quick start: ResNet50-128 old and new, the reference recipe.

Prepare the data once (TFDS downloads ~160 MB):

  tfds build cifar100 --data_dir=$DATA --file_format=array_record

Then, in order:

  python -m fct_jax.main --config=configs/cifar100.py:stage=old,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=side_info,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=bct_new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=transformation_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=transformation,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=eval,data_dir=$DATA --workdir=$WD

Splits: old = labels 0..49 (25,000 images), new = all 100 (50,000); evaluation on the 10,000 test images as query
and gallery. As ml-fct: images resized to 224 with a horizontal flip for training, resized to 224 for evaluation,
and the ImageNet ResNet50 stem. ml-fct: its "first 50 classes" are ImageFolder's string-sorted folders
{0..5, 10..53}; we take 0..49. For fast 32×32 runs set ``augment=pad_crop_flip``, ``eval_augment=default`` and
``model.cifar_stem=True`` on every stage.

Expected (ml-fct README, CIFAR-100; CMC top-1 — top-5 %, mAP %; its transformation used ImageNet-1k SimCLR
side-information, our plan none): old/old 32.9 — 59.3, 16.1    new/new 56.4 — 77.5, 36.5
new/h 50.6 — 74.2, 34.2.  The paper reports no CIFAR-100 table in the main text (only a longer update sequence
in its appendix).

Tiny form on ``tfds.testing.mock_data``: ``--config=configs/cifar100.py:runlocal`` (native 32×32 images).
"""

import ml_collections

from configs import imagenet, recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = recipes.parse(arg)
  return recipes.paper_experiment(
      "cifar100", a,
      data=recipes.tfds_data("cifar100", a, image_size=224),
      old_model=imagenet.resnet50(), new_model=imagenet.resnet50(),
      train_augment="resize_flip_224", eval_augment="resize_224",
      runlocal_data=recipes.tfds_data("cifar100", a, mock_num_examples=48, image_size=32),
      runlocal_train_augment="pad_crop_flip", runlocal_eval_augment="default")
