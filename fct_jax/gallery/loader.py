"""The model versions of stored vectors, and a finished transformation stage as a gallery :class:`Transform`.

A *model version* is :func:`fct_jax.artifacts.stage_fingerprint` of a finished stage directory. Stores record the
versions of the models that produced their vectors, and an upgrade refuses a store whose versions differ from
those the transformation was trained against — retraining a stage under the same name changes its fingerprint,
so a stale gallery is caught. Stages are read through :mod:`fct_jax.artifacts` (h's shapes are checked there).
"""

import os

import jax

from fct_jax import artifacts
from fct_jax.errors import FCTError
from fct_jax.gallery.upgrade import Transform


def embedding_model(ctx: artifacts.Context, stage: str, needed_by: str) -> dict:
  """The ``model.embedding`` record of vectors from backbone stage ``stage``."""
  cfg = artifacts.stage_config(ctx, stage, needed_by)
  if cfg.kind != "backbone":
    raise FCTError(f"{needed_by}: stage {stage!r} is a {cfg.kind!r} stage, not a backbone")
  return {"stage": stage, "fingerprint": artifacts.stage_fingerprint(os.path.join(ctx.workdir, stage)),
          "dim": artifacts.upstream_width(ctx, stage, needed_by, cfg)}


def side_info_model(ctx: artifacts.Context, kind: str, stage: str, dim: int, needed_by: str) -> dict:
  """The ``model.side_info`` record: a trained side_info stage, or ``none`` (zeros of width ``dim``)."""
  if kind == "none":
    return {"kind": "none", "stage": "", "fingerprint": f"none:{int(dim)}", "dim": int(dim)}
  cfg = artifacts.stage_config(ctx, stage, needed_by)
  if cfg.kind != "side_info":
    raise FCTError(f"{needed_by}: stage {stage!r} is a {cfg.kind!r} stage, not side_info")
  return {"kind": cfg.method, "stage": stage,
          "fingerprint": artifacts.stage_fingerprint(os.path.join(ctx.workdir, stage)),
          "dim": artifacts.upstream_width(ctx, stage, needed_by, cfg)}


def vectors_embedding_model(name: str, dim: int) -> dict:
  """The ``model.embedding`` record of stored vectors made by an outside model the user names (``--old-model``,
  ``data.old_model``): no stage to fingerprint, so the name is the model version (``vectors:NAME``)."""
  return {"stage": name, "fingerprint": f"vectors:{name}", "dim": int(dim)}


def vectors_side_info_model(name: str, dim: int) -> dict:
  """The ``model.side_info`` record of stored ψ made by an outside model named ``name`` (kind ``stored``)."""
  return {"kind": "stored", "stage": name, "fingerprint": f"vectors:{name}", "dim": int(dim)}


def split_stage_dir(stage_dir: str):
  """``EXPERIMENT_DIR/NAME`` → ``(EXPERIMENT_DIR, NAME)``."""
  stage_dir = os.path.abspath(str(stage_dir).rstrip("/"))
  return os.path.dirname(stage_dir), os.path.basename(stage_dir)


def load_transformation(stage_dir: str, *, needed_by: str = "gallery upgrade") -> Transform:
  """A finished transformation stage directory as a :class:`Transform` that upgrades stored φ_old, ψ to φ_new.

  Only an h (its target a backbone) upgrades a gallery; ψ is carried over unchanged. A g (target: the next ψ,
  for update sequences) is refused with a one-line error. The frozen image models are not loaded.

  FastFill's h (``method="fastfill"``) also returns s = log σ² (``Transform.sigma_dim`` > 0), which the upgrade
  stores. An h trained with ``side_info.kind="old"`` (ψ := φ_old) reads the stored φ_old as its ψ too, so its
  gallery needs no stored side-information: it upgrades a store built with ``--side-info none`` (0-d ψ).

  A transformation trained on stored vectors (``data.name == "vectors"``) maps between the models its data block
  names (``old_model``, ``new_model``, ``side_model``): it upgrades a store built with ``build --from-vectors`` and
  those names (:func:`vectors_embedding_model`, :func:`vectors_side_info_model`).
  """
  exp, name = split_stage_dir(stage_dir)
  ctx = artifacts.Context(workdir=exp)
  t = artifacts.load_transformation(ctx, name, needed_by)
  if t.target_kind != "backbone":
    raise FCTError(f"{stage_dir} is a g (its target {t.cfg.new!r} is side-information); a gallery upgrade "
                   "applies an h, whose target is a backbone")
  si = t.cfg.side_info
  psi_is_old = si.kind == "old"
  # ψ := φ_old is not stored a second time: the store holds no side-information, h gets φ_old twice.
  side_dim = 0 if psi_is_old else t.dims["side"]
  data = t.cfg.data
  from_vectors = data.name == "vectors"
  if from_vectors and si.kind not in ("none", "old"):
    side = vectors_side_info_model(data.side_model, side_dim)
  else:
    side = side_info_model(ctx, "none" if psi_is_old else si.kind, si.stage, side_dim, name)
  if side["dim"] != side_dim:
    raise FCTError(f"transformation {name!r}: side_info.dim={t.dims['side']} but stage {si.stage!r} gives "
                   f"{side['dim']}-d ψ")
  h, sigma_dim = t.module, t.sigma_dim

  def apply(v, old_emb, side_emb):
    psi = old_emb if psi_is_old else (side_emb if side_dim else None)
    out = h.apply(v, old_emb, psi, train=False)
    return (out["embedding"], None) + ((out["log_var"],) if sigma_dim else ())

  if from_vectors:
    old, new = (vectors_embedding_model(data.old_model, t.dims["old"]),
                vectors_embedding_model(data.new_model, t.dims["new"]))
  else:
    old, new = embedding_model(ctx, t.cfg.old, name), embedding_model(ctx, t.cfg.new, name)
  return Transform(name=name, apply=apply, variables=jax.tree.map(lambda x: x, t.variables), old_dim=t.dims["old"],
                   side_dim=side_dim, new_dim=t.dims["new"],
                   fingerprint=artifacts.stage_fingerprint(os.path.join(exp, name)),
                   expects={"embedding": old, "side_info": side}, produces={"embedding": new, "side_info": side},
                   sigma_dim=sigma_dim)
