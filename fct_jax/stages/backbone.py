"""Backbone stage: φ_old or φ_new trained with softmax cross-entropy (+ label smoothing).

The stage config names the training split (``old_train`` / ``new_train``): the old model sees the old classes
only. Periodic evaluation reports retrieval CMC top-1 and mAP of the current embedding on the evaluation split
(query = gallery, self excluded).
"""

import jax
import jax.numpy as jnp

from fct_jax import checkpoint, losses, retrieval, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.stages import common


def make_task(cfg, model, num_classes: int, eval_source=None, eval_labels=None, mesh=None) -> train_lib.Task:
  ls = float(cfg.loss.get("label_smoothing", 0.0))

  def init(rng, batch):
    return model.init({"params": rng}, batch["image"], train=False)

  def loss(params, model_state, frozen, batch, rng, step):
    del frozen, rng, step
    out, updates = model.apply({"params": params, **model_state}, batch["image"], train=True,
                               mutable=["batch_stats"])
    l = losses.softmax_cross_entropy(logits=out["logits"], labels=batch["label"], label_smoothing=ls)
    acc = jnp.mean(jnp.argmax(out["logits"], -1) == batch["label"])
    return l, ({"train_accuracy": acc}, dict(updates))

  evaluate = None
  if eval_source is not None:
    def evaluate(state):
      variables = {"params": state["params"], **state["model_state"]}
      emb = common.embed(model, variables, eval_source, batch_size=common.eval_batch_size(cfg, mesh), mesh=mesh,
                         transform=common.eval_transform(cfg))
      common.check_finite_embeddings(emb, f"stage {cfg.name!r} embeddings")
      r = retrieval.evaluate(emb, emb, eval_labels, eval_labels, query_is_gallery=True, ks=(1,))
      return {"retrieval_top1": r["cmc_top1"], "mAP": r["mAP"]}

  if cfg.augment not in augment.TRAIN_TRANSFORMS:
    raise FCTError(f"unknown augment {cfg.augment!r}; valid: {', '.join(augment.TRAIN_TRANSFORMS)}")
  return train_lib.Task(name=cfg.name, init=init, loss=loss, transform=augment.TRAIN_TRANSFORMS[cfg.augment],
                        evaluate=evaluate)


def run(cfg, stage_dir: str, ctx: common.Context):
  """Trains the backbone and saves ``{params, batch_stats}`` to ``stage_dir/model``."""
  source, info = sources.get_source(cfg.data, cfg.split)
  model = common.build_backbone(cfg, info.num_classes)
  eval_source = eval_labels = None
  if cfg.get("eval_split"):
    eval_source, _ = sources.get_source(cfg.data, cfg.eval_split)
    eval_labels = common.source_labels(eval_source)
  task = make_task(cfg, model, info.num_classes, eval_source, eval_labels, ctx.mesh)
  state, history = train_lib.train(cfg=cfg, workdir=stage_dir, task=task, source=source, mesh=ctx.mesh,
                                   stop_at_step=ctx.stop_at_step)
  if int(state["step"]) < train_lib.steps_for(cfg.train, len(source))[1]:
    return False  # stopped early (preempted); the checkpoint lets a rerun resume
  checkpoint.save_model(stage_dir, {"params": state["params"], **state["model_state"]})
  return True
