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
  python -m fct_jax.main --config=configs/cifar100.py:stage=transformation_fastfill_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=transformation_fastfill,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/cifar100.py:stage=eval,data_dir=$DATA --workdir=$WD

Splits: old = labels 0..49 (25,000 images), new = all 100 (50,000); evaluation on the 10,000 test images as query
and gallery. As ml-fct: images resized to 224 with a horizontal flip for training, resized to 224 for evaluation,
and the ImageNet ResNet50 stem. ml-fct: its "first 50 classes" are ImageFolder's string-sorted folders
{0..5, 10..53}; we take 0..49. For fast 32×32 runs set ``augment=pad_crop_flip``, ``eval_augment=default`` and
``model.cifar_stem=True`` on every stage.

Expected (ml-fct README, CIFAR-100; CMC top-1 — top-5 %, mAP %; its transformation used ImageNet-1k SimCLR
side-information, our plan's SimCLR is trained on the CIFAR-50 images): old/old 32.9 — 59.3, 16.1
new/new 56.4 — 77.5, 36.5    new/h 50.6 — 74.2, 34.2.  The paper reports no CIFAR-100 table in the main text (only
a longer update sequence in its appendix); the report shows these numbers as ``paper_table="mlfct_cifar100"``
(old/old and new/new only: our h rows have other side-information).

FastFill (Jaeckle et al., ICLR 2023): stages ``transformation_fastfill_none`` (ψ = 0) and
``transformation_fastfill`` (ψ = SimCLR) train h with h's recipe plus an uncertainty head and
FastFill's loss (rows new/h[fastfill,none], new/h[fastfill]).
The evaluation draws the partial-backfilling curve of every h in random order, in distance order (an oracle) and,
for FastFill's h, in σ order (largest predicted uncertainty first), each summarised by its AUC: the mean over the
22 grid points f = i/21 (results.md, backfill.png).
Expected (FastFill's CIFAR-100 numbers, without side-information; AUC of CMC top-1 — top-5 %, mAP %):
  FCT, random (h[none]:random) 49.1 — 73.6, 29.1    FastFill, σ (h[fastfill,none]:sigma) 53.6 — 75.3, 32.5
  references: old/old 34.2 — 60.6, 16.5    new/new 56.5 — 77.0, 36.3
FastFill's "without side-info" feeds ψ := φ_old, this plan ψ = 0; to compare like with like, set
``side_info.kind=old`` and ``side_info.dim=128`` on transformation_none and transformation_fastfill_none
(``--config.stages.NAME.side_info.kind=old``).

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
      runlocal_train_augment="pad_crop_flip", runlocal_eval_augment="default", paper_table="mlfct_cifar100")
