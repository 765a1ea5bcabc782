"""Shared config blocks. Experiment configs compose these; durations are epochs (or explicit steps)."""

from typing import Optional, Sequence

import ml_collections

from fct_jax import config_schema


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


def optimizer(name: str, lr: float, **fields) -> ml_collections.ConfigDict:
  """The ``optimizer`` block: ``name`` (momentum | nesterov | adam | adamw | lars | sgd), ``lr`` and any other field
  of ``fct_jax.config_schema.OPTIMIZER`` given; the rest are the schema's defaults."""
  return ml_collections.ConfigDict({"name": name, "lr": lr, **fields})


def train(*, batch_size: int, epochs: float, optimizer_cfg, **fields) -> ml_collections.ConfigDict:
  """The ``train`` block of a stage: batch, duration (epochs, or ``steps`` > 0), optimizer and any other field of
  ``fct_jax.config_schema.TRAIN`` given (cadences, ``steps_per_call``, ``arrays_on_device``)."""
  return ml_collections.ConfigDict({"batch_size": batch_size, "epochs": float(epochs), "optimizer": optimizer_cfg,
                                    **fields})


def with_head(model, head: str) -> ml_collections.ConfigDict:
  """A copy of the model block with classifier ``head`` ("linear" or "arcface")."""
  m = ml_collections.ConfigDict(model.to_dict() if hasattr(model, "to_dict") else dict(model))
  m.head = head
  return m


# The builders' flat keywords → the schema field each sets (the other keywords are schema fields themselves).
ALIASES = {"train_cfg": "train", "label_smoothing": "loss.label_smoothing", "loss_kind": "loss.kind",
           "arcface_scale": "loss.arcface_scale", "arcface_margin": "loss.arcface_margin", "bct_old": "bct.old",
           "bct_weight": "bct.weight", "projection_hidden_dim": "simclr.projection.hidden_dim",
           "projection_dim": "simclr.projection.out_dim", "projection_layers": "simclr.projection.num_layers",
           "temperature": "simclr.temperature", "views": "simclr.views", "mixup_alpha": "mixup.alpha",
           "side_info_kind": "side_info.kind", "side_info_dim": "side_info.dim", "side_info_stage": "side_info.stage"}


def _plain(value):
  return value.to_dict() if hasattr(value, "to_dict") else value


def _put(block: dict, path: str, value):
  """Sets ``block[path]`` (dotted), merging into a block already there."""
  *parents, key = path.split(".")
  for p in parents:
    block = block.setdefault(p, {})
  value = _plain(value)
  if isinstance(value, dict) and isinstance(block.get(key), dict):
    for k, v in value.items():
      _put(block[key], k, v)
  else:
    block[key] = value


def build_stage(kind: str, name: str, **fields) -> ml_collections.ConfigDict:
  """The resolved config of stage ``name`` of ``kind``: the given fields (schema names or :data:`ALIASES`) over
  the schema's defaults (``fct_jax.config_schema``); an unknown field raises ``ValueError`` naming the valid ones."""
  given = {"name": name, "kind": kind}
  for key, value in fields.items():
    _put(given, ALIASES.get(key, key), value)
  return config_schema.resolve(given)


def backbone_stage(name: str, **fields):
  """φ_old / φ_new: softmax cross-entropy (or ArcFace) with label smoothing on ``split``.

  ``loss_kind="arcface"``: the ArcFace loss (``arcface_scale``, ``arcface_margin``); the model block must then have
  ``head="arcface"`` (the stage refuses a mismatch; ``--config.stages.NAME.model.head=arcface
  --config.stages.NAME.loss.kind=arcface`` switches a stage to ArcFace). ``bct_old`` (a finished backbone stage)
  makes it BCT's new model: + ``bct_weight`` × the influence loss through that stage's frozen classifier (and with
  that stage's own loss), extended with its class means for the classes it never saw.
  """
  return build_stage("backbone", name, **fields)


def side_info_stage(name: str, **fields):
  """ψ: the side-information model, trained on ``split`` (images only, except for the alternate old models).

  ``method``: simclr | autoencoder | alt_old | alt_old_mixup (see ``fct_jax/stages/side_info.py``). The width of
  ψ is ``model.embedding_dim``. ``simclr`` uses the ``simclr`` block (projection head, temperature, two-view
  augmentation ``views``: keyword arguments of ``simclr_views.simclr_view``); the others use ``augment`` (a train
  transform), ``loss`` and ``mixup.alpha``. ``input_norm="image"`` standardises every input image by its own mean
  and standard deviation inside ψ (for every method, in training and wherever ψ is computed later).
  """
  return build_stage("side_info", name, **fields)


def transformation_stage(name: str, **fields):
  """h(φ_old, ψ) ≈ φ_new with the L2 loss; ``old``/``new`` name the upstream stages (``new`` a side_info stage:
  g(φ_i, ψ_i) ≈ ψ_{i+1} for update sequences). ``method="fastfill"``: FastFill's h with an uncertainty head and its
  loss (the ``fastfill`` block: ``sigma_dim``, ``mu_sim``, ``mu_disc``, ``mu_unc``, ``label_smoothing``; the
  official recipe by default; h only, not g).

  Side-information: ``side_info_kind="none"`` feeds zeros of width ``side_info_dim`` (0: no side branch);
  ``"old"`` feeds φ_old again as ψ (the official FastFill code's "no side-info"; ``side_info_dim`` = d_old);
  otherwise ``side_info_stage`` names the side_info stage to load, whose method must equal the kind and whose ψ
  width must equal ``side_info_dim``. ``feature_mode``: ``online`` (ml-fct: frozen models run on augmented images
  every step) or ``cached`` (features of ``cache_views`` augmented views per image computed once and stored);
  ``eval_batch_size`` is the caching pass's batch. ``bn_eval_after``: fraction of the steps after which h's
  BatchNorm runs in eval mode.
  """
  return build_stage("transformation", name, **fields)


def evaluation_stage(name: str, **fields):
  """The case table; ``compare_transformations`` add rows ``new/h[<side-info kind>]``; ``probe_fields`` are the
  example fields on which ψ, φ_old and φ_new are scored by leave-one-out 1-NN (with CKA(φ_old, ψ)); ``bct`` (a
  BCT backbone stage) adds the rows ``bct-new/old`` and ``bct-new/bct-new``; ``paper_table`` (e.g. ``"table1"``,
  a key of ``fct_jax.report.PAPER_TABLES``) prints the paper's numbers beside ours in results.md."""
  return build_stage("evaluation", name, **fields)


def fct_plan(*, data, old_model, new_model, backbone, side_info, transformation, evaluation, ablation=(),
             fastfill=None, every=None) -> list:
  """The FCT plan: old → side_info → new → bct_new → transformation_none → transformation [→ transformation_fastfill_none
  → transformation_fastfill] [→ ablation] → eval.

  old (seed 1) is trained on ``old_train``; new and the BCT baseline bct_new (seed 2; + the influence loss through
  old's classifier) on ``new_train``; ψ (``side_info``, seed 4) on the old training images; the transformations
  (seed 3) on ``new_train``, without (``transformation_none``) and with ψ (``transformation``); ``eval`` compares
  both (rows ``new/h[<kind>]``) and bct_new.

  Args:
    data: the data block of every stage.
    old_model, new_model: the backbones' model blocks.
    backbone, side_info, transformation, evaluation: further fields of old / new / bct_new, of ψ (its ``method``,
      ``model``, ``train``...), of every transformation (``model``, ``train``...) and of eval.
    ablation: Table 6's other ψ: ``(method, short name, fields)``, each a side_info stage ``side_<short>`` (seed 5,
      ``old_train``) and its transformation ``transformation_<short>``, compared in eval.
    fastfill: None, or the fields (over ``transformation``'s) of two FastFill transformations (``method="fastfill"``,
      seed 3): ``transformation_fastfill_none`` (ψ = 0) and ``transformation_fastfill`` (ψ = side_info), compared in
      eval (rows ``new/h[fastfill,none]``, ``new/h[fastfill]``).
    every: fields of every stage (e.g. ``eval_augment``).

  Returns:
    the stage configs in order.
  """
  every = dict(every or {})
  side = lambda name, seed, fields: side_info_stage(name, data=data, split="old_train", seed=seed,
                                                    **every, **fields)

  def h(name, side_stage=None, fields=None):
    kw = {}
    if side_stage is not None:
      kw = dict(side_info_kind=side_stage.method, side_info_dim=int(side_stage.model.embedding_dim),
                side_info_stage=side_stage.name)
    return transformation_stage(name, data=data, split="new_train", seed=3, **every,
                                **{**transformation, **(fields or {})}, **kw)

  psi = side("side_info", 4, side_info)
  stages = [
      backbone_stage("old", data=data, split="old_train", model=old_model, seed=1, **every, **backbone), psi,
      backbone_stage("new", data=data, split="new_train", model=new_model, seed=2, **every, **backbone),
      backbone_stage("bct_new", data=data, split="new_train", model=new_model, seed=2, bct_old="old", **every,
                     **backbone),
      h("transformation_none"), h("transformation", psi)]
  compared = ["transformation_none", "transformation"]
  if fastfill is not None:
    ff = dict(fastfill, method="fastfill")
    stages += [h("transformation_fastfill_none", None, ff), h("transformation_fastfill", psi, ff)]
    compared += ["transformation_fastfill_none", "transformation_fastfill"]
  for method, short, fields in ablation:
    alt = side(f"side_{short}", 5, dict(fields, method=method))
    stages += [alt, h(f"transformation_{short}", alt)]
    compared.append(f"transformation_{short}")
  stages.append(evaluation_stage("eval", data=data, split="eval", compare_transformations=compared, bct="bct_new",
                                 **every, **evaluation))
  return stages


def experiment(name: str, stages: Sequence[ml_collections.ConfigDict], stage: str = ""):
  """The plan: ``experiment``, ``plan`` (stage names in order), ``stages`` (resolved), ``stage`` (``""``: the
  whole plan; a stage name: that stage alone) and the experiment-level fields of ``config_schema.EXPERIMENT``
  (``seeds``: ``--config.seeds=3`` runs the plan for 3 seed sets). Overrides are ``--config.stages.NAME.FIELD=VALUE``
  either way."""
  by_name = {s.name: config_schema.resolve(s) for s in stages}
  if stage and stage not in by_name:
    raise ValueError(f"unknown stage {stage!r}; valid: {', '.join(by_name)}")
  return ml_collections.ConfigDict({"experiment": name, "stage": stage, "plan": list(by_name),
                                    "stages": {k: v.to_dict() for k, v in by_name.items()},
                                    **config_schema.EXPERIMENT})


def sequence_evaluation_stage(name: str, *, rows, **fields):
  """Table 5: ``backbones`` against themselves plus ``rows`` ``(name, query, hops)``: the query backbone against the
  first version's stored φ, ψ upgraded through ``hops`` (``[[h, g], ...]``; see fct_jax/stages/sequence.py)."""
  rows = [{"name": n, "query": q, "hops": [list(h) for h in hops]} for n, q, hops in rows]
  return build_stage("sequence_evaluation", name, rows=rows, **fields)


def sequence_stages(*, data, splits: Sequence[str], backbone_model, side_model, h_model, backbone_train,
                    side_train, h_train, side_kwargs=None, backbone_kwargs=None, h_kwargs=None,
                    eval_split: str = "eval", **every):
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
    eval_split: the sequence evaluation's split.
    **every: fields of every stage (e.g. ``eval_batch_size``, ``eval_augment``).
  """
  n = len(splits)
  if n < 3:
    raise ValueError(f"an update sequence needs at least 3 versions (splits), got {n}")
  bk, sk, hk = dict(backbone_kwargs or {}), dict(side_kwargs or {}), dict(h_kwargs or {})
  d_side = int(side_model.embedding_dim)
  stages = []
  for i, split in enumerate(splits, start=1):
    stages.append(backbone_stage(f"v{i}", data=data, split=split, model=backbone_model, train_cfg=backbone_train(i),
                                 seed=10 + i, **every, **bk))
    if i < n:  # the last version's ψ would only serve a further update
      stages.append(side_info_stage(f"side{i}", method="simclr", data=data, split=split, model=side_model,
                                    train_cfg=side_train(i), seed=20 + i, **every, **sk))

  def h(name, old, new, split, side):
    kw = dict(side_info_kind="simclr", side_info_dim=d_side, side_info_stage=side) if side else {}
    return transformation_stage(name, data=data, split=split, model=h_model, train_cfg=h_train(name), seed=30,
                                old=old, new=new, **every, **kw, **hk)

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
                                          backbones=[f"v{i}" for i in range(1, n + 1)], rows=rows, **every))
  return stages
