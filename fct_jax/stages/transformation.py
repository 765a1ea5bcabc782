"""Transformation stage: h(φ_old(x), ψ(x)) ≈ φ_new(x), trained with the L2 (MSE) loss on the new training set.

φ_old and φ_new (and ψ, when side-information is configured) are loaded frozen from their stage workdirs and
rebuilt from the configs that trained them. Features are computed online from augmented images every step, as in
ml-fct (a cached-feature mode is planned separately).

Side-information (``cfg.side_info``): ``kind="none"`` feeds nothing (``dim=0``: the side branch is absent and its
half of the mixer input is zeros, the paper's "no side-info" row).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from fct_jax import checkpoint, losses, models, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.stages import common

SIDE_INFO_KINDS = ("none",)


def build_h(cfg, old_dim: int, new_dim: int):
  side_dim = int(cfg.side_info.dim) if cfg.side_info.kind != "none" else 0
  kw = common.model_kwargs(cfg.model)
  return models.get_model(cfg.model.name, old_dim=old_dim, side_dim=side_dim, new_dim=new_dim, **kw)


def side_info_fn(cfg):
  """Returns ``fn(frozen, images) -> ψ [B, side_dim]``."""
  kind = cfg.side_info.kind
  if kind not in SIDE_INFO_KINDS:
    raise FCTError(f"unknown side_info.kind {kind!r}; valid: {', '.join(SIDE_INFO_KINDS)}")
  return lambda frozen, images: jnp.zeros((images.shape[0], 0), jnp.float32)


def load_frozen(cfg, ctx):
  """Loads φ_old, φ_new (and ψ): returns (modules, frozen variables, dims)."""
  old_model, old_vars, old_cfg = common.load_backbone(ctx, cfg.old, cfg.name)
  new_model, new_vars, new_cfg = common.load_backbone(ctx, cfg.new, cfg.name)
  return ({"old": old_model, "new": new_model}, {"old": old_vars, "new": new_vars},
          {"old": int(old_cfg.model.embedding_dim), "new": int(new_cfg.model.embedding_dim)})


def run(cfg, stage_dir: str, ctx: common.Context):
  """Trains h and saves its variables to ``stage_dir/model``."""
  modules, frozen, dims = load_frozen(cfg, ctx)
  side = side_info_fn(cfg)
  h = build_h(cfg, dims["old"], dims["new"])
  source, _ = sources.get_source(cfg.data, cfg.split)
  _, total = train_lib.steps_for(cfg.train, len(source))
  # ml-fct: BatchNorm of h is switched to eval mode for the second half of training (switch_mode_to_eval).
  switch_step = int(round(float(cfg.get("bn_eval_after", 0.5)) * total))

  def features(frozen, images):
    old = modules["old"].apply(frozen["old"], images, train=False)["embedding"]
    new = modules["new"].apply(frozen["new"], images, train=False)["embedding"]
    return jax.lax.stop_gradient((old, side(frozen, images), new))

  def init(rng, batch):
    old, psi, _ = jax.eval_shape(lambda: features(frozen, batch["image"]))
    return h.init({"params": rng}, jnp.zeros(old.shape), jnp.zeros(psi.shape), train=False)

  def loss(params, model_state, frz, batch, rng, step):
    del rng
    old, psi, new = features(frz, batch["image"])

    def train_mode():
      out, upd = h.apply({"params": params, **model_state}, old, psi, train=True, mutable=["batch_stats"])
      return out["embedding"], unfreeze(upd)

    def eval_mode():
      return h.apply({"params": params, **model_state}, old, psi, train=False)["embedding"], unfreeze(model_state)

    pred, new_state = jax.lax.cond(step < switch_step, train_mode, eval_mode)
    return losses.l2_transformation_loss(pred=pred, target=new), ({}, new_state)

  if cfg.augment not in augment.TRAIN_TRANSFORMS:
    raise FCTError(f"unknown augment {cfg.augment!r}; valid: {', '.join(augment.TRAIN_TRANSFORMS)}")
  task = train_lib.Task(name=cfg.name, init=init, loss=loss, frozen=frozen, keys=("image",),
                        transform=augment.TRAIN_TRANSFORMS[cfg.augment])
  state, _ = train_lib.train(cfg=cfg, workdir=stage_dir, task=task, source=source, mesh=ctx.mesh,
                             stop_at_step=ctx.stop_at_step)
  if int(state["step"]) < total:
    return False
  checkpoint.save_model(stage_dir, {"params": state["params"], **state["model_state"]})
  return True


def load_h(ctx, stage: str, needed_by: str):
  """``(apply_fn(old, side) -> new-space embedding, cfg, side_fn, frozen)`` of a finished transformation stage."""
  cfg, variables = common.load_stage(ctx, stage, needed_by)
  if cfg.kind != "transformation":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a transformation stage, not {cfg.kind!r}")
  modules, frozen, dims = load_frozen(cfg, ctx)
  h = build_h(cfg, dims["old"], dims["new"])
  apply = jax.jit(lambda v, old, psi: h.apply(v, old, psi, train=False)["embedding"])

  def transform(old: np.ndarray, psi: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    outs = [np.asarray(apply(variables, old[i:i + batch_size], psi[i:i + batch_size]))
            for i in range(0, len(old), batch_size)]
    return np.concatenate(outs)

  return transform, cfg
