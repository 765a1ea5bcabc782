r"""The paper's Table 1 on real images: scikit-learn's bundled handwritten digits (no download, CPU-sized).

1,797 8×8 grey digits (upsampled to 16×16 RGB); 497 fixed held-out images are the query/gallery set. The old
model learns digits 0–4 only, the new model all ten. The plan is the paper's (``common.fct_plan``, as the demo):
old → side_info → new → bct_new → transformation_none → transformation → eval. ψ is a SimCLR model trained on the
old training images without their labels; h is trained without (``new/h[none]``) and with ψ (``new/h[simclr]``);
the BCT baseline (``bct-new/old``) is the new model trained with the influence loss through the old classifier.

Recipes in the reference's proportions (apple/ml-fct: backbones 100 epochs, h 80, SimCLR 100): h trains for
0.8 × the backbone epochs and SimCLR for as many as the backbones. Small CNNs; h on cached features (K augmented
views per image embedded once).

Whole plan: 5 min 21 s wall for three seed sets on a shared 2-core CPU (loaded), FastFill included, with the combined
report (mean ± sample sd over seeds, the orderings checked in each seed):

  python -m fct_jax.main --config=configs/digits.py --workdir=/tmp/fct_digits3 --config.seeds=3
  python -m fct_jax.main --config=configs/digits.py --workdir=/tmp/fct_digits      # one seed set

One stage: ``--config=configs/digits.py:stage=old``. Tiny form for tests (seconds): ``:runlocal``.

Result over three seed sets (CMC top-1 %, mean ± sample sd; 2026-12-03): old/old 74.6 ± 4.5, new/old 6.8 ± 4.9,
new/new 89.7 ± 2.0, bct-new/old 20.6 ± 3.9, bct-new/bct-new 62.2 ± 8.7, new/h[none] 76.1 ± 3.9,
new/h[simclr] 81.8 ± 0.3, h/h 77.4 ± 3.3. Each of the orderings (``ORDERINGS``: side-information helps h, h without
it beats the BCT baseline, BCT beats no compatibility, h/h beats old/old) holds in all three seeds; h/h's margin
over old/old is small (2.2 to 4.2 points per seed). Unlike the paper, BCT costs the new model much here (62.2 vs
89.7 for new/new), and ψ barely differs from φ_old (linear CKA 0.76–0.78, where the demo's is 0.22): on ten digits
SimCLR learns much of what the old classifier does, yet new/h[simclr] gains 5.7 points over new/h[none] on average
and varies far less across seeds. FastFill's claims (``demo.FASTFILL_ORDERINGS``) hold in no seed here:
new/h[fastfill,none] 63.0 ± 4.9, new/h[fastfill] 69.9 ± 4.4, and the σ order's AUC top-1 (79.2, 82.8) is below the
random order's for the same h (84.6, 85.9) and FCT's (84.9, 86.8).
"""

import ml_collections

from configs import common, demo

BACKBONE_EPOCHS = 20
H_EPOCHS = 0.8 * BACKBONE_EPOCHS  # ml-fct: 80 vs 100
SIMCLR_EPOCHS = BACKBONE_EPOCHS  # SimCLR's 100 epochs vs the backbones' 100

# SimCLR views for digits: no flip (a mirrored digit is another digit or none), moderate crops that keep most of the
# stroke, small rotations (at 180° a 6 would be a 9), brightness/contrast jitter; hue means nothing on grey images.
SIMCLR_VIEWS = {"crop_scale": (0.5, 1.0), "flip": False, "jitter_strength": 0.5, "rotation": 15.0}
SIMCLR = dict(temperature=0.2, views=SIMCLR_VIEWS)

# The paper's and FastFill's claims, checked per seed by a multi-seed run: the demo's.
ORDERINGS = demo.ORDERINGS + demo.FASTFILL_ORDERINGS


def _sgd():
  return common.optimizer("momentum", 0.05, momentum=0.9, weight_decay=5e-4, warmup_epochs=1)


def _adam():
  return common.optimizer("adam", 1e-3, weight_decay=3.0517578125e-5, warmup_epochs=1)


def get_config(arg=None) -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, stage="", runlocal=False)
  data = ml_collections.ConfigDict({"name": "digits", "image_size": 16, "old_classes": 5, "num_eval": 497,
                                    "seed": 0})
  if a.runlocal:
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8)})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16})
    side_kw = dict(projection_hidden_dim=16, projection_dim=8)
    train = lambda opt, epochs: common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=opt,
                                             log_every_steps=1, checkpoint_every_steps=1)
    eval_bs, h_views = 128, 2
  else:
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 16, "widths": (16, 32)})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 128})
    side_kw = dict(projection_hidden_dim=64, projection_dim=32)
    train = lambda opt, epochs: common.train(batch_size=64, epochs=epochs, optimizer_cfg=opt, log_every_steps=20,
                                             checkpoint_every_steps=200)
    eval_bs, h_views = 512, 4

  stages = common.fct_plan(
      data=data, old_model=model, new_model=model,
      backbone=dict(train_cfg=train(_sgd(), BACKBONE_EPOCHS), augment="pad_crop"),
      # Side-information is trained at old time, on the old training images, without their labels.
      side_info=dict(method="simclr", model=model, train_cfg=train(_sgd(), SIMCLR_EPOCHS), **SIMCLR, **side_kw),
      transformation=dict(model=h_model, train_cfg=train(_adam(), H_EPOCHS), augment="pad_crop",
                          feature_mode="cached", cache_views=h_views),
      # FastFill's h (the official loss, config_schema.FASTFILL) with h's recipe, without and with ψ.
      fastfill={},
      evaluation=dict(orderings=ORDERINGS), every=dict(eval_batch_size=eval_bs))
  return common.experiment("digits", stages, a.stage)
