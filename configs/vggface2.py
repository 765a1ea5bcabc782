r"""VGGFace2-863 → VGGFace2-8631 (the paper's Table 3): old ResNet18-128, new ResNet50-128.

VGGFace2 is not in the TFDS catalogue; download the archives by hand (registration required), extract them into
``$VGGFACE2`` (``train/``, ``test/``, ``bb_landmark/``) and build the array_record dataset once:

  python -m fct_jax.data.vggface2_builder --data_dir=$DATA --manual_dir=$VGGFACE2

Then, in order:

  python -m fct_jax.main --config=configs/vggface2.py:stage=old,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=side_info,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=bct_new,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=transformation_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=transformation,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=transformation_fastfill_none,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=transformation_fastfill,data_dir=$DATA --workdir=$WD
  python -m fct_jax.main --config=configs/vggface2.py:stage=eval,data_dir=$DATA --workdir=$WD

Splits: old = the first 10% of the (sorted) training subjects, 863; new = all 8,631; evaluation on a fixed random
subsample (``data.eval_subsample_seed``) of 50 images of each of the 500 test subjects — the paper's "validation
set" — as query and gallery (25,000 images). Faces: the loose box grown by 30%, shorter side 256, a 224 crop
(random + flip for training, central for evaluation), VGGFace2's own protocol.

Training (paper §4.3, Table 3): old, new and bct_new train with the ArcFace objective (``model.head=arcface``,
``loss.kind=arcface``, s = 64, m = 0.5 as in ArcFace) and without label smoothing (ArcFace's recipe), with
L2-normalised embeddings (``model.norm_feature``: ArcFace learns directions, so L2 ranking = cosine ranking); the
side-information is the *alternate old model*: ``side_info`` is another run of the old model's recipe (ResNet18-128,
ArcFace, the old training set) with another seed, and ``transformation`` uses it (``side_info.kind=alt_old``). BCT's
influence loss goes through the old model's ArcFace head with its ArcFace loss (see ``fct_jax/stages/backbone.py``).
The paper's appendix hyper-parameters for this experiment are not in our copy of the paper; the ImageNet recipe
(SGD lr 1.024 at batch 1024, cosine, 100 epochs) is used otherwise. ``:ablation`` adds Table 6's kinds; the alternate
old models (with and without mixup) train with ArcFace like the old model.

Expected (paper, Table 3; CMC top-1 — top-5 %, mAP@1.0 %):
  old/old 84.0 — 93.5, 44.6    new/old 0.2 — 1.0, 0.2    new/new 96.6 — 98.4, 77.8
  FCT (alternate-old side-info): h/h 87.2 — 94.9, 53.4    new/h 92.5 — 97.5, 62.6
  BCT: new_bct/old 84.2 — 93.9, 45.0    new_bct/new_bct 95.1 — 98.3, 74.3

FastFill (Jaeckle et al., ICLR 2023): stages ``transformation_fastfill_none`` (ψ = 0) and
``transformation_fastfill`` (ψ = the alternate old model) train h with h's recipe plus an uncertainty head and
FastFill's loss (rows new/h[fastfill,none], new/h[fastfill]).
The evaluation draws the partial-backfilling curve of every h in random order, in distance order (an oracle) and,
for FastFill's h, in σ order (largest predicted uncertainty first), each summarised by its AUC: the mean over the
22 grid points f = i/21 (results.md, backfill.png). FastFill's discriminative term goes through the new
model's classifier, here its ArcFace head. FastFill publishes no VGGFace2 numbers.

Tiny form on ``tfds.testing.mock_data``: ``--config=configs/vggface2.py:runlocal`` (the same plan: ArcFace heads on
the tiny CNN, alternate-old side-information).
"""

import ml_collections

from configs import imagenet, recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = recipes.parse(arg)
  # ArcFace learns directions (its logits are cosines) and leaves the feature length free: retrieval, BCT and the
  # transformation use the L2-normalised embedding, so that L2 ranking is cosine ranking.
  resnet18 = ml_collections.ConfigDict({"name": "resnet18", "embedding_dim": 128, "last_nonlin": True,
                                        "norm_feature": True})
  resnet50 = imagenet.resnet50(128)
  resnet50.norm_feature = True
  return recipes.paper_experiment(
      "vggface2", a,
      data=recipes.tfds_data("vggface2", a, eval_per_class=50, eval_subsample_seed=0),
      old_model=resnet18, new_model=resnet50,
      train_augment="face_crop_flip", eval_augment="face_crop",
      # Mock labels are uniform over all 9,131 subjects: a larger "old" set keeps a few batches of examples.
      runlocal_data=recipes.tfds_data("vggface2", a, mock_num_examples=64, image_size=32, old_classes=4600,
                                      eval_per_class=50, eval_subsample_seed=0),
      runlocal_train_augment="face_crop_flip_32", runlocal_eval_augment="face_crop_32", paper_table="table3",
      loss={"kind": "arcface", "label_smoothing": 0.0},  # ArcFace s, m: the schema's (64, 0.5)
      side_info_method="alt_old")
