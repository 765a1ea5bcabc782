r"""The demo experiment on the embedded coloured-shapes data (the paper's Figure 1 story), CPU-sized.

The old model learns colour only (its training set labels colour, on 3 of 5 shapes); the new model learns
(shape, colour) on all shapes. Without side-information, h(φ_old) cannot recover shape information the old model
threw away, so new/h stays well below new/new — the gap FCT's side-information closes.

Whole plan (old → new → transformation → eval), about 3 minutes on a 2-core CPU:

  python -m fct_jax.main --config=configs/demo.py --workdir=/tmp/fct_demo

One stage, with an override:

  python -m fct_jax.main --config=configs/demo.py:stage=old --workdir=/tmp/fct_demo --config.train.epochs=3

Tiny form for tests (seconds): ``--config=configs/demo.py:runlocal``.
Expected (full demo): new/new top-1 far above old/old; new/old near chance (5% for 20 classes).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage="", runlocal=False)
  if a.runlocal:
    data = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 64, "num_new_train": 64,
                                      "num_eval": 40, "image_size": 16, "num_old_shapes": 3, "seed": 0})
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8)})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16})
    tr = lambda opt: common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=opt, log_every_steps=1,
                                  checkpoint_every_steps=1)
    bb_epochs = h_epochs = None
    eval_bs = 16
  else:
    data = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 6000, "num_new_train": 10000,
                                      "num_eval": 2000, "image_size": 32, "num_old_shapes": 3, "seed": 0})
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 32, "widths": (16, 32, 64),
                                       "stem_stride": 2})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 256})
    tr = None
    bb_epochs, h_epochs = 8, 8
    eval_bs = 500

  def train(opt, epochs):
    if tr is not None:
      return tr(opt)
    return common.train(batch_size=128, epochs=epochs, optimizer_cfg=opt, log_every_steps=50,
                        checkpoint_every_steps=200)

  sgd = lambda: common.optimizer("momentum", 0.1, momentum=0.9, weight_decay=5e-4, warmup_epochs=1)
  adam = lambda: common.optimizer("adam", 1e-3, weight_decay=3.0517578125e-5, warmup_epochs=1)
  stages = [
      common.backbone_stage("old", data=data, split="old_train", model=model, train_cfg=train(sgd(), bb_epochs),
                            seed=1, eval_batch_size=eval_bs),
      common.backbone_stage("new", data=data, split="new_train", model=model, train_cfg=train(sgd(), bb_epochs),
                            seed=2, eval_batch_size=eval_bs),
      common.transformation_stage("transformation", data=data, split="new_train", model=h_model,
                                  train_cfg=train(adam(), h_epochs), seed=3),
      common.evaluation_stage("eval", data=data, split="eval", eval_batch_size=eval_bs),
  ]
  return common.experiment("demo", stages, a.stage)
