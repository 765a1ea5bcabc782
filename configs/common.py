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
          eval_every_steps: int = 0, checkpoint_every_steps: int = 500) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "batch_size": batch_size, "epochs": float(epochs), "steps": steps, "optimizer": optimizer_cfg,
      "log_every_steps": log_every_steps, "eval_every_steps": eval_every_steps,
      "checkpoint_every_steps": checkpoint_every_steps, "keep_checkpoints": 2, "num_data_threads": 2})


def backbone_stage(name: str, *, data, split: str, model, train_cfg, seed: int, label_smoothing: float = 0.1,
                   augment: str = "none", eval_split: str = "", eval_batch_size: int = 256):
  """φ_old / φ_new: softmax cross-entropy with label smoothing on ``split``."""
  return ml_collections.ConfigDict({
      "name": name, "kind": "backbone", "seed": seed, "data": data, "split": split, "model": model,
      "loss": {"label_smoothing": label_smoothing}, "train": train_cfg, "augment": augment,
      "eval_split": eval_split, "eval_batch_size": eval_batch_size, "prng_impl": "rbg"})


def side_info_stage(name: str, *, method: str = "simclr", data, split: str, model, train_cfg, seed: int,
                    projection_hidden_dim: int = 2048, projection_dim: int = 128, projection_layers: int = 2,
                    temperature: float = 0.1, views=None, label_smoothing: float = 0.1, mixup_alpha: float = 0.2,
                    augment: str = "none", eval_split: str = "", eval_batch_size: int = 256):
  """ψ: the side-information model, trained on ``split`` (images only, except for the alternate old models).

  ``method``: simclr | autoencoder | alt_old | alt_old_mixup (see ``fct_jax/stages/side_info.py``). The width of
  ψ is ``model.embedding_dim``. ``simclr`` uses the ``simclr`` block (projection head, temperature, two-view
  augmentation ``views``: keyword arguments of ``augment.simclr_view``); the others use ``augment`` (a train
  transform), ``loss.label_smoothing`` and ``mixup.alpha``.
  """
  v = {"out_size": 0, "crop_scale": (0.08, 1.0), "flip": True, "jitter_strength": 0.5, "jitter_prob": 0.8,
       "grayscale_prob": 0.2, "blur_prob": 0.0}
  v.update(views or {})
  return ml_collections.ConfigDict({
      "name": name, "kind": "side_info", "method": method, "seed": seed, "data": data, "split": split,
      "model": model, "train": train_cfg,
      "simclr": {"projection": {"hidden_dim": projection_hidden_dim, "out_dim": projection_dim,
                                "num_layers": projection_layers},
                 "temperature": temperature, "augment": "simclr", "views": v},
      "loss": {"label_smoothing": label_smoothing}, "mixup": {"alpha": mixup_alpha}, "augment": augment,
      "eval_split": eval_split, "eval_batch_size": eval_batch_size, "prng_impl": "rbg"})


def transformation_stage(name: str, *, data, split: str, model, train_cfg, seed: int, old: str = "old",
                         new: str = "new", side_info_kind: str = "none", side_info_dim: int = 0,
                         side_info_stage: str = "", augment: str = "none", bn_eval_after: float = 0.5,
                         cache_features: bool = False, eval_batch_size: int = 256):
  """h(φ_old, ψ) ≈ φ_new with the L2 loss; ``old``/``new`` name the upstream stages.

  Side-information: ``side_info_kind="none"`` feeds zeros of width ``side_info_dim`` (0: no side branch);
  otherwise ``side_info_stage`` names the side_info stage to load, whose method must equal the kind and whose ψ
  width must equal ``side_info_dim``. ``cache_features`` (needs ``augment="none"``) computes the frozen models'
  features once instead of every step; ``eval_batch_size`` is that pass's batch.
  """
  return ml_collections.ConfigDict({
      "name": name, "kind": "transformation", "seed": seed, "data": data, "split": split, "model": model,
      "old": old, "new": new,
      "side_info": {"kind": side_info_kind, "dim": side_info_dim, "stage": side_info_stage},
      "train": train_cfg, "augment": augment, "bn_eval_after": bn_eval_after, "cache_features": cache_features,
      "eval_batch_size": eval_batch_size, "prng_impl": "rbg"})


def evaluation_stage(name: str, *, data, split: str, old: str = "old", new: str = "new",
                     transformation: str = "transformation", compare_transformations: Sequence[str] = (),
                     probe_fields: Sequence[str] = ("label",), eval_batch_size: int = 256):
  """The case table; ``compare_transformations`` add rows ``new/h[<side-info kind>]``; ``probe_fields`` are the
  example fields on which ψ, φ_old and φ_new are scored by leave-one-out 1-NN (with CKA(φ_old, ψ))."""
  return ml_collections.ConfigDict({
      "name": name, "kind": "evaluation", "data": data, "split": split, "old": old, "new": new,
      "transformation": transformation, "compare_transformations": list(compare_transformations),
      "probe_fields": list(probe_fields), "eval_batch_size": eval_batch_size})


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
