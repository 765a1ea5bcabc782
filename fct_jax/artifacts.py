"""Finished stages as later code reads them: config, variables, widths, fingerprint; models rebuilt; h and g loaded.

A stage's output is a directory (``checkpoint.py``): ``config.json`` (the resolved config that built it), ``model/``
(its final variables) and ``DONE``. Everything that reads such a directory — the stages downstream, the gallery
tool, PyTorch import/export, the report — goes through this module, so that a model is rebuilt from its config in
one way and every width is checked in one place. It sits below the stages (``fct_jax/stages`` import it; it
imports no stage) and above data, models and the training loop's ``predict``.
"""

import dataclasses
import hashlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from fct_jax import checkpoint, config_schema, models, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError
from fct_jax.models.composite import InputStandardized, SimCLRModel

# Side-information methods that train a stage (``none``, zeros, and ``old``, ψ := φ_old, need none); those that train
# a classifier (an alternate old model) are ``config_schema.CLASSIFIER_METHODS``.
SIDE_INFO_METHODS = config_schema.SIDE_INFO_METHODS
SIDE_INFO_KINDS = config_schema.SIDE_INFO_KINDS


@dataclasses.dataclass
class Context:
  """What a stage gets besides its config: the experiment workdir, the mesh, and test hooks."""
  workdir: str
  mesh: Any = None
  stop_at_step: Optional[int] = None


# ------------------------------------------------------------------------------------------ finished stages


def stage_dir(ctx: Context, stage: str, needed_by: str) -> str:
  """The finished workdir of stage ``stage``; a one-line error if it is missing or unfinished."""
  d = os.path.join(ctx.workdir, stage)
  if not checkpoint.is_done(d):
    state = "is unfinished" if os.path.isdir(d) else "is missing"
    raise FCTError(f"stage {needed_by!r} needs stage {stage!r}, but {d} {state}; run that stage first "
                   f"(--config=...:stage={stage})")
  return d


def stage_config(ctx: Context, stage: str, needed_by: str) -> ml_collections.ConfigDict:
  """The saved config of a finished stage, resolved against today's schema (no checkpoint is loaded)."""
  d = stage_dir(ctx, stage, needed_by)
  return config_schema.resolve(checkpoint.read_json(os.path.join(d, "config.json")))


def load_stage(ctx: Context, stage: str, needed_by: str):
  """``(config, variables)`` of a finished stage, with the config it was built with."""
  cfg = stage_config(ctx, stage, needed_by)  # also checks that the stage is finished
  return cfg, checkpoint.load_model(os.path.join(ctx.workdir, stage))


def _files(d):
  """Every file under ``d`` (epath forbids ``rglob`` on buckets, so walk level by level)."""
  if not d.exists():
    return []
  out = []
  for p in d.iterdir():
    out.extend(_files(p) if p.is_dir() else [p])
  return out


def stage_fingerprint(path: str) -> str:
  """SHA-256 of a stage directory's ``config.json`` and ``model/`` files (paths and contents, sorted).

  A *model version*: stores record the fingerprints of the models that made their vectors, and an upgrade refuses
  a store whose fingerprints differ from those h was trained against (a stage retrained under the same name).
  """
  root = epath.Path(path)
  if not (root / "config.json").exists():
    raise FCTError(f"{path} is not a stage directory (no config.json)")
  h = hashlib.sha256()
  for p in [root / "config.json"] + sorted(_files(root / "model"), key=str):
    h.update(str(p.relative_to(root)).encode() + b"\0")
    h.update(p.read_bytes())
    h.update(b"\0")
  return h.hexdigest()


def upstream_width(ctx: Context, stage: str, needed_by: str, config=None) -> int:
  """``model.embedding_dim`` of a finished backbone or side_info stage (the width of φ or ψ), from its config."""
  config = config or stage_config(ctx, stage, needed_by)
  if "embedding_dim" not in config.model:
    raise FCTError(f"stage {needed_by!r}: the config of stage {stage!r} has no model.embedding_dim (its width)")
  return int(config.model.embedding_dim)


# ------------------------------------------------------------------------------------ models from configs


def model_kwargs(model_cfg) -> dict:
  """Config block ``model`` → constructor kwargs (all fields but ``name``; lists become tuples)."""
  kw = {k: v for k, v in model_cfg.to_dict().items() if k != "name"}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def build_backbone(cfg, num_classes: int):
  """The backbone module a backbone-stage config describes."""
  return models.get_model(cfg.model.name, num_classes=num_classes, **model_kwargs(cfg.model))


def load_backbone(ctx: Context, stage: str, needed_by: str):
  """``(module, variables, cfg)`` of a finished backbone stage, rebuilt from its own saved config."""
  cfg, variables = load_stage(ctx, stage, needed_by)
  if cfg.kind != "backbone":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a backbone stage, not {cfg.kind!r}")
  _, info = sources.get_source(cfg.data, cfg.split)
  return build_backbone(cfg, info.num_classes), variables, cfg


def check_side_method(cfg):
  """One-line error unless a side_info stage config names a method that trains a stage."""
  if cfg.method not in SIDE_INFO_METHODS:
    raise FCTError(f"stage {cfg.name!r}: unknown side-info method {cfg.method!r}; valid: "
                   f"{', '.join(SIDE_INFO_METHODS)} (no side-information needs no stage: side_info.kind='none' in "
                   "the transformation)")


def side_num_classes(cfg) -> int:
  """Classifier width of a side_info stage: the split's classes for the alternate old models, else none."""
  if cfg.method in config_schema.CLASSIFIER_METHODS:
    return sources.get_source(cfg.data, cfg.split)[1].num_classes
  return 0


def build_side_model(cfg):
  """The trained module of a side_info stage config (for SimCLR: encoder + projection head)."""
  check_side_method(cfg)
  try:
    net = models.get_model(cfg.model.name, num_classes=side_num_classes(cfg), **model_kwargs(cfg.model))
  except (ValueError, TypeError) as e:
    raise FCTError(f"stage {cfg.name!r}: cannot build model {cfg.model.name!r}: {e}") from e
  if cfg.input_norm == "image":
    net = InputStandardized(encoder=net)
  if cfg.method != "simclr":
    return net
  p = cfg.simclr.projection
  head = models.get_head("simclr_projection", hidden_dim=int(p.hidden_dim), out_dim=int(p.out_dim),
                         num_layers=int(p.num_layers))
  return SimCLRModel(encoder=net, projection=head)


def side_encoder(cfg):
  """``(module, select)``: the ψ network alone and ``select(variables)`` picking its variables from the stage's
  (for SimCLR the ``encoder`` sub-tree, without the projection head)."""
  model = build_side_model(cfg)
  if cfg.method != "simclr":
    return model, lambda variables: variables
  return model.encoder, lambda variables: {col: t["encoder"] for col, t in variables.items() if "encoder" in t}


def sigma_dim(cfg) -> int:
  """Width of h's uncertainty head for a transformation config: FastFill's ``fastfill.sigma_dim``, else 0."""
  return int(cfg.fastfill.sigma_dim) if cfg.method == "fastfill" else 0


def build_h(cfg, old_dim: int, new_dim: int):
  """h (or g) of a transformation stage config, for the given input and target widths (with FastFill's
  uncertainty head when ``cfg.method == "fastfill"``)."""
  extra = {"sigma_dim": sigma_dim(cfg)} if sigma_dim(cfg) else {}
  return models.get_model(cfg.model.name, old_dim=old_dim, side_dim=int(cfg.side_info.dim), new_dim=new_dim,
                          **model_kwargs(cfg.model), **extra)


# --------------------------------------------------------------------------------------- side-information


@dataclasses.dataclass
class SideInfo:
  """A frozen side-information model as later stages use it.

  Attributes:
    method: the side-info kind (``"none"``, ``"old"``, ``"stored"`` or one of :data:`SIDE_INFO_METHODS`).
    dim: width of ψ.
    apply: ``apply(variables, images [B, H, W, 3]) -> ψ [B, dim] float32`` (eval mode; jit-able); None for
      ``stored`` (ψ comes with the vectors, there is no model).
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

  def embed(self, source, *, batch_size: int, transform: Callable, mesh=None) -> np.ndarray:
    """ψ [N, dim] of every image of ``source`` in order, with the evaluation ``transform``."""
    if self.method == "none":
      return np.zeros((len(source), self.dim), np.float32)
    out = train_lib.predict(lambda v, b: {"psi": self.apply(v, b["image"])}, self.variables, source,
                            batch_size=batch_size, transform=transform, mesh=mesh)
    return out["psi"]


def zero_side_info(dim: int) -> SideInfo:
  """The paper's "no side-information": ψ(x) = 0 of width ``dim`` (0 = the side branch of h is absent)."""
  return SideInfo("none", int(dim), lambda v, images: jnp.zeros((images.shape[0], int(dim)), jnp.float32), {})


def load_side_info(ctx: Context, stage: str, needed_by: str) -> SideInfo:
  """A finished side_info stage, frozen, rebuilt from the config it was trained with."""
  cfg, variables = load_stage(ctx, stage, needed_by)
  if cfg.kind != "side_info":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a side_info stage, not {cfg.kind!r}")
  module, select = side_encoder(cfg)
  variables = select(variables)

  def apply(v, images):
    return module.apply(v, images, train=False)["embedding"].astype(jnp.float32)

  s = sources.get_source(cfg.data, cfg.split)[1].image_size
  shape = jax.eval_shape(apply, variables, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
  return SideInfo(cfg.method, int(shape.shape[-1]), apply, variables, stage)


def old_as_side_info(ctx: Context, stage: str, needed_by: str) -> SideInfo:
  """The old backbone ``stage`` as side-information (``side_info.kind="old"``: ψ := φ_old); its :attr:`SideInfo.stage`
  is the backbone stage, whose embeddings callers may already hold."""
  module, variables, ocfg = load_backbone(ctx, stage, needed_by)

  def apply(v, images):
    return module.apply(v, images, train=False)["embedding"].astype(jnp.float32)

  return SideInfo("old", int(ocfg.model.embedding_dim), apply, variables, stage)


def side_info_for(cfg, ctx: Context, cache: Optional[Dict[str, SideInfo]] = None) -> SideInfo:
  """The frozen ψ a transformation config asks for, checked against it (kind and width).

  ``cache``: side-info stage name → loaded ψ, shared by callers that load several h's over the same ψ (each
  stage's checkpoint is then read once); the checks still run for every config.
  """
  si = cfg.side_info
  kind, dim = si.kind, int(si.dim)
  if kind not in SIDE_INFO_KINDS:
    raise FCTError(f"unknown side_info.kind {kind!r}; valid: {', '.join(SIDE_INFO_KINDS)}")
  if kind == "none":
    return zero_side_info(dim)
  if kind == "stored":  # ψ read from vector files (a plan on vectors): no model to load
    return SideInfo("stored", dim, None, {}, "")
  if kind == "old":  # ψ := φ_old (the official FastFill code's "no side-info"): the old backbone itself
    psi = old_as_side_info(ctx, cfg.old, cfg.name)
    if psi.dim != dim:
      raise FCTError(f"stage {cfg.name!r}: side_info.kind='old' feeds φ_old ({psi.dim}-d) as ψ but "
                     f"side_info.dim={dim}; set side_info.dim={psi.dim}")
    return psi
  if not si.stage:
    raise FCTError(f"stage {cfg.name!r}: side_info.kind={kind!r} needs side_info.stage, the side_info stage to load")
  cache = {} if cache is None else cache
  if si.stage not in cache:
    cache[si.stage] = load_side_info(ctx, si.stage, cfg.name)
  psi = cache[si.stage]
  if psi.method != kind:
    raise FCTError(f"stage {cfg.name!r}: side_info.kind is {kind!r} but stage {si.stage!r} trained {psi.method!r}")
  if psi.dim != dim:
    raise FCTError(f"stage {cfg.name!r}: side-info width mismatch: stage {si.stage!r} gives {psi.dim}-d ψ but "
                   f"side_info.dim={dim} (the h model's side width); set side_info.dim={psi.dim}")
  return psi


# ----------------------------------------------------------------------------------------- transformations


def target_kind(cfg, ctx: Context, new_config=None) -> str:
  """``"backbone"`` when ``cfg.new`` is φ_new (h), ``"side_info"`` when it is ψ_{i+1} (g); ``new_config``: that
  stage's saved config when the caller has it already."""
  new_config = new_config or stage_config(ctx, cfg.new, cfg.name)
  if new_config.kind not in ("backbone", "side_info"):
    raise FCTError(f"stage {cfg.name!r}: target {cfg.new!r} must be a backbone (h) or side_info (g) stage, not "
                   f"{new_config.kind!r}")
  return new_config.kind


@dataclasses.dataclass
class Transformation:
  """A finished transformation stage (h, or g for sequences), its shapes checked against its upstream stages.

  Attributes:
    name: the stage name.
    cfg: its resolved config.
    module: the rebuilt h module; ``variables``: its saved variables.
    dims: ``{"old", "side", "new"}`` widths (``new``: the target's, φ_new or ψ_{i+1}).
    target_kind: ``"backbone"`` (h) or ``"side_info"`` (g).
    sigma_dim: width of FastFill's uncertainty head (0: plain h).
  """
  name: str
  cfg: Any
  module: Any
  variables: Any
  dims: Dict[str, int]
  target_kind: str
  sigma_dim: int = 0

  def __post_init__(self):
    module = self.module
    self._apply = jax.jit(lambda v, old, psi: module.apply(v, old, psi, train=False))

  def with_uncertainty(self, old: np.ndarray, psi: np.ndarray,
                       batch_size: int = 4096) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """``(h(old, ψ) [N, d_new], s [N, sigma_dim] or None)``: the embedding and FastFill's predicted log σ² from one
    pass of h (eval mode, in batches; widths checked); s is None for a plain h."""
    for what, x, d in (("φ_old", old, self.dims["old"]), ("ψ", psi, self.dims["side"])):
      if np.ndim(x) != 2 or x.shape[1] != d:
        raise FCTError(f"transformation {self.name!r} takes {d}-d {what} but got an array of shape "
                       f"{tuple(np.shape(x))}")
    outs = [jax.device_get(self._apply(self.variables, old[i:i + batch_size], psi[i:i + batch_size]))
            for i in range(0, len(old), batch_size)]
    emb = np.concatenate([np.asarray(o["embedding"]) for o in outs])
    log_var = np.concatenate([np.asarray(o["log_var"]) for o in outs]) if self.sigma_dim else None
    return emb, log_var

  def __call__(self, old: np.ndarray, psi: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """h(old [N, d_old], ψ [N, d_side]) → [N, d_new] numpy, eval mode, in batches; widths checked."""
    return self.with_uncertainty(old, psi, batch_size)[0]


def load_transformation(ctx: Context, stage: str, needed_by: str) -> Transformation:
  """A finished transformation stage, h rebuilt with the widths in its upstream stages' saved configs (φ_old, ψ and
  the target are not loaded) and checked against its saved variables."""
  cfg, variables = load_stage(ctx, stage, needed_by)
  if cfg.kind != "transformation":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a transformation stage, not {cfg.kind!r}")
  if cfg.data.name == "vectors":  # trained on stored vectors: no upstream stages, the widths are h's own
    kind, dims = "backbone", h_dims(variables, int(cfg.side_info.dim), stage)
  else:
    new_config = stage_config(ctx, cfg.new, stage)
    kind = target_kind(cfg, ctx, new_config)
    dims = {"old": upstream_width(ctx, cfg.old, stage), "side": int(cfg.side_info.dim),
            "new": upstream_width(ctx, cfg.new, stage, new_config)}
  h = build_h(cfg, dims["old"], dims["new"])
  _check_h_variables(h, variables, dims, stage, needed_by)
  return Transformation(stage, cfg, h, variables, dims, kind, sigma_dim(cfg))


def h_dims(variables, side_dim: int, stage: str) -> Dict[str, int]:
  """``{"old", "side", "new"}`` widths of a saved h (``fct_mlp``) read from its kernels: for an h trained on stored
  vectors, which has no upstream stages to read them from (:func:`_check_h_variables` then checks the rest)."""
  params = variables.get("params", {})
  try:
    return {"old": int(np.shape(params["old_proj0_dense"]["kernel"])[0]), "side": side_dim,
            "new": int(np.shape(params["mix_out"]["kernel"])[1])}
  except KeyError as e:
    raise FCTError(f"transformation {stage!r}: its saved variables have no {e.args[0]!r}: not an fct_mlp h") from e


def _check_h_variables(h, variables, dims, stage, needed_by):
  """One-line error when the saved h does not have the shapes the upstream widths give (an upstream stage was
  retrained with another width after h was trained)."""
  want = jax.eval_shape(lambda: h.init({"params": jax.random.key(0)}, jnp.zeros((1, dims["old"])),
                                       jnp.zeros((1, dims["side"])), train=False))
  want = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(want)}
  got = {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(variables)}
  if want != got:
    diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise FCTError(f"stage {needed_by!r}: transformation {stage!r} does not fit the widths of its upstream stages "
                   f"(d_old={dims['old']}, d_side={dims['side']}, d_new={dims['new']}): {diff[0]} is "
                   f"{got.get(diff[0])}, expected {want.get(diff[0])}; retrain {stage!r}")


def load_h(ctx: Context, stage: str, needed_by: str,
           side_cache: Optional[Dict[str, SideInfo]] = None) -> Tuple[Transformation, Any, SideInfo]:
  """``(transformation, cfg, side_info)``: a finished h or g with its frozen input ψ (``side_cache``: see
  :func:`side_info_for`)."""
  t = load_transformation(ctx, stage, needed_by)
  return t, t.cfg, side_info_for(t.cfg, ctx, side_cache)


# ------------------------------------------------------------------------------------- embedding images


def eval_batch_size(cfg, mesh) -> int:
  """The configured eval batch size rounded up to a multiple of the device count."""
  n = mesh.size if mesh is not None else jax.device_count()
  return -(-int(cfg.eval_batch_size) // n) * n


def eval_transform(cfg):
  """The evaluation transform a stage config selects (``eval_augment``) for its dataset."""
  return augment.eval_transform(cfg.eval_augment, cfg.data)


def embed(module, variables, source, *, batch_size: int, transform: Callable, mesh=None) -> np.ndarray:
  """Embeddings [N, D] of a whole source with a backbone in eval mode and the evaluation ``transform``."""
  out = train_lib.predict(lambda v, b: {"embedding": module.apply(v, b["image"], train=False)["embedding"]},
                          variables, source, batch_size=batch_size, transform=transform, mesh=mesh)
  return out["embedding"]


def source_labels(source, key: str = "label") -> np.ndarray:
  """All labels of a source, in order (fast for in-memory sources)."""
  arrays = getattr(source, "arrays", None)
  if arrays is not None and key in arrays:
    return np.asarray(arrays[key])
  return np.asarray([source[i][key] for i in range(len(source))])


def check_finite_embeddings(x: np.ndarray, what: str):
  """One-line error when embeddings hold NaN/Inf (a diverged model would otherwise rank garbage silently)."""
  if not np.all(np.isfinite(x)):
    raise FCTError(f"{what} contain NaN/Inf ({int(np.sum(~np.isfinite(x)))} values)")
