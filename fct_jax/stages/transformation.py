"""Transformation stage: h(φ_old(x), ψ(x)) ≈ φ_new(x) — or, for update sequences, g(φ_i, ψ_i) ≈ ψ_{i+1} — trained
with the L2 (MSE) loss on the new training set.

The input models (φ_old = ``cfg.old``, a backbone stage; ψ, see below) and the target (``cfg.new``) are loaded
frozen from their stage workdirs and rebuilt from the configs that trained them. The target is a backbone stage
(φ_new: the transformation h) or a side_info stage (ψ_{i+1}: the paper's g for a sequence v_i → v_{i+1}, §4.4,
same architecture and loss).

Feature modes (``cfg.feature_mode``; the log and the evaluation results say which ran):

* ``online`` (ml-fct's): every step, the augmented images (``cfg.augment``) go through the frozen models.
* ``cached`` (ours): the frozen models' features of ``cfg.cache_views`` augmented views of every training image
  are computed once (batches sharded over the devices), stored in ``stage_dir/features`` (a resumed stage reuses
  them), and h trains on those vectors: an epoch then costs an MLP step per batch instead of three image models.
  With ``augment="none"`` one view gives exactly the online mode's features. The cache is held on the devices
  (rows sharded over the mesh's ``data`` axis; ``train.arrays_on_device=False`` keeps it on the hosts) and
  ``train.steps_per_call`` optimizer steps run per jitted call (:mod:`fct_jax.train_lib`, the arrays path).

BatchNorm of h is switched to eval mode after ``bn_eval_after`` × the total steps (ml-fct: the second half).

Method (``cfg.method``): ``fct`` trains plain h with the L2 loss; ``fastfill`` (Jaeckle et al., ICLR 2023;
ml-fct@1a7f8b5) trains h with an uncertainty head (s = log σ², ``fastfill.sigma_dim`` wide) with
:func:`fct_jax.losses.fastfill_loss`: the L2 term plus the new model's label-smoothed classification loss of h
through φ_new's *frozen* classifier κ_new (its kernel is a frozen input; the gradient flows through it into h), both
weighted per item by ½ e^{−s}, plus mu_unc · s. The labels of the training images therefore enter the batches (in
cached mode, each cached view's row carries its image's label). FastFill trains h only (the target must be φ_new,
whose classifier it needs), not g.

Stored vectors (``data.name="vectors"``, :mod:`fct_jax.data.vectors`; configs/vectors.py): the training rows are
read from the vector set ``data[split]`` made by any model — φ_old, ψ (``side_info.kind="stored"``), φ_new, labels
for FastFill with the new model's classifier ``data.classifier`` — and h trains on them exactly as on cached features
(no image model is loaded; ``data.epoch_rows`` sets an epoch's length when the rows are augmented views).

Side-information (``cfg.side_info``: ``kind``, ``dim``, ``stage``): ``kind="none"`` feeds ψ(x) = 0 (with
``dim=0`` the side branch is absent and its half of the mixer input is zeros, the paper's "no side-info" row); any
other kind (``simclr``, ``autoencoder``, ``alt_old``, ``alt_old_mixup``) loads the finished side_info stage named
``stage`` frozen. Its method must equal ``kind`` and its ψ width must equal ``dim`` (the width h is built with),
otherwise the stage stops with a one-line error before training.
"""

import dataclasses
import io
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax.core import unfreeze

from fct_jax import artifacts, checkpoint, losses, sharding, train_lib
from fct_jax.data import augment, pipeline, sources, vectors
from fct_jax.errors import FCTError
from fct_jax.stages import backbone, common

FEATURE_KEYS = ("old", "psi", "new")


@dataclasses.dataclass
class Frozen:
  """The frozen models of a transformation stage.

  Attributes:
    apply: ``apply(variables, images [B, H, W, 3]) -> (old [B, d_old], psi [B, d_side], target [B, d_new])``.
    variables: ``{"old", "side", "new"}`` frozen variables.
    dims: ``{"old", "new"}`` widths (``new``: the target's, φ_new or ψ_{i+1}).
    side: the input side-information model.
    target_kind: ``"backbone"`` (h) or ``"side_info"`` (g).
    classifier: FastFill only: ``{"kernel" [d_new, C], "bias" or None, "kind", "scale", "margin"}``, φ_new's
      frozen classifier κ_new and its loss (:func:`new_classifier`).
  """
  apply: Callable
  variables: Dict[str, Any]
  dims: Dict[str, int]
  side: artifacts.SideInfo
  target_kind: str
  classifier: Any = None


def load_frozen(cfg, ctx) -> Frozen:
  """Loads φ_old, ψ and the target (φ_new, or ψ_{i+1} for g) frozen."""
  old_model, old_vars, old_cfg = artifacts.load_backbone(ctx, cfg.old, cfg.name)
  psi = artifacts.side_info_for(cfg, ctx)
  kind = artifacts.target_kind(cfg, ctx)
  if kind == "backbone":
    new_model, new_vars, new_cfg = artifacts.load_backbone(ctx, cfg.new, cfg.name)
    new_dim = int(new_cfg.model.embedding_dim)
    new_apply = lambda v, images: new_model.apply(v, images, train=False)["embedding"]
  else:
    nxt = artifacts.load_side_info(ctx, cfg.new, cfg.name)
    new_dim, new_vars, new_apply = nxt.dim, nxt.variables, nxt.apply

  def apply(v, images):
    old = old_model.apply(v["old"], images, train=False)["embedding"]
    return jax.lax.stop_gradient((old, psi.apply(v["side"], images), new_apply(v["new"], images)))

  classifier = None
  if cfg.method == "fastfill":
    if kind != "backbone":
      raise FCTError(f"stage {cfg.name!r}: method='fastfill' trains h towards φ_new (it needs φ_new's classifier); "
                     f"target {cfg.new!r} is a side_info stage (g): use method='fct'")
    classifier = new_classifier(cfg, new_vars, new_cfg)
  return Frozen(apply, {"old": old_vars, "side": psi.variables, "new": new_vars},
                {"old": int(old_cfg.model.embedding_dim), "new": new_dim}, psi, kind, classifier)


def new_classifier(cfg, new_vars, new_cfg) -> Dict[str, Any]:
  """φ_new's frozen classifier κ_new (kernel [d_new, C], bias or None) and the classification loss it was trained
  with (FastFill's discriminative term); one-line error when the new stage has none."""
  head = new_vars.get("params", {}).get("classifier", {})
  if "kernel" not in head:
    raise FCTError(f"stage {cfg.name!r}: method='fastfill' needs the new model's classifier, but stage {cfg.new!r} "
                   "has none (params['classifier']['kernel'])")
  spec = backbone.loss_spec(new_cfg)
  bias = head.get("bias")
  return {"kernel": np.asarray(head["kernel"], np.float32), "bias": None if bias is None else np.asarray(bias),
          **spec}


def bn_eval_step(cfg, total_steps: int) -> int:
  """The first step (0-based) at which h's BatchNorm runs in eval mode."""
  # ml-fct: BatchNorm of h is switched to eval mode for the second half of training (switch_mode_to_eval).
  return int(round(float(cfg.bn_eval_after) * total_steps))


def check_feature_dims(cfg, feats: Dict[str, np.ndarray], dims: Dict[str, int], where: str):
  """One-line error when stored features do not fit h (widths d_old, d_side, d_new)."""
  want = {"old": (dims["old"], f"φ_old of stage {cfg.old!r}"),
          "psi": (int(cfg.side_info.dim), "ψ side_info.dim"),
          "new": (dims["new"], f"target of stage {cfg.new!r}")}
  for k, (d, what) in want.items():
    got = feats[k].shape[-1] if np.ndim(feats[k]) == 2 else None
    if got != d:
      raise FCTError(f"stage {cfg.name!r}: {where} has {k!r} features of width {got} but h expects {d} ({what}); "
                     f"delete {where} to recompute them")


# ------------------------------------------------------------------------------------------- cached features


def _save_npy(path: str, arr: np.ndarray):
  buf = io.BytesIO()
  np.save(buf, arr)
  tmp = epath.Path(path + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(epath.Path(path))


def _load_npy(path: str) -> np.ndarray:
  return np.load(io.BytesIO(epath.Path(path).read_bytes()))


def cached_features(cfg, stage_dir: str, ctx, frozen: Frozen, source, transform: Callable) -> Dict[str, np.ndarray]:
  """φ_old, ψ and target features [N·K, d] of K augmented views per image (``transform``: the training transform
  each view is drawn with): computed once, stored, reused.

  The computation is :func:`train_lib.predict` (batches sharded over the mesh, results on every process);
  process 0 writes ``stage_dir/features/{old,psi,new}.npy`` and ``meta.json``.
  """
  views = int(cfg.cache_views)
  if views < 1:
    raise FCTError(f"stage {cfg.name!r}: cache_views must be ≥ 1, got {views}")
  fdir = checkpoint.join(stage_dir, "features")
  meta_path = checkpoint.join(fdir, "meta.json")
  meta = {"views": views, "num_images": len(source), "augment": cfg.augment, "seed": int(cfg.seed)}
  if _cached_meta_matches(meta_path, meta):
    feats = {k: _load_npy(checkpoint.join(fdir, f"{k}.npy")) for k in FEATURE_KEYS}
    print(f"[{cfg.name}] reusing {len(feats['old'])} cached feature rows from {fdir}", flush=True)
    return feats
  t0 = time.perf_counter()
  views_source = sources.AugmentedViews(source, transform, views, int(cfg.seed) + 101)
  feats = train_lib.predict(lambda v, b: dict(zip(FEATURE_KEYS, frozen.apply(v, b["image"]))), frozen.variables,
                            views_source, batch_size=artifacts.eval_batch_size(cfg, ctx.mesh),
                            transform=lambda ex: ex, mesh=ctx.mesh)
  feats = {k: np.asarray(feats[k], np.float32) for k in FEATURE_KEYS}  # as stored: a reuse trains on the same
  for k in FEATURE_KEYS:
    artifacts.check_finite_embeddings(feats[k], f"cached {k} features of stage {cfg.name!r}")
  seconds = time.perf_counter() - t0
  if jax.process_index() == 0:
    epath.Path(fdir).mkdir(parents=True, exist_ok=True)
    for k in FEATURE_KEYS:
      _save_npy(checkpoint.join(fdir, f"{k}.npy"), feats[k])
  checkpoint.write_json(meta_path, {**meta, "seconds": seconds})  # written last: marks the cache complete
  sharding.barrier(f"fct_{cfg.name}_features")
  print(f"[{cfg.name}] cached features of {views} view(s) × {len(source)} images in {seconds:.1f}s "
        f"({fdir})", flush=True)
  return feats


def _cached_meta_matches(meta_path: str, meta: dict) -> bool:
  if not checkpoint.exists(meta_path):
    return False
  held = checkpoint.read_json(meta_path)
  return {k: held.get(k) for k in meta} == meta


# ------------------------------------------------------------------------------------------------- the stage


def make_loss(h, batch_features: Callable, switch_step: int, cfg=None, classifier=None):
  """h's loss, with BatchNorm in train mode before ``switch_step`` and in eval mode from it on: the L2 loss
  (``method="fct"``) or FastFill's (``"fastfill"``: ``classifier`` is :attr:`Frozen.classifier`, whose kernel and
  bias the loss reads from ``frz["classifier"]``, and batches carry ``label``)."""
  fastfill = cfg is not None and cfg.method == "fastfill"
  if fastfill:
    ff = cfg.fastfill
    weights = dict(mu_sim=float(ff.mu_sim), mu_disc=float(ff.mu_disc), mu_unc=float(ff.mu_unc),
                   label_smoothing=float(ff.label_smoothing), kind=classifier["kind"], scale=classifier["scale"],
                   margin=classifier["margin"])

  def loss(params, model_state, frz, batch, rng, step):
    del rng
    old, psi, new = batch_features(frz, batch)

    def train_mode():
      out, upd = h.apply({"params": params, **model_state}, old, psi, train=True, mutable=["batch_stats"])
      return out, unfreeze(upd)

    def eval_mode():
      return h.apply({"params": params, **model_state}, old, psi, train=False), unfreeze(model_state)

    bn_train = step < switch_step
    out, new_state = jax.lax.cond(bn_train, train_mode, eval_mode)
    metrics = {"bn_train_mode": bn_train.astype(jnp.float32)}
    pred = out["embedding"]
    if not fastfill:
      return losses.l2_transformation_loss(pred=pred, target=new), (metrics, new_state)
    kappa = frz["classifier"]
    logits = losses.frozen_classifier_logits(embedding=pred, classifier=kappa["kernel"], bias=kappa.get("bias"),
                                             kind=classifier["kind"]) if weights["mu_disc"] else None
    log_var = out.get("log_var")
    total = losses.fastfill_loss(pred=pred, target=new, log_var=log_var, logits=logits, labels=batch.get("label"),
                                 **weights)
    metrics["mse"] = losses.l2_transformation_loss(pred=pred, target=new)
    if log_var is not None:
      metrics["mean_log_var"] = jnp.mean(log_var)
    if logits is not None:
      metrics["new_classifier_accuracy"] = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return total, (metrics, new_state)

  return loss


def run(cfg, stage_dir: str, ctx: artifacts.Context):
  """Trains h (or g) and saves its variables to ``stage_dir/model``."""
  if cfg.data.name == "vectors":
    return _run_on_vectors(cfg, stage_dir, ctx)
  frozen = load_frozen(cfg, ctx)
  h = artifacts.build_h(cfg, frozen.dims["old"], frozen.dims["new"])
  source, _ = sources.get_source(cfg.data, cfg.split)
  mode = cfg.feature_mode
  transform = augment.train_transform(cfg.augment, cfg.data)  # the online batches', or the cached views'
  what = "h: φ_new" if frozen.target_kind == "backbone" else "g: ψ_{i+1}"
  if mode == "cached":
    feats = cached_features(cfg, stage_dir, ctx, frozen, source, transform)
    check_feature_dims(cfg, feats, frozen.dims, checkpoint.join(stage_dir, "features"))
    if cfg.method == "fastfill":  # row k·N + i is view k of image i (sources.AugmentedViews)
      feats = dict(feats, label=np.tile(artifacts.source_labels(source).astype(np.int32), int(cfg.cache_views)))
    # An epoch is still one pass's worth of the N training images (each step draws from the N·K cached views), so
    # a schedule in epochs means the same number of steps in both modes.
    train_source, batch_features, task_kw = _arrays_task(cfg, feats, len(source), frozen.classifier)
  else:
    train_source = source
    batch_features = lambda frz, batch: frozen.apply(frz, batch["image"])
    task_kw = dict(frozen={**frozen.variables, **_kappa(frozen.classifier)},
                   keys=("image", "label") if cfg.method == "fastfill" else ("image",), transform=transform)
  origin = f"from φ_old ({cfg.old}) and ψ ({frozen.side.method}); feature_mode={mode} (augment={cfg.augment})"
  return _train(cfg, stage_dir, ctx, h, frozen.classifier, batch_features, train_source, task_kw,
                f"{what} {origin}", frozen.variables)


def _kappa(classifier) -> dict:
  """The frozen input holding κ_new's kernel (and bias) for FastFill's loss; {} without one."""
  if classifier is None:
    return {}
  return {"classifier": {k: classifier[k] for k in ("kernel", "bias") if classifier[k] is not None}}


def _arrays_task(cfg, feats: Dict[str, np.ndarray], epoch_rows: int, classifier):
  """``(train_source, batch_features, task kwargs)`` of h trained on feature rows held as arrays (cached features,
  or stored vectors): batches of rows drawn by ``pipeline.row_indices``; an epoch is ``epoch_rows`` rows."""
  train_source = sources.ArraySource({"index": np.arange(epoch_rows)})
  batch_features = lambda frz, batch: (batch["old"], batch["psi"], batch["new"])
  task_kw = dict(frozen=_kappa(classifier) or None, transform=lambda ex, rng: ex, arrays=feats,
                 indices=pipeline.row_indices(len(feats["old"]), batch_size=cfg.train.batch_size, seed=int(cfg.seed)))
  return train_source, batch_features, task_kw


def _train(cfg, stage_dir, ctx, h, classifier, batch_features, train_source, task_kw, describe: str,
           frozen_variables=None):
  """The training both paths share: the BatchNorm switch, the loss (FCT's or FastFill's), the loop."""
  total = train_lib.resolve_steps(cfg.train, len(train_source)).total
  switch_step = bn_eval_step(cfg, total)
  recipe = (f"; FastFill: sigma_dim {cfg.fastfill.sigma_dim}, mu_sim {cfg.fastfill.mu_sim}, mu_disc "
            f"{cfg.fastfill.mu_disc}, mu_unc {cfg.fastfill.mu_unc}, smoothing {cfg.fastfill.label_smoothing} "
            f"(κ_new: {classifier['kernel'].shape[1]} classes, {classifier['kind']})") if classifier else ""
  print(f"[{cfg.name}] {describe}; BatchNorm eval mode from step {switch_step} of {total}{recipe}", flush=True)

  def init(rng, batch):
    old, psi, _ = jax.eval_shape(lambda: batch_features(frozen_variables, batch))
    return h.init({"params": rng}, jnp.zeros(old.shape), jnp.zeros(psi.shape), train=False)

  task = train_lib.Task(name=cfg.name, init=init, loss=make_loss(h, batch_features, switch_step, cfg, classifier),
                        **task_kw)
  return common.train_and_save(cfg, stage_dir, ctx, task, train_source)


# ------------------------------------------------------------------------------------------ stored vectors


def vector_features(cfg) -> Tuple[Dict[str, np.ndarray], Dict[str, int], Optional[Dict[str, Any]]]:
  """``(features, widths, classifier)`` of a transformation trained on stored vectors (``data.name="vectors"``):
  the rows of the vector set ``data[split]`` — φ_old, ψ (``side_info.kind="stored"``; zeros for ``none``), φ_new
  and, for FastFill, the labels — checked (shapes, finite values, ψ's width against ``side_info.dim``), and for
  FastFill the new model's classifier ``data.classifier`` (a linear softmax head). With ``train.arrays_on_device``
  the rows are loaded (then placed on the devices); without, the features are lazy row views of the files that each
  step gathers from (a vector set larger than memory), after one streaming pass that checks every value."""
  kind, side_dim, fastfill = cfg.side_info.kind, int(cfg.side_info.dim), cfg.method == "fastfill"
  if kind not in ("none", "stored"):
    raise FCTError(f"stage {cfg.name!r}: on stored vectors ψ is side_info.kind='stored' (read from the files) or "
                   f"'none', not {kind!r}")
  path = cfg.data[cfg.split] if cfg.split in cfg.data else ""
  if not path:
    raise FCTError(f"stage {cfg.name!r}: split {cfg.split!r} names no vector set (set data.{cfg.split} to a file)")
  need = ("old", "new") + (("psi",) if kind == "stored" else ()) + (("label",) if fastfill else ())
  vs = vectors.open_vectors(path, need=need, what=f"stage {cfg.name!r}: vectors")
  if kind == "stored" and vs.dim("psi") != side_dim:
    raise FCTError(f"stage {cfg.name!r}: {path} holds {vs.dim('psi')}-d ψ but side_info.dim={side_dim}; "
                   f"set side_info.dim={vs.dim('psi')}")
  floats = ("old", "new") + (("psi",) if kind == "stored" else ())
  if cfg.train.arrays_on_device:  # loaded (and checked) once, then placed on the devices
    feats = {k: vs.load(k) for k in floats}
    zeros = np.zeros((vs.num_rows, side_dim), np.float32)
  else:  # streamed: every step gathers its rows from the files (memory-mapped .npy, zarr chunks); checked first
    vectors.check_finite(vs, floats)
    feats = {k: vs.rows(k) for k in floats}
    zeros = np.broadcast_to(np.zeros((1, side_dim), np.float32), (vs.num_rows, side_dim))
  if kind != "stored":
    feats["psi"] = zeros
  classifier = None
  if fastfill:
    feats["label"] = vs.load("label").astype(np.int32)
    if not cfg.data.classifier:
      raise FCTError(f"stage {cfg.name!r}: method='fastfill' needs the new model's classifier: set data.classifier "
                     "to a [d_new, classes] .npy (or .npz with kernel, bias)")
    kernel, bias = vectors.open_classifier(cfg.data.classifier)
    if kernel.shape[0] != feats["new"].shape[1]:
      raise FCTError(f"stage {cfg.name!r}: classifier {cfg.data.classifier} takes {kernel.shape[0]}-d inputs but "
                     f"φ_new in {path} is {feats['new'].shape[1]}-d")
    if feats["label"].min() < 0 or feats["label"].max() >= kernel.shape[1]:
      raise FCTError(f"stage {cfg.name!r}: labels in {path} must lie in [0, {kernel.shape[1]}) (the classifier's "
                     f"classes); found {feats['label'].min()}..{feats['label'].max()}")
    classifier = {"kernel": kernel, "bias": bias, "kind": "softmax", "scale": None, "margin": None}
  dims = {"old": feats["old"].shape[1], "new": feats["new"].shape[1]}
  return feats, dims, classifier


def _run_on_vectors(cfg, stage_dir: str, ctx: artifacts.Context):
  """h trained on stored vectors: the cached-features path, the vectors being the features."""
  feats, dims, classifier = vector_features(cfg)
  h = artifacts.build_h(cfg, dims["old"], dims["new"])
  rows = len(feats["old"])
  epoch_rows = int(cfg.data.epoch_rows) or rows
  train_source, batch_features, task_kw = _arrays_task(cfg, feats, epoch_rows, classifier)
  describe = (f"h: φ_new from stored vectors {cfg.data[cfg.split]} ({rows} rows of φ_old {dims['old']}-d, ψ "
              f"{cfg.side_info.kind} {int(cfg.side_info.dim)}-d, φ_new {dims['new']}-d; an epoch is {epoch_rows} rows)")
  return _train(cfg, stage_dir, ctx, h, classifier, batch_features, train_source, task_kw, describe)
