r"""A quick real-image FCT run on scikit-learn's bundled handwritten digits (no download, CPU-sized).

1,797 8×8 grey digits (upsampled to 16×16 RGB); 497 fixed held-out images are the query/gallery set. The old
model learns digits 0–4 only, the new model all ten; h maps old embeddings into the new space. Needs
scikit-learn (``pip install scikit-learn``, the ``fct_jax[digits]`` extra).

Whole plan (old → new → transformation → eval), a couple of minutes on a 2-core CPU:

  python -m fct_jax.main --config=configs/digits.py --workdir=/tmp/fct_digits

One stage: ``--config=configs/digits.py:stage=old``. Tiny form for tests (seconds): ``:runlocal``.
Expected: new/new well above old/old (old has never seen 5–9); new/old near chance (10%); new/h between old/old
and new/new — without side-information h cannot recover what the old model never learned about 5–9.
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage="", runlocal=False)
  data = ml_collections.ConfigDict({"name": "digits", "image_size": 16, "old_classes": 5, "num_eval": 497,
                                    "seed": 0})
  if a.runlocal:
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8)})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16})

    def train(opt, epochs):
      del epochs
      return common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=opt, log_every_steps=1,
                          checkpoint_every_steps=1)
    eval_bs = 128
  else:
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 16, "widths": (16, 32)})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 128})

    def train(opt, epochs):
      return common.train(batch_size=64, epochs=epochs, optimizer_cfg=opt, log_every_steps=20,
                          checkpoint_every_steps=200)
    eval_bs = 512

  sgd = lambda: common.optimizer("momentum", 0.05, momentum=0.9, weight_decay=5e-4, warmup_epochs=1)
  adam = lambda: common.optimizer("adam", 1e-3, weight_decay=3.0517578125e-5, warmup_epochs=1)
  stages = [
      common.backbone_stage("old", data=data, split="old_train", model=model, train_cfg=train(sgd(), 15), seed=1,
                            augment="pad_crop", eval_batch_size=eval_bs),
      common.backbone_stage("new", data=data, split="new_train", model=model, train_cfg=train(sgd(), 15), seed=2,
                            augment="pad_crop", eval_batch_size=eval_bs),
      common.transformation_stage("transformation", data=data, split="new_train", model=h_model,
                                  train_cfg=train(adam(), 15), seed=3, augment="pad_crop"),
      common.evaluation_stage("eval", data=data, split="eval", eval_batch_size=eval_bs),
  ]
  return common.experiment("digits", stages, a.stage)
