"""Shared config blocks. Experiment configs compose these; durations are epochs (or explicit steps)."""

from typing import Optional, Sequence

import ml_collections

STAGE_KEYS = ("stage", "runlocal")


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """Parses a config argument ``"stage=old,runlocal"`` into a ConfigDict over ``defaults``.

  A bare word is a boolean flag. Unknown keys raise ``ValueError`` naming the valid ones.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in out:
      raise ValueError(f"unknown config argument {key!r}; valid: {', '.join(sorted(out))}")
    if not sep:
      out[key] = True
    elif isinstance(out[key], bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(out[key])(value)
  return ml_collections.ConfigDict(out)


def optimizer(name: str, lr: float, *, weight_decay: float = 0.0, warmup_epochs: float = 0.0,
              schedule: str = "cosine", **kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict({"name": name, "lr": lr, "weight_decay": weight_decay, "schedule": schedule,
                                 "warmup_epochs": warmup_epochs, "warmup_steps": 0, "grad_clip_norm": 0.0,
                                 "momentum": 0.9, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                 "trust_coefficient": 0.001})
  c.update(kw)
  return c


def train(*, batch_size: int, epochs: float, optimizer_cfg, steps: int = 0, log_every_steps: int = 50,
          eval_every_steps: int = 0, checkpoint_every_steps: int = 500, steps_per_call: int = 0,
          arrays_on_device: bool = True) -> ml_collections.ConfigDict:
  """The ``train`` block of a stage.

  ``steps_per_call`` and ``arrays_on_device`` apply only to data already held as arrays (the transformation's
  cached features, ``train_lib.Task.arrays``): optimizer steps per jitted call (0: ``train_lib``'s default) and
  whether the arrays live on the devices (False: on the hosts, one step per call, for caches larger than device
  memory). Neither changes the result, so a run may be resumed with other values.
  """
  return ml_collections.ConfigDict({
      "batch_size": batch_size, "epochs": float(epochs), "steps": steps, "optimizer": optimizer_cfg,
      "log_every_steps": log_every_steps, "eval_every_steps": eval_every_steps,
      "checkpoint_every_steps": checkpoint_every_steps, "keep_checkpoints": 2, "num_data_threads": 2,
      "steps_per_call": steps_per_call, "arrays_on_device": arrays_on_device})


# = fct_jax.losses.LOSS_KINDS, spelled out: config files import only ml_collections (no jax at config time).
LOSS_KINDS = ("softmax", "arcface")
# = fct_jax.stages.side_info.INPUT_NORMS, spelled out for the same reason.
INPUT_NORMS = ("none", "image")


def loss_block(*, label_smoothing: float, loss_kind: str = "softmax", arcface_scale: float = 64.0,
               arcface_margin: float = 0.5) -> dict:
  """The ``loss`` block of the classification-trained stages (backbones, alternate old models)."""
  if loss_kind not in LOSS_KINDS:
    raise ValueError(f"unknown loss_kind {loss_kind!r}; valid: {', '.join(LOSS_KINDS)}")
  return {"kind": loss_kind, "label_smoothing": label_smoothing, "arcface_scale": float(arcface_scale),
          "arcface_margin": float(arcface_margin)}


def with_head(model, head: str = "") -> ml_collections.ConfigDict:
  """A copy of the model block with ``head`` set ("linear" or "arcface"; "" keeps the block's own, else linear)."""
  m = ml_collections.ConfigDict(model.to_dict() if hasattr(model, "to_dict") else dict(model))
  m.head = head or m.get("head", "linear") or "linear"
  return m


def backbone_stage(name: str, *, data, split: str, model, train_cfg, seed: int, label_smoothing: float = 0.1,
                   augment: str = "none", eval_split: str = "", eval_batch_size: int = 256, bct_old: str = "",
                   bct_weight: float = 1.0, loss_kind: str = "softmax", arcface_scale: float = 64.0,
                   arcface_margin: float = 0.5):
  """φ_old / φ_new: softmax cross-entropy (or ArcFace) with label smoothing on ``split``.

  ``loss_kind="arcface"``: the ArcFace loss with scale ``arcface_scale`` and angular margin ``arcface_margin``
  (ArcFace's s = 64, m = 0.5); the model block must then have ``head="arcface"`` (the stage refuses a mismatch).
  The stage's model block always carries ``head`` (default "linear"), so ``--config.model.head=arcface
  --config.loss.kind=arcface`` switches a stage to ArcFace from the command line.
  ``bct_old`` (a finished backbone stage) makes it BCT's new model: + ``bct_weight`` × the influence loss through
  that stage's frozen classifier (and with that stage's own loss), extended with its class means for the classes
  it never saw.
  """
  return ml_collections.ConfigDict({
      "name": name, "kind": "backbone", "seed": seed, "data": data, "split": split, "model": with_head(model),
      "loss": loss_block(label_smoothing=label_smoothing, loss_kind=loss_kind, arcface_scale=arcface_scale,
                         arcface_margin=arcface_margin),
      "bct": {"old": bct_old, "weight": bct_weight},
      "train": train_cfg, "augment": augment,
      "eval_split": eval_split, "eval_batch_size": eval_batch_size, "prng_impl": "rbg"})


def side_info_stage(name: str, *, method: str = "simclr", data, split: str, model, train_cfg, seed: int,
                    projection_hidden_dim: int = 2048, projection_dim: int = 128, projection_layers: int = 2,
                    temperature: float = 0.1, views=None, label_smoothing: float = 0.1, mixup_alpha: float = 0.2,
                    augment: str = "none", eval_split: str = "", eval_batch_size: int = 256,
                    loss_kind: str = "softmax", arcface_scale: float = 64.0, arcface_margin: float = 0.5,
                    input_norm: str = "none"):
  """ψ: the side-information model, trained on ``split`` (images only, except for the alternate old models).

  ``method``: simclr | autoencoder | alt_old | alt_old_mixup (see ``fct_jax/stages/side_info.py``). The width of
  ψ is ``model.embedding_dim``. ``simclr`` uses the ``simclr`` block (projection head, temperature, two-view
  augmentation ``views``: keyword arguments of ``augment.simclr_view``); the others use ``augment`` (a train
  transform), ``loss.label_smoothing`` and ``mixup.alpha``; ``alt_old`` and ``alt_old_mixup`` also ``loss.kind``
  (``loss_kind``, ``arcface_scale``, ``arcface_margin`` as in :func:`backbone_stage`: an ArcFace alternate old
  model).
  ``input_norm="image"`` standardises every input image by its own mean and standard deviation inside ψ (for every
  method, in training and wherever ψ is computed later; ``"none"``: ψ sees the images as they are). See
  ``fct_jax/stages/side_info.py``.
  """
  if input_norm not in INPUT_NORMS:
    raise ValueError(f"unknown input_norm {input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
  v = {"out_size": 0, "crop_scale": (0.08, 1.0), "flip": True, "jitter_strength": 0.5, "jitter_prob": 0.8,
       "grayscale_prob": 0.2, "blur_prob": 0.0}
  v.update(views or {})
  if method in ("alt_old", "alt_old_mixup"):  # classifiers: the head is explicit, as in backbone_stage
    model = with_head(model)
  return ml_collections.ConfigDict({
      "name": name, "kind": "side_info", "method": method, "seed": seed, "data": data, "split": split,
      "model": model, "train": train_cfg, "input_norm": input_norm,
      "simclr": {"projection": {"hidden_dim": projection_hidden_dim, "out_dim": projection_dim,
                                "num_layers": projection_layers},
                 "temperature": temperature, "augment": "simclr", "views": v},
      "loss": loss_block(label_smoothing=label_smoothing, loss_kind=loss_kind, arcface_scale=arcface_scale,
                         arcface_margin=arcface_margin),
      "mixup": {"alpha": mixup_alpha}, "augment": augment,
      "eval_split": eval_split, "eval_batch_size": eval_batch_size, "prng_impl": "rbg"})


def transformation_stage(name: str, *, data, split: str, model, train_cfg, seed: int, old: str = "old",
                         new: str = "new", side_info_kind: str = "none", side_info_dim: int = 0,
                         side_info_stage: str = "", augment: str = "none", bn_eval_after: float = 0.5,
                         feature_mode: str = "online", cache_views: int = 1, eval_batch_size: int = 256):
  """h(φ_old, ψ) ≈ φ_new with the L2 loss; ``old``/``new`` name the upstream stages (``new`` a side_info stage:
  g(φ_i, ψ_i) ≈ ψ_{i+1} for update sequences).

  Side-information: ``side_info_kind="none"`` feeds zeros of width ``side_info_dim`` (0: no side branch);
  otherwise ``side_info_stage`` names the side_info stage to load, whose method must equal the kind and whose ψ
  width must equal ``side_info_dim``. ``feature_mode``: ``online`` (ml-fct: frozen models run on augmented images
  every step) or ``cached`` (features of ``cache_views`` augmented views per image computed once and stored);
  ``eval_batch_size`` is the caching pass's batch. ``bn_eval_after``: fraction of the steps after which h's
  BatchNorm runs in eval mode.
  """
  return ml_collections.ConfigDict({
      "name": name, "kind": "transformation", "seed": seed, "data": data, "split": split, "model": model,
      "old": old, "new": new,
      "side_info": {"kind": side_info_kind, "dim": side_info_dim, "stage": side_info_stage},
      "train": train_cfg, "augment": augment, "bn_eval_after": bn_eval_after, "feature_mode": feature_mode,
      "cache_views": cache_views,
      "eval_batch_size": eval_batch_size, "prng_impl": "rbg"})


def evaluation_stage(name: str, *, data, split: str, old: str = "old", new: str = "new",
                     transformation: str = "transformation", compare_transformations: Sequence[str] = (),
                     probe_fields: Sequence[str] = ("label",), eval_batch_size: int = 256, bct: str = "",
                     paper_table: str = ""):
  """The case table; ``compare_transformations`` add rows ``new/h[<side-info kind>]``; ``probe_fields`` are the
  example fields on which ψ, φ_old and φ_new are scored by leave-one-out 1-NN (with CKA(φ_old, ψ)); ``bct`` (a
  BCT backbone stage) adds the rows ``bct-new/old`` and ``bct-new/bct-new``; ``paper_table`` (e.g. ``"table1"``,
  a key of ``fct_jax.report.PAPER_TABLES``) prints the paper's numbers beside ours in results.md."""
  return ml_collections.ConfigDict({
      "name": name, "kind": "evaluation", "data": data, "split": split, "old": old, "new": new, "bct": bct,
      "transformation": transformation, "compare_transformations": list(compare_transformations),
      "probe_fields": list(probe_fields), "eval_batch_size": eval_batch_size, "paper_table": paper_table})


def experiment(name: str, stages: Sequence[ml_collections.ConfigDict], stage: str = ""):
  """The whole plan, or — when ``stage`` names one — that stage's config with its fields at the top level."""
  by_name = {s.name: s for s in stages}
  if stage:
    if stage not in by_name:
      raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(by_name)}")
    c = ml_collections.ConfigDict(by_name[stage].to_dict())
    c.experiment = name
    c.stage = stage
    return c
  return ml_collections.ConfigDict({"experiment": name, "stage": "", "plan": list(by_name),
                                    "stages": {k: v.to_dict() for k, v in by_name.items()}})


def sequence_evaluation_stage(name: str, *, data, split: str, backbones: Sequence[str], rows,
                              eval_batch_size: int = 256):
  """Table 5: ``backbones`` against themselves plus ``rows`` ``(name, query, hops)``: the query backbone against the
  first version's stored φ, ψ upgraded through ``hops`` (``[[h, g], ...]``; see fct_jax/stages/sequence.py)."""
  return ml_collections.ConfigDict({
      "name": name, "kind": "sequence_evaluation", "data": data, "split": split, "backbones": list(backbones),
      "rows": [{"name": n, "query": q, "hops": [list(h) for h in hops]} for n, q, hops in rows],
      "eval_batch_size": eval_batch_size})


def sequence_stages(*, data, splits: Sequence[str], backbone_model, side_model, h_model, backbone_train,
                    side_train, h_train, side_kwargs=None, backbone_kwargs=None, h_kwargs=None,
                    eval_split: str = "eval", eval_batch_size: int = 256):
  """An update sequence v1 → v2 → … → vN (the paper's §4.4: Table 5 for N = 3), with and without side-information.

  Stages: backbones ``v1..vN`` (on ``splits``), SimCLR side-information ``side1..side{N-1}`` (each on its
  version's training images), for every update i = 2..N a transformation ``h{i}`` (v{i-1} → v{i}) and its
  ``h{i}_none`` twin without ψ, for i < N a ``g{i}`` ((φ_{i-1}, ψ_{i-1}) → ψ_i) that carries ψ forward, the
  direct ``h1{N}`` (v1 → vN; ``h1to{N}`` from N = 10) with its ``_none`` twin, and the sequence evaluation ``eval``.
  Its rows: every single update ``v{i}/h{i}(v{i-1})``; the v1 gallery upgraded hop by hop up to every v_k, k ≥ 3
  (``v3/h3(h2(v1))``, ``v4/h4(h3(h2(v1)))``, …; ψ carried by the g's); the direct ``v{N}/h1{N}(v1)``; and each
  again with ``[none]`` (the chains through the ``_none`` h's).

  Args:
    data: data block; splits: the N ≥ 3 versions' training splits (e.g. nested class subsets ``train_<K>``).
    backbone_model, side_model, h_model: model blocks.
    backbone_train, side_train, h_train: ``fn(stage index or name) -> train config`` (fresh ConfigDicts).
    side_kwargs, backbone_kwargs, h_kwargs: extra keyword arguments of the stage builders.
  """
  n = len(splits)
  if n < 3:
    raise ValueError(f"an update sequence needs at least 3 versions (splits), got {n}")
  bk, sk, hk = dict(backbone_kwargs or {}), dict(side_kwargs or {}), dict(h_kwargs or {})
  d_side = int(side_model.embedding_dim)
  stages = []
  for i, split in enumerate(splits, start=1):
    stages.append(backbone_stage(f"v{i}", data=data, split=split, model=backbone_model, train_cfg=backbone_train(i),
                                 seed=10 + i, eval_batch_size=eval_batch_size, **bk))
    if i < n:  # the last version's ψ would only serve a further update
      stages.append(side_info_stage(f"side{i}", method="simclr", data=data, split=split, model=side_model,
                                    train_cfg=side_train(i), seed=20 + i, eval_batch_size=eval_batch_size, **sk))

  def h(name, old, new, split, side):
    kw = dict(side_info_kind="simclr", side_info_dim=d_side, side_info_stage=side) if side else {}
    return transformation_stage(name, data=data, split=split, model=h_model, train_cfg=h_train(name), seed=30,
                                old=old, new=new, eval_batch_size=eval_batch_size, **kw, **hk)

  for i in range(2, n + 1):
    stages += [h(f"h{i}", f"v{i - 1}", f"v{i}", splits[i - 1], f"side{i - 1}"),
               h(f"h{i}_none", f"v{i - 1}", f"v{i}", splits[i - 1], "")]
    if i < n:  # g{i}: (φ_{i-1}, ψ_{i-1}) → ψ_i on the v{i} training set
      stages.append(h(f"g{i}", f"v{i - 1}", f"side{i}", splits[i - 1], f"side{i - 1}"))
  direct = f"h1{n}" if n < 10 else f"h1to{n}"
  stages += [h(direct, "v1", f"v{n}", splits[-1], "side1"), h(f"{direct}_none", "v1", f"v{n}", splits[-1], "")]

  def chain(k, none):
    """The v1 gallery upgraded hop by hop to v{k}: (row name, query, hops)."""
    name, hops = "v1", []
    for i in range(2, k + 1):
      name = f"h{i}({name})"
      g = "" if none or i == k else f"g{i}"
      hops.append([f"h{i}_none" if none else f"h{i}", g])
    return f"v{k}/{name}", f"v{k}", hops

  rows = []
  for none in (False, True):
    tag, suffix = ("[none]", "_none") if none else ("", "")
    rows += [(f"v{i}/h{i}(v{i - 1}){tag}", f"v{i}", [[f"h{i}{suffix}", ""]]) for i in range(2, n + 1)]
    rows += [(f"{name}{tag}", query, hops) for name, query, hops in (chain(k, none) for k in range(3, n + 1))]
    rows.append((f"v{n}/{direct}(v1){tag}", f"v{n}", [[f"{direct}{suffix}", ""]]))
  stages.append(sequence_evaluation_stage("eval", data=data, split=eval_split,
                                          backbones=tuple(f"v{i}" for i in range(1, n + 1)), rows=rows,
                                          eval_batch_size=eval_batch_size))
  return stages
