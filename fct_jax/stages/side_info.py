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
standard deviation inside ψ (:class:`InputStandardized`, like ``tf.image.per_image_standardization``), in training
and wherever ψ is computed later, so that ψ is exactly invariant to global affine intensity changes. On the demo's
shapes this matters: a freshly initialised CNN's features mostly follow the background level, which SimCLR's
affine brightness/contrast jitter does not teach away, and without it ψ ended up encoding the background and the
shape/background contrast far more than the shapes (configs/demo.py has the numbers).

The stage writes ``model/`` (all trained variables, projection head included) and ``config.json`` like every
stage; :func:`load` rebuilds the ψ network from them.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fct_jax import losses, models, retrieval, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.stages import backbone, common

METHODS = ("simclr", "autoencoder", "alt_old", "alt_old_mixup")
# The methods that train a classifier (an alternate old model): their head and loss must match (`backbone`).
CLASSIFIER_METHODS = ("alt_old", "alt_old_mixup")
INPUT_NORMS = ("none", "image")


class SimCLRModel(nn.Module):
  """Backbone ``encoder`` + ``projection`` head; returns the encoder's outputs plus ``projection`` [B, P]."""
  encoder: nn.Module
  projection: nn.Module

  def __call__(self, x, train: bool = False):
    out = dict(self.encoder(x, train=train))
    out["projection"] = self.projection(out["embedding"], train=train)
    return out


class InputStandardized(nn.Module):
  """``encoder`` on each image standardised by its own mean and standard deviation (over pixels and channels).

  No parameters: the wrapped encoder's variables sit under ``encoder``. ``eps`` guards flat images.
  """
  encoder: nn.Module
  eps: float = 1e-3

  def __call__(self, x, train: bool = False):
    x = x.astype(jnp.float32)
    mu = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    sd = jnp.std(x, axis=(1, 2, 3), keepdims=True)
    return self.encoder((x - mu) / (sd + self.eps), train=train)


def _check_method(cfg):
  if cfg.get("method") not in METHODS:
    raise FCTError(f"stage {cfg.name!r}: unknown side-info method {cfg.get('method')!r}; valid: "
                   f"{', '.join(METHODS)} (no side-information needs no stage: side_info.kind='none' in the "
                   f"transformation)")


def _num_classes(cfg) -> int:
  """Classifier width: the split's classes for the alternate old models, none for SimCLR / autoencoder."""
  if cfg.method in CLASSIFIER_METHODS:
    return sources.get_source(cfg.data, cfg.split)[1].num_classes
  return 0


def build_model(cfg):
  """The trained module of a side-info stage config (for SimCLR: encoder + projection head)."""
  _check_method(cfg)
  try:
    net = models.get_model(cfg.model.name, num_classes=_num_classes(cfg), **common.model_kwargs(cfg.model))
  except (ValueError, TypeError) as e:
    raise FCTError(f"stage {cfg.name!r}: cannot build model {cfg.model.name!r}: {e}") from e
  input_norm = cfg.get("input_norm", "none") or "none"
  if input_norm not in INPUT_NORMS:
    raise FCTError(f"stage {cfg.name!r}: unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
  if input_norm == "image":
    net = InputStandardized(encoder=net)
  if cfg.method != "simclr":
    return net
  p = cfg.simclr.projection
  head = models.get_head("simclr_projection", hidden_dim=int(p.hidden_dim), out_dim=int(p.out_dim),
                         num_layers=int(p.num_layers))
  return SimCLRModel(encoder=net, projection=head)


def encoder_variables(cfg, variables):
  """The variables of the ψ network (for SimCLR: the ``encoder`` sub-tree, without the projection head)."""
  if cfg.method != "simclr":
    return variables
  return {col: tree["encoder"] for col, tree in variables.items() if "encoder" in tree}


def encoder_module(cfg):
  """The ψ network alone: ``module.apply(encoder_variables(...), images, train=False)["embedding"]`` is ψ."""
  model = build_model(cfg)
  return model.encoder if cfg.method == "simclr" else model


# --------------------------------------------------------------------------------------------- tasks


def _embedding_eval(cfg, module_fn, eval_source, eval_labels, mesh):
  """Periodic retrieval top-1 / mAP of ψ on the eval split (how well ψ alone retrieves; informative only)."""
  if eval_source is None:
    return None

  def evaluate(state):
    variables = module_fn({"params": state["params"], **state["model_state"]})
    emb = common.embed(encoder_module(cfg), variables, eval_source, batch_size=common.eval_batch_size(cfg, mesh),
                       mesh=mesh, transform=common.eval_transform(cfg))
    common.check_finite_embeddings(emb, f"stage {cfg.name!r} side-information")
    r = retrieval.evaluate(emb, emb, eval_labels, eval_labels, query_is_gallery=True, ks=(1,))
    return {"retrieval_top1": r["cmc_top1"], "mAP": r["mAP"]}

  return evaluate


def simclr_task(cfg, model, evaluate=None) -> train_lib.Task:
  """SimCLR: NT-Xent between the projections of two views, over the global batch."""
  sc = cfg.simclr
  if sc.augment not in augment.TWO_VIEW_TRANSFORMS:
    raise FCTError(f"unknown simclr.augment {sc.augment!r}; valid: {', '.join(augment.TWO_VIEW_TRANSFORMS)}")
  view_kwargs = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in sc.views.to_dict().items()}
  transform = functools.partial(augment.TWO_VIEW_TRANSFORMS[sc.augment], **view_kwargs)
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
  transform = _train_transform(cfg)

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
  transform = _train_transform(cfg)
  alpha = float(cfg.mixup.alpha)
  ls = float(cfg.loss.get("label_smoothing", 0.0))

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


def _train_transform(cfg):
  if cfg.augment not in augment.TRAIN_TRANSFORMS:
    raise FCTError(f"unknown augment {cfg.augment!r}; valid: {', '.join(augment.TRAIN_TRANSFORMS)}")
  return augment.TRAIN_TRANSFORMS[cfg.augment]


def make_task(cfg, model, eval_source=None, eval_labels=None, mesh=None) -> train_lib.Task:
  """The :class:`train_lib.Task` of a side-info stage config."""
  _check_method(cfg)
  evaluate = _embedding_eval(cfg, functools.partial(encoder_variables, cfg), eval_source, eval_labels, mesh)
  if cfg.method == "simclr":
    return simclr_task(cfg, model, evaluate)
  if cfg.method == "autoencoder":
    return autoencoder_task(cfg, model, evaluate)
  num_classes = _num_classes(cfg)
  if cfg.method == "alt_old_mixup":
    return mixup_task(cfg, model, num_classes, evaluate)
  # alt_old: exactly the backbone recipe; only the seed (and so init and data order) differs from φ_old.
  task = backbone.make_task(cfg, model, num_classes)
  task.evaluate = evaluate
  return task


def run(cfg, stage_dir: str, ctx: common.Context):
  """Trains ψ and saves its variables to ``stage_dir/model``."""
  model = build_model(cfg)
  source, _ = sources.get_source(cfg.data, cfg.split)
  eval_source, eval_labels = common.eval_source(cfg)
  task = make_task(cfg, model, eval_source, eval_labels, ctx.mesh)
  return common.train_and_save(cfg, stage_dir, ctx, task, source)


# --------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class SideInfo:
  """A frozen side-information model as later stages use it.

  Attributes:
    method: the side-info kind (``"none"`` or one of :data:`METHODS`).
    dim: width of ψ.
    apply: ``apply(variables, images [B, H, W, 3]) -> ψ [B, dim] float32`` (eval mode; jit-able).
    variables: the frozen ψ variables (``{}`` for ``none``).
    stage: the stage it was loaded from (``""`` for ``none``).
  """
  method: str
  dim: int
  apply: Callable
  variables: Any
  stage: str = ""

  @property
  def key(self) -> str:
    """Names the ψ this model computes (its stage, or ``none<dim>``): callers cache ψ of images under it."""
    return self.stage or f"none{self.dim}"

  def embed(self, source, *, batch_size: int, mesh=None, transform=None) -> np.ndarray:
    """ψ [N, dim] of every image of ``source`` in order, with the evaluation ``transform`` (default: the demo's)."""
    if self.method == "none":
      return np.zeros((len(source), self.dim), np.float32)
    out = train_lib.predict(lambda v, b: {"psi": self.apply(v, b["image"])}, self.variables, source,
                            batch_size=batch_size, transform=transform or augment.eval_transform, mesh=mesh)
    return out["psi"]


def zeros(dim: int) -> SideInfo:
  """The paper's "no side-information": ψ(x) = 0 of width ``dim`` (0 = the side branch of h is absent)."""
  return SideInfo("none", int(dim), lambda v, images: jnp.zeros((images.shape[0], int(dim)), jnp.float32), {})


def load(ctx: common.Context, stage: str, needed_by: str) -> SideInfo:
  """Loads a finished side-info stage frozen, rebuilt from the config it was trained with."""
  cfg, variables = common.load_stage(ctx, stage, needed_by)
  if cfg.kind != "side_info":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a side_info stage, not {cfg.kind!r}")
  module = encoder_module(cfg)
  variables = encoder_variables(cfg, variables)

  def apply(v, images):
    return module.apply(v, images, train=False)["embedding"].astype(jnp.float32)

  _, info = sources.get_source(cfg.data, cfg.split)
  s = info.image_size
  shape = jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  return SideInfo(cfg.method, int(shape.shape[-1]), apply, variables, stage)
