"""Side-information stage: trains ψ on data available at old time; the transformation stage loads it frozen.

The paper's side-information kinds (§5.1, Table 6), selected by ``cfg.method``:

* ``simclr`` (the default and the paper's best): backbone + projection head trained with NT-Xent on two
  augmented views per image, over the global batch; no labels. ψ(x) is the backbone embedding, not the
  projection.
* ``autoencoder``: L2 reconstruction; ψ(x) is the bottleneck code.
* ``alt_old``: another old model (same recipe, another seed); ψ(x) is its embedding.
* ``alt_old_mixup``: the same with mixup on images only, one-hot labels.
* ``none`` (zeros) needs no stage: the transformation stage's ``side_info.kind = "none"`` feeds zeros.

``cfg.split`` says which images ψ sees: the old training set by default; Table 6's "SimCLR-ImageNet-1k" row is
``split = new_train`` (its images, still without labels). The side-information width is ``cfg.model.embedding_dim``.

``cfg.input_norm = "image"`` (optional; default ``"none"``) standardises every input image by its own mean and
standard deviation inside ψ (:class:`fct_jax.models.composite.InputStandardized`, like
``tf.image.per_image_standardization``), in training and wherever ψ is computed later, so that ψ is exactly
invariant to global affine intensity changes. On the demo's shapes this matters: a freshly initialised CNN's
features mostly follow the background level, which SimCLR's affine brightness/contrast jitter does not teach away,
and without it ψ ended up encoding the background and the shape/background contrast far more than the shapes
(docs/performance.md has the numbers).

The stage writes ``model/`` (all trained variables, projection head included) and ``config.json`` like every
stage; :func:`fct_jax.artifacts.load_side_info` rebuilds the ψ network from them (and
:func:`fct_jax.artifacts.build_side_model` builds it for training, so both build the same tree).
"""

import jax.numpy as jnp

from fct_jax import artifacts, losses, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.stages import backbone, common

# --------------------------------------------------------------------------------------------- tasks



def simclr_task(cfg, model, evaluate=None) -> train_lib.Task:
  """SimCLR: NT-Xent between the projections of two views, over the global batch."""
  sc = cfg.simclr
  view_kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in sc.views.to_dict().items()}
  transform = augment.two_view_transform(sc.augment, cfg.data, **view_kwargs)
  temperature = float(sc.temperature)

  def init(rng, batch):
    return model.init({"params": rng}, batch["view1"], train=False)

  def loss(params, model_state, frozen, batch, rng, step):
    del frozen, rng, step
    b = batch["view1"].shape[0]
    # One forward pass over both views: BatchNorm statistics over all 2B images of the global batch (SimCLR's
    # global BN, which keeps the model from telling views apart by per-device statistics).
    x = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
    out, updates = model.apply({"params": params, **model_state}, x, train=True, mutable=["batch_stats"])
    z1, z2 = out["projection"][:b], out["projection"][b:]
    l = losses.nt_xent_loss(z1=z1, z2=z2, temperature=temperature)
    return l, ({"contrastive_accuracy": contrastive_accuracy(z1, z2)}, dict(updates))

  return train_lib.Task(name=cfg.name, init=init, loss=loss, transform=transform, keys=("view1", "view2"),
                        evaluate=evaluate)


def contrastive_accuracy(z1, z2):
  """Fraction of the 2B anchors whose nearest other projection (cosine) is their positive view."""
  b = z1.shape[0]
  z = jnp.concatenate([z1, z2]).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  sim = jnp.where(jnp.eye(2 * b, dtype=bool), -jnp.inf, z @ z.T)
  positive = jnp.concatenate([jnp.arange(b, 2 * b), jnp.arange(b)])
  return jnp.mean(jnp.argmax(sim, axis=-1) == positive)


def autoencoder_task(cfg, model, evaluate=None) -> train_lib.Task:
  """Autoencoder: mean squared reconstruction error of the (normalised, augmented) input image."""
  transform = augment.train_transform(cfg.augment, cfg.data)

  def init(rng, batch):
    return model.init({"params": rng}, batch["image"], train=False)

  def loss(params, model_state, frozen, batch, rng, step):
    del frozen, rng, step
    out, updates = model.apply({"params": params, **model_state}, batch["image"], train=True,
                               mutable=["batch_stats"])
    if "reconstruction" not in out:
      raise FCTError(f"stage {cfg.name!r}: model {cfg.model.name!r} has no 'reconstruction' output; the "
                     "autoencoder method needs an autoencoder model (e.g. 'autoencoder')")
    return losses.mse_loss(pred=out["reconstruction"], target=batch["image"]), ({}, dict(updates))

  return train_lib.Task(name=cfg.name, init=init, loss=loss, transform=transform, keys=("image",),
                        evaluate=evaluate)


def mixup_task(cfg, model, num_classes: int, evaluate=None) -> train_lib.Task:
  """Alternate old model with mixup on the images only; targets stay the original one-hot labels (paper §5.1).

  With ``loss.kind="arcface"`` (an ArcFace head) the mixed images are trained with the ArcFace loss on their
  original labels, like the old model they stand in for."""
  backbone.check_head_matches_loss(cfg)
  spec = backbone.loss_spec(cfg)
  transform = augment.train_transform(cfg.augment, cfg.data)
  alpha = float(cfg.mixup.alpha)
  ls = float(cfg.loss.label_smoothing)

  def init(rng, batch):
    return model.init({"params": rng}, batch["image"], train=False)

  def loss(params, model_state, frozen, batch, rng, step):
    del frozen, step
    images, targets = losses.mixup(rng=rng, images=batch["image"], labels=batch["label"], num_classes=num_classes,
                                   alpha=alpha, mix_labels=False)
    if ls:
      targets = targets * (1.0 - ls) + ls / num_classes
    out, updates = model.apply({"params": params, **model_state}, images, train=True, mutable=["batch_stats"])
    acc = jnp.mean(jnp.argmax(out["logits"], -1) == batch["label"])
    if spec["kind"] == "arcface":
      l = losses.classification_loss(logits=out["logits"], labels=batch["label"], label_smoothing=ls, **spec)
    else:
      l = losses.soft_cross_entropy(logits=out["logits"], targets=targets)
    return l, ({"train_accuracy": acc}, dict(updates))

  return train_lib.Task(name=cfg.name, init=init, loss=loss, transform=transform, evaluate=evaluate)


def make_task(cfg, model, eval_source=None, eval_labels=None, mesh=None) -> train_lib.Task:
  """The :class:`train_lib.Task` of a side-info stage config."""
  artifacts.check_side_method(cfg)
  evaluate = None  # how well ψ alone retrieves (informative only)
  if eval_source is not None:
    evaluate = common.retrieval_eval(cfg, *artifacts.side_encoder(cfg), eval_source, eval_labels, mesh,
                                     "side-information")
  if cfg.method == "simclr":
    return simclr_task(cfg, model, evaluate)
  if cfg.method == "autoencoder":
    return autoencoder_task(cfg, model, evaluate)
  num_classes = artifacts.side_num_classes(cfg)
  if cfg.method == "alt_old_mixup":
    return mixup_task(cfg, model, num_classes, evaluate)
  # alt_old: exactly the backbone recipe; only the seed (and so init and data order) differs from φ_old.
  task = backbone.make_task(cfg, model, num_classes)
  task.evaluate = evaluate
  return task


def run(cfg, stage_dir: str, ctx: artifacts.Context):
  """Trains ψ and saves its variables to ``stage_dir/model``."""
  model = artifacts.build_side_model(cfg)
  source, _ = sources.get_source(cfg.data, cfg.split)
  eval_source, eval_labels = common.eval_source(cfg)
  task = make_task(cfg, model, eval_source, eval_labels, ctx.mesh)
  return common.train_and_save(cfg, stage_dir, ctx, task, source)
