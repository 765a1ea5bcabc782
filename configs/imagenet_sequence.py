r"""ImageNet update sequence v1 → v2 → v3 (the paper's §4.4, Table 5): ImageNet-250 → ImageNet-500 → ImageNet-1k.

Every v_i is a ResNet50-128 trained with the backbone recipe (configs/recipes.py) on the first 250 / 500 / 1000
classes; v1 and v2 each get a SimCLR ResNet50-128 side-information model trained on their own training images
(no labels). Transformations h2 (v1 → v2), h3 (v2 → v3), h13 (v1 → v3) with ψ and without (``*_none``), and g2
((φ1, ψ1) → ψ2) for the two-hop upgrade h3(h2(φ1, ψ1), g2(φ1, ψ1)); all with the reference h recipe, features
online (ml-fct's; ``--config.stages.h2.feature_mode=cached`` for ours). Data preparation as configs/imagenet.py.

  python -m fct_jax.main --config=configs/imagenet_sequence.py:data_dir=$DATA --workdir=$WD

Expected (paper, Table 5; CMC top-1 — top-5 %, mAP@1.0 %):
  v1/v1 29.6 — 44.1, 15.5     v2/v2 46.5 — 65.1, 28.7     v3/v3 68.1 — 84.4, 45.0
  v2/h2(v1) 40.5 — 58.8, 26.4     v3/h3(v2) 65.0 — 82.3, 43.6
  v3/h3(h2(v1)) 57.4 — 78.0, 33.5     v3/h13(v1) 59.9 — 79.3, 37.0
  without side-information (§4.4 text): two hops 44.9, direct 53.9 top-1.

SimCLR recipe: the paper does not give it; we use SimCLR's ImageNet defaults (LARS, lr 0.3·B/256, weight decay
1e-6, 10 warm-up epochs, temperature 0.1, 2-layer 2048 → 128 projection) for 100 epochs.

Tiny form on ``tfds.testing.mock_data``: ``--config=configs/imagenet_sequence.py:runlocal`` (builds; the mock
labels are spread over 1000 classes, so the class subsets hold few examples).
"""

import ml_collections

from configs import recipes


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = recipes.parse(arg)
  return recipes.paper_sequence(
      "imagenet_sequence", a, splits=("train_250", "train_500", "new_train"),
      data=recipes.tfds_data("imagenet2012", a),
      runlocal_data=recipes.tfds_data("imagenet2012", a, mock_num_examples=256, image_size=32),
      train_augment="inception_crop_flip", eval_augment="resize256_crop224",
      runlocal_train_augment="inception_crop_flip_32", runlocal_eval_augment="resize36_crop32")
