r"""Places-182 → Places-365 (the paper's Table 2), ResNet50-512 old and new, the reference recipe.

Prepare the data once (TFDS downloads the 256×256 "small" images, ~25 GB):

  tfds build places365_small --data_dir=$DATA --file_format=array_record

Then, in order:

  python -m fct_jax.main --config=configs/places365.py:stage=old,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=side_info,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=bct_new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=transformation_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=transformation,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=transformation_fastfill_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=transformation_fastfill,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/places365.py:stage=eval,data_dir=$DATA --workdir=$WD

Splits: old = the first 182 classes (TFDS's label order is the sorted category list, as ImageFolder's), new = all
365; evaluation on the 36,500 validation images (100 per class) as query and gallery. Augmentation as ImageNet.
The paper's side-information here is SimCLR trained on ImageNet-1k (transferred across domains); this plan trains
SimCLR on the Places-182 images instead (point ``stages.transformation.side_info.stage`` at a finished ImageNet
side-info stage copied into the workdir to reproduce the paper's transfer).

Expected (paper, Table 2; CMC top-1 — top-5 %, mAP@1.0 %):
  old/old 29.6 — 58.2, 11.6    new/old 0.3 — 1.5, 0.12    new/new 37.0 — 65.1, 17.0
  FCT (SimCLR-ImageNet side-info): h/h 34.0 — 62.3, 17.3    new/h 35.8 — 64.5, 18.1
  BCT: new_bct/old 30.4 — 58.7, 12.6    new_bct/new_bct 34.9 — 64.2, 16.0

FastFill (Jaeckle et al., ICLR 2023): stages ``transformation_fastfill_none`` (ψ = 0) and
``transformation_fastfill`` (ψ = SimCLR) train h with h's recipe plus an uncertainty head and
FastFill's loss (rows new/h[fastfill,none], new/h[fastfill]).
The evaluation draws the partial-backfilling curve of every h in random order, in distance order (an oracle) and,
for FastFill's h, in σ order (largest predicted uncertainty first), each summarised by its AUC: the mean over the
22 grid points f = i/21 (results.md, backfill.png). FastFill publishes no Places-365 numbers.

Tiny form on ``tfds.testing.mock_data``: ``--config=configs/places365.py:runlocal``.
"""

import ml_collections

from configs import imagenet, recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = recipes.parse(arg)
  return recipes.paper_experiment(
      "places365", a,
      data=recipes.tfds_data("places365", a),
      old_model=imagenet.resnet50(512), new_model=imagenet.resnet50(512),
      train_augment="inception_crop_flip", eval_augment="resize256_crop224",
      runlocal_data=recipes.tfds_data("places365", a, mock_num_examples=48, image_size=32),
      runlocal_train_augment="inception_crop_flip_32", runlocal_eval_augment="resize36_crop32", paper_table="table2")
