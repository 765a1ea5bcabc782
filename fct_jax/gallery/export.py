"""An experiment's features as vector sets (``fct_jax.data.vectors``): what a plan on stored vectors reads.

``export_vectors`` writes, for a finished transformation stage of an image experiment,

* ``train/``: the rows h trained on — its cached features (φ_old, ψ, φ_new of ``cache_views`` augmented views per
  training image, ``features/*.npy``) with each row's label (row k·N + i is view k of image i);
* ``eval/``: φ_old, ψ and φ_new of the evaluation split's images (evaluation transform and batch of the evaluation
  stage ``eval_stage``), with their labels and ids;
* ``classifier.npz``: the new model's classifier (``kernel`` [d_new, C], and ``bias`` if it has one);
* ``export.json``: where they came from, the number of training images (``epoch_rows``: the rows per epoch that
  reproduce the stage's schedule) and the side-information's width and kind.

A plan on these files (``configs/vectors.py``) trains the same h as the stage did, bit for bit, given the same
recipe and seed: the proof that training from vectors is the same method (``tests/test_vectors_plan.py``), and the
way to move an experiment's embeddings to another system.
"""

import os
from typing import Optional

import jax
import numpy as np

from fct_jax import artifacts, checkpoint
from fct_jax.data import sources, vectors
from fct_jax.errors import FCTError


def export_vectors(experiment_dir: str, out_dir: str, *, transformation: str = "transformation",
                   eval_stage: str = "eval", split: Optional[str] = None) -> dict:
  """Writes ``out_dir/{train,eval}`` vector sets and ``classifier.npz`` (see the module docstring).

  Args:
    experiment_dir: the image experiment's workdir.
    out_dir: where the vector sets go (created; refused if it already holds an export).
    transformation: a finished transformation stage (an h, trained with ``feature_mode="cached"``).
    eval_stage: the evaluation stage whose split, transform and batch size embed the evaluation images.
    split: the evaluation split (default: the evaluation stage's).

  Returns:
    the ``export.json`` record.
  """
  ctx = artifacts.Context(workdir=os.path.abspath(experiment_dir))
  t = artifacts.load_transformation(ctx, transformation, "export")
  cfg = t.cfg
  if t.target_kind != "backbone":
    raise FCTError(f"export: {transformation!r} is a g (its target is side-information), not an h")
  if cfg.feature_mode != "cached":
    raise FCTError(f"export: {transformation!r} trained online (no stored features); export a cached-mode stage")
  fdir = checkpoint.join(artifacts.stage_dir(ctx, transformation, "export"), "features")
  meta_path = checkpoint.join(fdir, "meta.json")
  if not checkpoint.exists(meta_path):
    raise FCTError(f"export: {fdir} holds no finished feature cache")
  meta = checkpoint.read_json(meta_path)
  if checkpoint.exists(checkpoint.join(out_dir, "export.json")):
    raise FCTError(f"export: {out_dir} already holds an export; pick an empty folder")
  train_source, _ = sources.get_source(cfg.data, cfg.split)
  train_labels = artifacts.source_labels(train_source).astype(np.int64)
  feats = {k: np.load(checkpoint.join(fdir, f"{k}.npy")) for k in ("old", "psi", "new")}
  views = int(meta["views"])
  if len(feats["old"]) != views * len(train_labels):
    raise FCTError(f"export: {fdir} has {len(feats['old'])} rows, not {views} views × {len(train_labels)} images")

  ecfg = artifacts.stage_config(ctx, eval_stage, "export")
  split = split or ecfg.split
  eval_source, _ = sources.get_source(ecfg.data, split)
  batch, transform = artifacts.eval_batch_size(ecfg, ctx.mesh), artifacts.eval_transform(ecfg)
  embedded, backbone_vars = {}, {}
  for role in ("old", "new"):
    module, backbone_vars[role], _ = artifacts.load_backbone(ctx, cfg[role], "export")
    embedded[role] = artifacts.embed(module, backbone_vars[role], eval_source, batch_size=batch, transform=transform)
  side = artifacts.side_info_for(cfg, ctx)
  if side.method == "none":  # ψ = 0 is not stored: a plan on the vectors feeds zeros (side_info.kind="none")
    del feats["psi"]
  else:
    embedded["psi"] = (embedded["old"] if side.method == "old" else
                       side.embed(eval_source, batch_size=batch, transform=transform))
  eval_labels = artifacts.source_labels(eval_source).astype(np.int64)

  head = backbone_vars["new"].get("params", {}).get("classifier", {})
  record = {"experiment": os.path.abspath(experiment_dir), "transformation": transformation, "eval_stage": eval_stage,
            "split": split, "views": views, "epoch_rows": len(train_labels), "side_info_kind": cfg.side_info.kind,
            "side_info_dim": int(cfg.side_info.dim), "classifier": "kernel" in head}
  if jax.process_index() == 0:
    vectors.save_vectors(checkpoint.join(out_dir, "train"),
                         {**feats, "label": np.tile(train_labels, views)}, fmt="npy")
    vectors.save_vectors(checkpoint.join(out_dir, "eval"),
                         {**embedded, "label": eval_labels, "id": np.arange(len(eval_labels), dtype=np.int64)},
                         fmt="npy")
    if "kernel" in head:
      arrays = {"kernel": np.asarray(head["kernel"], np.float32)}
      if "bias" in head:
        arrays["bias"] = np.asarray(head["bias"], np.float32)
      np.savez(checkpoint.join(out_dir, "classifier.npz"), **arrays)
    checkpoint.write_json(checkpoint.join(out_dir, "export.json"), record)  # written last: the export is complete
  return record
