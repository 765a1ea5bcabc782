r"""ImageNet-500 → ImageNet-1k (the paper's Table 1), ResNet50-128 old and new, the reference recipe.

Prepare the data once (array_record; the two archives must be downloaded by hand into
``$DATA/downloads/manual/``: ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar):

  tfds build imagenet2012 --data_dir=$DATA --file_format=array_record

Then, in order (each stage writes its own sub-workdir; rerunning skips finished stages and resumes):

  python -m fct_jax.main --config=configs/imagenet.py:stage=old,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=side_info,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=bct_new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=transformation_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=transformation,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=transformation_fastfill_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=transformation_fastfill,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/imagenet.py:stage=eval,data_dir=$DATA --workdir=$WD

or the whole plan: ``--config=configs/imagenet.py:data_dir=$DATA``. ``data_dir`` may be ``gs://bucket/tfds``.

Splits: old = the first 500 classes (640,542 images, counted from the cached label index), new = all 1000
(1,281,167); evaluation on the 50,000 validation images as both query and gallery (self removed). Training
augmentation: random resized crop 224 + horizontal flip; evaluation: resize 256, centre crop 224 (ml-fct's).
For the update sequence of Table 5 the splits ``train_250`` / ``train_500`` / ``new_train`` are available.

Expected (paper, Table 1; CMC top-1 — top-5 %, mAP@1.0 %):
  old/old 46.5 — 64.6, 29.9    new/old 0.1 — 0.5, 0.003    new/new 68.1 — 84.4, 45.0
  FCT with SimCLR side-info: h/h 59.3 — 76.4, 41.3    new/h 65.0 — 82.3, 43.6
  FCT without side-info (Table 6, "None"): new/h 61.8 — 80.5, 39.9   (this plan's new/h[none] row)
  BCT: new_bct/old 46.9 — 65.4, 30.1    new_bct/new_bct 62.4 — 81.9, 41.1
ml-fct's README (its released code): old/old 46.4, new/new 68.4, new/h 65.1 top-1.

FastFill (Jaeckle et al., ICLR 2023): stages ``transformation_fastfill_none`` (ψ = 0) and
``transformation_fastfill`` (ψ = SimCLR) train h with h's recipe plus an uncertainty head and
FastFill's loss (rows new/h[fastfill,none], new/h[fastfill]).
The evaluation draws the partial-backfilling curve of every h in random order, in distance order (an oracle) and,
for FastFill's h, in σ order (largest predicted uncertainty first), each summarised by its AUC: the mean over the
22 grid points f = i/21 (results.md, backfill.png).
Expected (FastFill's ImageNet numbers; AUC of CMC top-1 — top-5 %, mAP %; the report puts them beside ours):
  with side-info:  FCT, random (h[simclr]:random) 64.7 — 82.4, 42.6
                   FastFill, σ (h[fastfill]:sigma) 67.8 — 84.2, 46.2
  without:         FCT, random (h[none]:random) 62.8 — 81.1, 40.5
                   FastFill, σ (h[fastfill,none]:sigma) 66.5 — 83.6, 44.8
  references: old/old 46.6 — 65.2, 28.5    new/new 68.2 — 84.6, 45.3
FastFill's "without side-info" feeds ψ := φ_old, this plan ψ = 0; to compare like with like, set
``side_info.kind=old`` and ``side_info.dim=128`` on transformation_none and transformation_fastfill_none
(``--config.stages.NAME.side_info.kind=old``).

Tiny form on ``tfds.testing.mock_data`` (no data needed, seconds): ``--config=configs/imagenet.py:runlocal``.
"""

import ml_collections

from configs import recipes


def resnet50(dim: int = 128) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"name": "resnet50", "embedding_dim": dim, "last_nonlin": True})


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = recipes.parse(arg)
  return recipes.paper_experiment(
      "imagenet", a,
      data=recipes.tfds_data("imagenet2012", a),
      old_model=resnet50(), new_model=resnet50(),
      train_augment="inception_crop_flip", eval_augment="resize256_crop224",
      runlocal_data=recipes.tfds_data("imagenet2012", a, mock_num_examples=48, image_size=32),
      runlocal_train_augment="inception_crop_flip_32", runlocal_eval_augment="resize36_crop32", paper_table="table1")
