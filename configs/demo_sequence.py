r"""The update sequence v1 → v2 → v3 (the paper's §4.4, Table 5) on the embedded coloured-shapes data, CPU-sized.

v1 learns colour only on 3 of the 5 shapes (the demo's ``old_train``), v2 learns (shape, colour) on 4 shapes
(``train_4``), v3 on all 5 (``new_train``); v1 and v2 each get a SimCLR side-information model trained on their
own training images (configs/demo.py's SimCLR recipe: per-image input standardisation, per-channel gamma views,
18 epochs). Transformations: h2 (v1 → v2), h3 (v2 → v3), h13 (v1 → v3) with ψ and without (``*_none``),
and g2 ((φ1, ψ1) → ψ2) so that a v1 gallery can be upgraded twice: h3(h2(φ1, ψ1), g2(φ1, ψ1)).

  python -m fct_jax.main --config=configs/demo_sequence.py --workdir=/tmp/fct_demo_sequence

Tiny form for tests (seconds per stage): ``--config=configs/demo_sequence.py:runlocal``.
Rows of ``results.json``: v1/v1, v2/v2, v3/v3, v2/h2(v1), v3/h3(v2), v3/h3(h2(v1)), v3/h13(v1), and the same four
with ``[none]`` (no side-information). Expected shape of the result (paper, Table 5): the two-hop row a little below
the direct h13 row, both well above their ``[none]`` twins.
"""

import ml_collections

from configs import common, demo


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage="", runlocal=False)
  if a.runlocal:
    data = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 64, "num_new_train": 80,
                                      "num_eval": 40, "image_size": 16, "num_old_shapes": 3, "seed": 0})
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8)})
    side_kw = dict(projection_hidden_dim=16, projection_dim=8)
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16})
    tr = lambda opt, epochs: common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=opt, log_every_steps=1,
                                          checkpoint_every_steps=2)
    bb_epochs = h_epochs = side_epochs = 0
    eval_bs, h_views = 16, 2
  else:
    data = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 4000, "num_new_train": 8000,
                                      "num_eval": 1000, "image_size": 32, "num_old_shapes": 3, "seed": 0})
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 32, "widths": (16, 32, 64),
                                       "stem_stride": 2})
    side_kw = dict(projection_hidden_dim=128, projection_dim=64)
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 256})
    tr = lambda opt, epochs: common.train(batch_size=128, epochs=epochs, optimizer_cfg=opt, log_every_steps=50,
                                          checkpoint_every_steps=200)
    bb_epochs, h_epochs, side_epochs = 8, 8, demo.SIMCLR_EPOCHS
    eval_bs, h_views = 500, 4

  # The demo's recipes (configs/demo.py): momentum SGD for backbones and SimCLR, Adam for h and g, its SimCLR.
  sgd, adam = demo.sgd, demo.adam
  stages = common.sequence_stages(
      data=data, splits=("old_train", "train_4", "new_train"), backbone_model=model, side_model=model,
      h_model=h_model, backbone_train=lambda i: tr(sgd(), bb_epochs), side_train=lambda i: tr(sgd(), side_epochs),
      h_train=lambda name: tr(adam(), h_epochs),
      side_kwargs=dict(**demo.SIMCLR, **side_kw),
      h_kwargs=dict(feature_mode="cached", augment="pad_crop_flip", cache_views=h_views),
      eval_batch_size=eval_bs)
  return common.experiment("demo_sequence", stages, a.stage)
