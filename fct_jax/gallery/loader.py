"""Model versions and the transformation loader, on top of the stages' public functions.

A *model version* is a fingerprint of a finished stage directory: SHA-256 over its ``config.json`` and every file
of its saved ``model/``. Stores record the fingerprints of the models that produced their vectors, and an
upgrade refuses a store whose fingerprints differ from those the transformation was trained against — retraining
a stage under the same name changes its fingerprint, so a stale gallery is caught.
"""

import hashlib
import os

import jax
from etils import epath

from fct_jax import checkpoint
from fct_jax.errors import FCTError
from fct_jax.gallery.upgrade import Transform


def _files(d):
  """Every file under ``d`` (epath forbids ``rglob`` on buckets, so walk level by level)."""
  if not d.exists():
    return []
  out = []
  for p in d.iterdir():
    out.extend(_files(p) if p.is_dir() else [p])
  return out


def stage_fingerprint(stage_dir: str) -> str:
  """SHA-256 of a finished stage's ``config.json`` and ``model/`` files (paths and contents, sorted)."""
  root = epath.Path(stage_dir)
  if not (root / "config.json").exists():
    raise FCTError(f"{stage_dir} is not a stage directory (no config.json)")
  h = hashlib.sha256()
  files = [root / "config.json"] + sorted(_files(root / "model"), key=str)
  for p in files:
    h.update(str(p.relative_to(root)).encode() + b"\0")
    h.update(p.read_bytes())
    h.update(b"\0")
  return h.hexdigest()


def _stage_dir(experiment_dir: str, stage: str, needed_by: str) -> str:
  from fct_jax.stages import common  # pylint: disable=g-import-not-at-top  (ml_collections; CLI only)
  return common.upstream_dir(common.Context(workdir=experiment_dir), stage, needed_by)


def _stage_config(experiment_dir: str, stage: str, needed_by: str) -> dict:
  return checkpoint.read_json(os.path.join(_stage_dir(experiment_dir, stage, needed_by), "config.json"))


def embedding_model(experiment_dir: str, stage: str, needed_by: str) -> dict:
  """The ``model.embedding`` record of vectors from backbone stage ``stage``."""
  d = _stage_dir(experiment_dir, stage, needed_by)
  cfg = checkpoint.read_json(os.path.join(d, "config.json"))
  if cfg.get("kind") != "backbone":
    raise FCTError(f"{needed_by}: stage {stage!r} is a {cfg.get('kind')!r} stage, not a backbone")
  return {"stage": stage, "fingerprint": stage_fingerprint(d), "dim": int(cfg["model"]["embedding_dim"])}


def side_info_model(experiment_dir: str, kind: str, stage: str, dim: int, needed_by: str) -> dict:
  """The ``model.side_info`` record: a trained side_info stage, or ``none`` (zeros of width ``dim``)."""
  if kind == "none":
    return {"kind": "none", "stage": "", "fingerprint": f"none:{int(dim)}", "dim": int(dim)}
  d = _stage_dir(experiment_dir, stage, needed_by)
  cfg = checkpoint.read_json(os.path.join(d, "config.json"))
  if cfg.get("kind") != "side_info":
    raise FCTError(f"{needed_by}: stage {stage!r} is a {cfg.get('kind')!r} stage, not side_info")
  return {"kind": cfg["method"], "stage": stage, "fingerprint": stage_fingerprint(d),
          "dim": int(cfg["model"]["embedding_dim"])}


def split_stage_dir(stage_dir: str):
  """``EXPERIMENT_DIR/NAME`` → ``(EXPERIMENT_DIR, NAME)``."""
  stage_dir = os.path.abspath(str(stage_dir).rstrip("/"))
  return os.path.dirname(stage_dir), os.path.basename(stage_dir)


def load_transformation(stage_dir: str, *, needed_by: str = "gallery upgrade") -> Transform:
  """A finished transformation stage directory as a :class:`Transform` (h in eval mode, no g).

  The h module is rebuilt with :func:`fct_jax.stages.transformation.build_h` from the stage's saved config; the
  frozen image models are not loaded (only their configs and fingerprints are read).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fct_jax.stages import common, transformation  # pylint: disable=g-import-not-at-top
  exp, name = split_stage_dir(stage_dir)
  ctx = common.Context(workdir=exp)
  cfg, variables = common.load_stage(ctx, name, needed_by)
  if cfg.get("kind") != "transformation":
    raise FCTError(f"{stage_dir} is a {cfg.get('kind')!r} stage, not a transformation stage")
  old = embedding_model(exp, cfg.old, name)
  new = embedding_model(exp, cfg.new, name)
  si = cfg.get("side_info", ml_collections.ConfigDict({"kind": "none", "dim": 0, "stage": ""}))
  side = side_info_model(exp, si.kind, si.get("stage", ""), int(si.dim), name)
  if side["dim"] != int(si.dim):
    raise FCTError(f"transformation {name!r}: side_info.dim={int(si.dim)} but stage {si.stage!r} gives "
                   f"{side['dim']}-d ψ")
  h = transformation.build_h(cfg, old["dim"], new["dim"])
  side_dim = int(si.dim)

  def apply(v, old_emb, side_emb):
    out = h.apply(v, old_emb, side_emb if side_dim else None, train=False)["embedding"]
    return out, None  # ψ carried over unchanged: the stages train no g yet

  return Transform(name=name, apply=apply, variables=jax.tree.map(lambda x: x, variables), old_dim=old["dim"],
                   side_dim=side_dim, new_dim=new["dim"], fingerprint=stage_fingerprint(os.path.join(exp, name)),
                   expects={"embedding": old, "side_info": side}, produces={"embedding": new, "side_info": side})
