"""The reference recipe (apple/ml-fct configs) as one builder shared by the paper-dataset configs.

Backbones (old and new): SGD momentum 0.875, lr 1.024 for batch 1024, weight decay 3.0517578125e-5 on every
parameter (ml-fct ``no_bn_decay: False``), cosine schedule with 5 warm-up epochs, 100 epochs, label smoothing 0.1.
Transformation h: the FCT MLP (inner 2048), Adam lr 5e-4, weight decay 3.0517578125e-5, cosine with 5 warm-up
epochs, 80 epochs, batch 1024, BatchNorm in eval mode for the second half, trained on augmented new-set images.

Side-information ψ (the paper's FCT rows): SimCLR with the old model's architecture on the old training images
(no labels), LARS with lr 0.3·B/256, weight decay 1e-6, temperature 0.1, 10 warm-up epochs, 100 epochs, SimCLR's
ImageNet views (crop 224, colour jitter strength 1.0, grayscale, blur) — the SimCLR paper's recipe at batch 1024;
ml-fct only downloads pretrained SimCLR weights. BCT baseline: the new model's recipe plus the influence loss
through the old model's frozen classifier.

FastFill (Jaeckle et al., ICLR 2023; ml-fct@1a7f8b5 ``configs/{imagenet,cifar100}_fastfill_transformation.yaml``):
the transformation h's recipe above, unchanged, plus an uncertainty head and FastFill's loss — the schema's
``fastfill`` block is the official one (``sigma_dim`` 1, ``mu_sim`` 1, ``mu_disc`` 1, ``mu_unc`` 0.5, label smoothing
0.1; ``fct_jax/config_schema.py``). Two FastFill stages: ``transformation_fastfill_none`` (ψ = 0) and
``transformation_fastfill`` (ψ as ``transformation``'s); eval draws the partial-backfilling curves of every h (random
and distance orders, and σ order for FastFill's).

The plan: old, side_info, new, bct_new, transformation_none (ψ = 0), transformation (ψ = SimCLR),
transformation_fastfill_none, transformation_fastfill, eval — its table has every Table-1 row and the rows
new/h[fastfill,none], new/h[fastfill].

VGGFace2 (Table 3) changes two things: ``loss={"kind": "arcface", ...}`` trains every classification model (old, new,
bct_new, the alternate old models) with an ArcFace head and loss, and ``side_info_method="alt_old"`` makes ψ the
paper's *alternate old model* (the old model's recipe, another seed) instead of SimCLR.

Each dataset config supplies its data block, backbones and transforms; ``runlocal`` swaps in tiny models,
``tfds.testing.mock_data`` examples (no dataset needed) and 32-pixel versions of the same transforms.
"""

import ml_collections

from configs import common

WEIGHT_DECAY = 3.0517578125e-5
BATCH = 1024


def backbone_sgd():
  return common.optimizer("momentum", 1.024, momentum=0.875, weight_decay=WEIGHT_DECAY, warmup_epochs=5)


def transformation_adam():
  return common.optimizer("adam", 5e-4, weight_decay=WEIGHT_DECAY, warmup_epochs=5)


def simclr_lars():
  return common.optimizer("lars", 0.3 * BATCH / 256, weight_decay=1e-6, warmup_epochs=10, momentum=0.9)


def tfds_data(name: str, a, **fields) -> ml_collections.ConfigDict:
  """The ``data`` block of a TFDS dataset; ``a.data_dir`` (config argument ``data_dir=``) is where TFDS put it."""
  d = {"name": name, "data_dir": a.get("data_dir", ""), "tfds_name": "",
       "label_cache_dir": a.get("label_cache_dir", ""), "mock_num_examples": 0}
  d.update(fields)
  return ml_collections.ConfigDict(d)


def paper_experiment(experiment: str, a, *, data, old_model, new_model, train_augment: str, eval_augment: str,
                     backbone_epochs: float = 100, h_epochs: float = 80, h_inner_dim: int = 2048,
                     eval_batch_size: int = 1024,
                     runlocal_data=None, runlocal_train_augment: str = "", runlocal_eval_augment: str = "",
                     paper_table: str = "", loss=None, side_info_method: str = "simclr"):
  """Stages old → side_info → new → bct_new → transformation_none → transformation →
  transformation_fastfill_none → transformation_fastfill → eval, reference recipe (the FastFill stages: h's recipe
  and the official FastFill loss).

  Args:
    experiment: experiment name.
    a: parsed config arguments (``stage``, ``runlocal``, ``data_dir``, ``label_cache_dir``).
    data: the data block (full runs).
    old_model, new_model: backbone model blocks (full runs).
    train_augment, eval_augment: transform names (``augment.TRAIN_TRANSFORMS`` / ``augment.EVAL_TRANSFORMS``).
    runlocal_data, runlocal_train_augment, runlocal_eval_augment: their tiny counterparts.
    paper_table: the paper's table of this experiment (``fct_jax.report.PAPER_TABLES``), shown beside ours.
    loss: fields of the ``loss`` block of every classification-trained model, runlocal included (None: the
      schema's, softmax with label smoothing 0.1, the reference recipe); ``kind="arcface"`` also gives their models
      ArcFace heads.
    side_info_method: ψ of the ``side_info`` stage (and of ``transformation``): "simclr" (the reference recipe,
      trained like SimCLR) or "alt_old" (another run of the old model's recipe, seed 4; the paper's VGGFace2 ψ).
  """
  if side_info_method not in ("simclr", "alt_old"):
    raise ValueError(f"unknown side_info_method {side_info_method!r}; valid: simclr, alt_old")
  if a.runlocal:
    data = runlocal_data
    old_model = new_model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8),
                                                       "stem_stride": 2})
    h_inner_dim = 16
    train_augment, eval_augment = runlocal_train_augment, runlocal_eval_augment
    eval_batch_size = 16

    def train(opt, epochs):
      del epochs
      return common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=opt, log_every_steps=1,
                          checkpoint_every_steps=1)
  else:
    def train(opt, epochs):
      return common.train(batch_size=BATCH, epochs=epochs, optimizer_cfg=opt, log_every_steps=100,
                          checkpoint_every_steps=1000)

  if (loss or {}).get("kind") == "arcface":
    old_model, new_model = common.with_head(old_model, "arcface"), common.with_head(new_model, "arcface")
  # Every classification-trained stage: the loss, and its label smoothing.
  cls = dict(loss=dict(loss)) if loss else {}
  h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": h_inner_dim})
  side_model = ml_collections.ConfigDict(old_model.to_dict())
  views = ({"out_size": 32, "crop_scale": (0.08, 1.0), "jitter_strength": 1.0, "blur_prob": 0.0} if a.runlocal
           else {"out_size": 224, "crop_scale": (0.08, 1.0), "jitter_strength": 1.0, "blur_prob": 0.5})
  sides = {
      # The alternate old model: φ_old's architecture, recipe, data and loss; only the seed differs (paper §5.1).
      "alt_old": dict(method="alt_old", model=old_model, train_cfg=train(backbone_sgd(), backbone_epochs),
                      augment=train_augment, eval_batch_size=eval_batch_size, **cls),
      # ψ is trained at old time on the old training images, without their labels.
      "simclr": dict(method="simclr", model=side_model, train_cfg=train(simclr_lars(), backbone_epochs),
                     temperature=0.1, views=views, projection_hidden_dim=16 if a.runlocal else 2048,
                     projection_dim=8 if a.runlocal else 128, eval_batch_size=eval_batch_size)}
  ablation = ()
  if a.get("ablation", False):
    # Table 6: the other side-information models, each with its own h (rows new/h[<kind>]). The paper's
    # autoencoder and alternate old models are trained on the old training set like SimCLR; the autoencoder's
    # architecture is ours (the paper gives none).
    ae_model = ml_collections.ConfigDict({"name": "autoencoder", "embedding_dim": int(side_model.embedding_dim)})
    if a.runlocal:
      ae_model.settings = ((1, 8, 1, 2),)
    # The alternate old models (with and without mixup) use the old model's loss; the autoencoder has none.
    softmax = dict(loss=dict(loss or {}, kind="softmax"))
    ablation = [(method, short, dict(model=m, train_cfg=train(opt(), backbone_epochs), augment=train_augment,
                                     eval_batch_size=eval_batch_size, **loss_kw))
                for method, short, m, opt, loss_kw in (
                    ("autoencoder", "ae", ae_model, transformation_adam, softmax),
                    ("alt_old", "alt", old_model, backbone_sgd, cls),
                    ("alt_old_mixup", "altmix", old_model, backbone_sgd, cls))]
  stages = common.fct_plan(
      data=data, old_model=old_model, new_model=new_model,
      backbone=dict(train_cfg=train(backbone_sgd(), backbone_epochs), augment=train_augment,
                    eval_batch_size=eval_batch_size, **cls),
      side_info=sides[side_info_method],
      transformation=dict(model=h_model, train_cfg=train(transformation_adam(), h_epochs), augment=train_augment),
      # FastFill: the transformation's fields above (ml-fct's FastFill recipe is FCT's h recipe) and the schema's
      # ``fastfill`` block, which is the official loss; nothing to add.
      fastfill={},
      ablation=ablation, every=dict(eval_augment=eval_augment),  # how every stage embeds evaluation images
      evaluation=dict(eval_batch_size=eval_batch_size,
                      paper_table="table6" if a.get("ablation", False) and experiment == "imagenet" else paper_table))
  return common.experiment(experiment + ("_ablation" if a.get("ablation", False) else ""), stages, a.stage)


def paper_sequence(experiment: str, a, *, splits, data, runlocal_data, train_augment: str, eval_augment: str,
                   runlocal_train_augment: str, runlocal_eval_augment: str):
  """An update sequence v1 → … → vN (``common.sequence_stages``) with the reference recipe: ResNet50-128 backbones
  (100 epochs), SimCLR ResNet50-128 ψ (LARS, temperature 0.1, 2048 → 128 projection, 100 epochs), h and g with the
  h recipe (80 epochs, features online). ``runlocal`` swaps in tiny models and ``runlocal_data``."""
  if a.runlocal:
    data = runlocal_data
    model = ml_collections.ConfigDict({"name": "small_cnn", "embedding_dim": 8, "widths": (4, 8), "stem_stride": 2})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16})
    train = lambda opt, epochs: common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=opt, log_every_steps=1,
                                             checkpoint_every_steps=2)
    side_kw = dict(projection_hidden_dim=16, projection_dim=8, views={"out_size": 32})
    train_augment, eval_augment, eval_bs = runlocal_train_augment, runlocal_eval_augment, 16
  else:
    model = ml_collections.ConfigDict({"name": "resnet50", "embedding_dim": 128, "last_nonlin": True})
    h_model = ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 2048})
    train = lambda opt, epochs: common.train(batch_size=BATCH, epochs=epochs, optimizer_cfg=opt,
                                             log_every_steps=100, checkpoint_every_steps=1000)
    side_kw = dict(projection_hidden_dim=2048, projection_dim=128, views={"out_size": 224})
    eval_bs = 1024
  stages = common.sequence_stages(
      data=data, splits=splits, backbone_model=model, side_model=model, h_model=h_model,
      backbone_train=lambda i: train(backbone_sgd(), 100), side_train=lambda i: train(simclr_lars(), 100),
      h_train=lambda name: train(transformation_adam(), 80),
      backbone_kwargs=dict(augment=train_augment), side_kwargs=dict(temperature=0.1, **side_kw),
      h_kwargs=dict(augment=train_augment, feature_mode="online"), eval_batch_size=eval_bs,
      eval_augment=eval_augment)  # how every stage embeds evaluation images (common.eval_transform)
  return common.experiment(experiment, stages, a.stage)


def parse(arg):
  """Config arguments of the paper-dataset configs: ``stage=``, ``runlocal``, ``data_dir=``, ``label_cache_dir=``,
  ``ablation`` (Table 6's side-information ablation)."""
  return common.parse_arg(arg, stage="", runlocal=False, data_dir="", label_cache_dir="", ablation=False)
