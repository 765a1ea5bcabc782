"""Backbone stage: φ_old or φ_new trained with softmax cross-entropy (+ label smoothing) or ArcFace.

The stage config names the training split (``old_train`` / ``new_train``): the old model sees the old classes
only. Periodic evaluation reports retrieval CMC top-1 and mAP of the current embedding on the evaluation split
(query = gallery, self excluded).

Loss (``cfg.loss``): ``kind = "softmax"`` (default; the model's ``head`` must be ``linear``) is cross-entropy on
the linear classifier's logits; ``kind = "arcface"`` (the paper's VGGFace2 experiment, Table 3; the model's
``head`` must be ``arcface``, whose ``logits`` are cosines) is ``losses.arcface_loss`` with ``arcface_scale`` s and
``arcface_margin`` m (ArcFace's 64 and 0.5 by default). ``label_smoothing`` applies to either. The training
accuracy is the argmax of the logits (of the cosines for ArcFace). A head/loss mismatch is refused before
training. The alternate-old-model side-information (``stages/side_info.py``, ``alt_old``) trains with this task
and so honours the same ``loss`` block.

BCT (Shen et al. 2020), the paper's baseline: with ``cfg.bct.old`` naming a finished backbone stage, the loss gains
``cfg.bct.weight`` × the *influence loss* — the new embedding through the old model's frozen classifier, extended
to the classes the old model never saw with the old model's class means of those classes (old-model features of
the stage's own training images). The old classifier is a frozen input of the step (``Task.frozen``), never
differentiated nor saved; the new embedding width must equal the old one.

BCT with an ArcFace old model: BCT trains φ_new "with the old model's classifier and loss", so the influence loss
follows the *old* stage's saved ``loss`` block, whatever the new stage's own loss. For an ArcFace old model the
old classifier is its ``ArcFaceHead`` kernel (``params["classifier"]["kernel"]``, as for the linear head), used as
the head uses it: cosines between the L2-normalised new embedding and the L2-normalised old class weights, through
``losses.arcface_loss`` with the old stage's scale and margin. The new-class columns are then the means of the
*L2-normalised* old-model embeddings (the class centres on the hypersphere the cosine classifier compares against;
only their direction matters). For a softmax old model nothing changes: logits φ_new · W, cross-entropy.
"""

import jax.numpy as jnp
import numpy as np

from fct_jax import artifacts, losses, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.stages import common


def loss_spec(cfg) -> dict:
  """``{"kind", "scale", "margin"}`` of a (resolved) stage config's ``loss`` block: the keyword arguments of
  ``losses.classification_loss`` (the schema has checked the kind)."""
  lc = cfg.loss
  return {"kind": lc.kind, "scale": float(lc.arcface_scale), "margin": float(lc.arcface_margin)}


def check_head_matches_loss(cfg):
  """One-line :class:`FCTError` unless ``model.head`` is ``arcface`` exactly when ``loss.kind`` is ``arcface``."""
  kind = loss_spec(cfg)["kind"]
  head = cfg.model.head
  if kind == "arcface" and head != "arcface":
    raise FCTError(f"stage {cfg.name!r}: loss.kind='arcface' needs cosine logits, but model.head is {head!r}; "
                   "set model.head='arcface'")
  if head == "arcface" and kind != "arcface":
    raise FCTError(f"stage {cfg.name!r}: model.head='arcface' outputs cosines, which loss.kind={kind!r} cannot "
                   "train; set loss.kind='arcface'")


def make_task(cfg, model, num_classes: int, eval_source=None, eval_labels=None, mesh=None,
              old_classifier=None, old_loss=None) -> train_lib.Task:
  """The backbone :class:`train_lib.Task`; with ``old_classifier`` ([D, C] frozen kernel) it is BCT's.

  ``old_loss``: the old stage's :func:`loss_spec` (BCT's influence loss), given with ``old_classifier``.
  """
  check_head_matches_loss(cfg)
  spec = loss_spec(cfg)
  ls = float(cfg.loss.label_smoothing)
  bct_weight = float(cfg.bct.weight) if old_classifier is not None else 0.0

  def init(rng, batch):
    return model.init({"params": rng}, batch["image"], train=False)

  def loss(params, model_state, frozen, batch, rng, step):
    del rng, step
    out, updates = model.apply({"params": params, **model_state}, batch["image"], train=True,
                               mutable=["batch_stats"])
    l = losses.classification_loss(logits=out["logits"], labels=batch["label"], label_smoothing=ls, **spec)
    acc = jnp.mean(jnp.argmax(out["logits"], -1) == batch["label"])
    metrics = {"train_accuracy": acc}
    if old_classifier is not None:
      # Label smoothing as for the new classifier; the loss is the old model's own (see the module docstring).
      influence = losses.bct_influence_loss(new_embedding=out["embedding"], old_classifier=frozen["old_classifier"],
                                            labels=batch["label"], label_smoothing=ls, **old_loss)
      metrics["ce_loss"], metrics["influence_loss"] = l, influence
      l = l + bct_weight * influence
    return l, (metrics, dict(updates))

  evaluate = common.retrieval_eval(cfg, model, lambda v: v, eval_source, eval_labels, mesh, "embeddings")
  transform = augment.train_transform(cfg.augment, cfg.data)
  frozen = None if old_classifier is None else {"old_classifier": old_classifier}
  return train_lib.Task(name=cfg.name, init=init, loss=loss, transform=transform, evaluate=evaluate, frozen=frozen)


def bct_old_head(cfg, ctx: artifacts.Context, source, num_classes: int, embedding_dim: int):
  """``(classifier, loss)``: BCT's frozen classifier [D, num_classes] — the old model's, extended with its class
  means for new classes — and the :func:`loss_spec` the old stage ``cfg.bct.old`` was trained with (its saved
  config, read once).

  Class means are of old-model embeddings (eval transform) of ``source`` (the new training set), so a new class
  is represented where the old model puts its images; for an ArcFace old model, of the L2-normalised embeddings.
  The old columns are the saved kernel as it is (linear or ArcFace head alike).

  ml-fct: the reference repository has no BCT; this follows Shen et al. (2020) as the FCT paper describes it.
  On the demo data the old classes (colours) are not the first new classes (circle × colour): the old columns are
  kept as they are, as with ImageNet-500 ⊂ ImageNet-1k.
  """
  old_stage = cfg.bct.old
  module, variables, old_cfg = artifacts.load_backbone(ctx, old_stage, cfg.name)
  kernel = variables.get("params", {}).get("classifier", {}).get("kernel")
  if kernel is None:
    raise FCTError(f"stage {cfg.name!r}: BCT needs the old model's classifier, but stage {old_stage!r} has none "
                   "(params['classifier']['kernel'])")
  kernel = np.asarray(kernel, np.float32)
  if kernel.shape[0] != embedding_dim:
    raise FCTError(f"stage {cfg.name!r}: BCT needs equal embedding widths, but the new model is {embedding_dim}-d "
                   f"and old stage {old_stage!r} is {kernel.shape[0]}-d; set model.embedding_dim={kernel.shape[0]}")
  if kernel.shape[1] > num_classes:
    raise FCTError(f"stage {cfg.name!r}: BCT needs the new classes to extend the old ones, but the old model has "
                   f"{kernel.shape[1]} classes and the new training split {num_classes}")
  old_emb = artifacts.embed(module, variables, source, batch_size=artifacts.eval_batch_size(cfg, ctx.mesh),
                         mesh=ctx.mesh, transform=artifacts.eval_transform(old_cfg))
  artifacts.check_finite_embeddings(old_emb, f"old-model embeddings for BCT in stage {cfg.name!r}")
  old_loss = loss_spec(old_cfg)
  if old_loss["kind"] == "arcface":
    old_emb = old_emb / np.maximum(np.linalg.norm(old_emb, axis=-1, keepdims=True), 1e-12)
  sums, counts = losses.class_feature_sums(features=old_emb, labels=artifacts.source_labels(source),
                                           num_classes=num_classes)
  classifier = np.asarray(losses.bct_extend_classifier(old_classifier=kernel, feature_sums=sums, counts=counts))
  return classifier, old_loss


def run(cfg, stage_dir: str, ctx: artifacts.Context):
  """Trains the backbone and saves ``{params, batch_stats}`` to ``stage_dir/model``."""
  source, info = sources.get_source(cfg.data, cfg.split)
  model = artifacts.build_backbone(cfg, info.num_classes)
  check_head_matches_loss(cfg)  # before any upstream work
  eval_source, eval_labels = common.eval_source(cfg)
  old_classifier = old_loss = None
  if cfg.bct.old:
    old_classifier, old_loss = bct_old_head(cfg, ctx, source, info.num_classes, int(cfg.model.embedding_dim))
    print(f"[{cfg.name}] BCT: influence loss (weight {float(cfg.bct.weight)}, the old model's {old_loss['kind']} "
          f"loss) through the frozen classifier of {cfg.bct.old!r}, extended to {old_classifier.shape[1]} classes "
          "with old-model class means", flush=True)
  task = make_task(cfg, model, info.num_classes, eval_source, eval_labels, ctx.mesh, old_classifier, old_loss)
  return common.train_and_save(cfg, stage_dir, ctx, task, source)
