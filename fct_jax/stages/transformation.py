"""Transformation stage: h(φ_old(x), ψ(x)) ≈ φ_new(x), trained with the L2 (MSE) loss on the new training set.

φ_old and φ_new (and ψ, when side-information is configured) are loaded frozen from their stage workdirs and
rebuilt from the configs that trained them. Features are computed online from augmented images every step, as in
ml-fct, or — with ``cache_features=True`` and no augmentation — once before training (the log says which ran).

Side-information (``cfg.side_info``: ``kind``, ``dim``, ``stage``): ``kind="none"`` feeds ψ(x) = 0 (with
``dim=0`` the side branch is absent and its half of the mixer input is zeros, the paper's "no side-info" row); any
other kind (``simclr``, ``autoencoder``, ``alt_old``, ``alt_old_mixup``) loads the finished side_info stage named
``stage`` frozen. Its method must equal ``kind`` and its ψ width must equal ``dim`` (the width h is built with),
otherwise the stage stops with a one-line error before training.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from fct_jax import checkpoint, losses, models, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.stages import common, side_info

SIDE_INFO_KINDS = ("none",) + side_info.METHODS


def build_h(cfg, old_dim: int, new_dim: int):
  kw = common.model_kwargs(cfg.model)
  return models.get_model(cfg.model.name, old_dim=old_dim, side_dim=int(cfg.side_info.dim), new_dim=new_dim, **kw)


def load_side_info(cfg, ctx) -> side_info.SideInfo:
  """The frozen ψ a transformation config asks for, checked against it (kind and width)."""
  si = cfg.side_info
  kind, dim = si.kind, int(si.dim)
  if kind not in SIDE_INFO_KINDS:
    raise FCTError(f"unknown side_info.kind {kind!r}; valid: {', '.join(SIDE_INFO_KINDS)}")
  if kind == "none":
    return side_info.zeros(dim)
  if not si.get("stage"):
    raise FCTError(f"stage {cfg.name!r}: side_info.kind={kind!r} needs side_info.stage, the side_info stage to load")
  psi = side_info.load(ctx, si.stage, cfg.name)
  if psi.method != kind:
    raise FCTError(f"stage {cfg.name!r}: side_info.kind is {kind!r} but stage {si.stage!r} trained {psi.method!r}")
  if psi.dim != dim:
    raise FCTError(f"stage {cfg.name!r}: side-info width mismatch: stage {si.stage!r} gives {psi.dim}-d ψ but "
                   f"side_info.dim={dim} (the h model's side width); set side_info.dim={psi.dim}")
  return psi


def load_frozen(cfg, ctx):
  """Loads φ_old, φ_new and ψ: returns (modules, frozen variables, dims, side-info)."""
  old_model, old_vars, old_cfg = common.load_backbone(ctx, cfg.old, cfg.name)
  new_model, new_vars, new_cfg = common.load_backbone(ctx, cfg.new, cfg.name)
  psi = load_side_info(cfg, ctx)
  return ({"old": old_model, "new": new_model}, {"old": old_vars, "new": new_vars, "side": psi.variables},
          {"old": int(old_cfg.model.embedding_dim), "new": int(new_cfg.model.embedding_dim)}, psi)


def run(cfg, stage_dir: str, ctx: common.Context):
  """Trains h and saves its variables to ``stage_dir/model``."""
  modules, frozen, dims, side = load_frozen(cfg, ctx)
  h = build_h(cfg, dims["old"], dims["new"])
  source, _ = sources.get_source(cfg.data, cfg.split)
  _, total = train_lib.steps_for(cfg.train, len(source))
  # ml-fct: BatchNorm of h is switched to eval mode for the second half of training (switch_mode_to_eval).
  switch_step = int(round(float(cfg.get("bn_eval_after", 0.5)) * total))

  def features(frozen, images):
    old = modules["old"].apply(frozen["old"], images, train=False)["embedding"]
    new = modules["new"].apply(frozen["new"], images, train=False)["embedding"]
    return jax.lax.stop_gradient((old, side.apply(frozen["side"], images), new))

  if cfg.augment not in augment.TRAIN_TRANSFORMS:
    raise FCTError(f"unknown augment {cfg.augment!r}; valid: {', '.join(augment.TRAIN_TRANSFORMS)}")
  if cfg.get("cache_features", False):
    # Cached-feature mode (our addition; ml-fct recomputes features every step): without augmentation the
    # frozen models' outputs are a fixed function of each image, so one pass over the split gives exactly the
    # features the online mode would compute, and h then trains on vectors — much faster.
    if cfg.augment != "none":
      raise FCTError(f"stage {cfg.name!r}: cache_features needs augment='none' (cached features are of "
                     f"un-augmented images), got augment={cfg.augment!r}")
    print(f"[{cfg.name}] caching φ_old, ψ ({side.method}), φ_new features of {len(source)} images", flush=True)
    feats = train_lib.predict(lambda v, b: dict(zip(("old", "psi", "new"), features(v, b["image"]))), frozen,
                              source, batch_size=common.eval_batch_size(cfg, ctx.mesh),
                              transform=augment.eval_transform, mesh=ctx.mesh)
    train_source, task_frozen, keys = sources.ArraySource(feats), None, ("old", "psi", "new")
    batch_features = lambda frz, batch: (batch["old"], batch["psi"], batch["new"])
    transform = lambda example, rng: example
  else:
    print(f"[{cfg.name}] φ_old, ψ ({side.method}), φ_new features computed online every step", flush=True)
    train_source, task_frozen, keys = source, frozen, ("image",)
    batch_features = lambda frz, batch: features(frz, batch["image"])
    transform = augment.TRAIN_TRANSFORMS[cfg.augment]

  def init(rng, batch):
    old, psi, _ = jax.eval_shape(lambda: batch_features(frozen, batch))
    return h.init({"params": rng}, jnp.zeros(old.shape), jnp.zeros(psi.shape), train=False)

  def loss(params, model_state, frz, batch, rng, step):
    del rng
    old, psi, new = batch_features(frz, batch)

    def train_mode():
      out, upd = h.apply({"params": params, **model_state}, old, psi, train=True, mutable=["batch_stats"])
      return out["embedding"], unfreeze(upd)

    def eval_mode():
      return h.apply({"params": params, **model_state}, old, psi, train=False)["embedding"], unfreeze(model_state)

    pred, new_state = jax.lax.cond(step < switch_step, train_mode, eval_mode)
    return losses.l2_transformation_loss(pred=pred, target=new), ({}, new_state)

  task = train_lib.Task(name=cfg.name, init=init, loss=loss, frozen=task_frozen, keys=keys, transform=transform)
  state, _ = train_lib.train(cfg=cfg, workdir=stage_dir, task=task, source=train_source, mesh=ctx.mesh,
                             stop_at_step=ctx.stop_at_step)
  if int(state["step"]) < total:
    return False
  checkpoint.save_model(stage_dir, {"params": state["params"], **state["model_state"]})
  return True


def load_h(ctx, stage: str, needed_by: str):
  """A finished transformation stage: ``(transform, cfg, side_info)``.

  ``transform(old [N, d_old], psi [N, d_side]) -> [N, d_new]`` numpy (h in eval mode, in batches);
  ``side_info`` is its frozen :class:`side_info.SideInfo` (``.embed(source, ...)`` computes ψ for images).
  """
  cfg, variables = common.load_stage(ctx, stage, needed_by)
  if cfg.kind != "transformation":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a transformation stage, not {cfg.kind!r}")
  _, _, dims, psi = load_frozen(cfg, ctx)
  h = build_h(cfg, dims["old"], dims["new"])
  apply = jax.jit(lambda v, old, psi: h.apply(v, old, psi, train=False)["embedding"])

  def transform(old: np.ndarray, psi: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    outs = [np.asarray(apply(variables, old[i:i + batch_size], psi[i:i + batch_size]))
            for i in range(0, len(old), batch_size)]
    return np.concatenate(outs)

  return transform, cfg, psi
