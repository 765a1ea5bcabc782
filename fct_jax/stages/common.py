"""Helpers shared by stages: the run context, model building from a saved stage config, upstream loading."""

import dataclasses
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from fct_jax import checkpoint, models, train_lib
from fct_jax.data import augment, sources
from fct_jax.errors import FCTError


@dataclasses.dataclass
class Context:
  """What a stage gets besides its config: the experiment workdir, the mesh, and test hooks."""
  workdir: str
  mesh: Any = None
  stop_at_step: Optional[int] = None


def model_kwargs(model_cfg) -> dict:
  """Config block ``model`` → constructor kwargs (all fields but ``name``; lists become tuples)."""
  kw = {k: v for k, v in model_cfg.to_dict().items() if k != "name"}
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def build_backbone(cfg, num_classes: int):
  """The backbone module a backbone-stage config describes."""
  return models.get_model(cfg.model.name, num_classes=num_classes, **model_kwargs(cfg.model))


def upstream_dir(ctx: Context, stage: str, needed_by: str) -> str:
  """The finished workdir of stage ``stage``; a clear error if it is missing or unfinished."""
  d = os.path.join(ctx.workdir, stage)
  if not checkpoint.is_done(d):
    state = "is unfinished" if os.path.isdir(d) else "is missing"
    raise FCTError(f"stage {needed_by!r} needs stage {stage!r}, but {d} {state}; run that stage first "
                   f"(--config=...:stage={stage})")
  return d


def stage_config(ctx: Context, stage: str, needed_by: str) -> ml_collections.ConfigDict:
  """The saved config of a finished stage (no checkpoint is loaded)."""
  d = upstream_dir(ctx, stage, needed_by)
  return ml_collections.ConfigDict(checkpoint.read_json(os.path.join(d, "config.json")))


def load_stage(ctx: Context, stage: str, needed_by: str):
  """Loads a finished stage: ``(config, variables)`` with the config it was built with."""
  cfg = stage_config(ctx, stage, needed_by)  # also checks that the stage is finished
  return cfg, checkpoint.load_model(os.path.join(ctx.workdir, stage))


def load_backbone(ctx: Context, stage: str, needed_by: str):
  """``(module, variables, cfg)`` of a finished backbone stage, rebuilt from its own saved config."""
  cfg, variables = load_stage(ctx, stage, needed_by)
  if cfg.kind != "backbone":
    raise FCTError(f"stage {needed_by!r} expects {stage!r} to be a backbone stage, not {cfg.kind!r}")
  _, info = sources.get_source(cfg.data, cfg.split)
  return build_backbone(cfg, info.num_classes), variables, cfg


def embed(module, variables, source, *, batch_size: int, mesh=None, transform=None) -> np.ndarray:
  """Embeddings [N, D] of a whole source with a backbone in eval mode.

  ``transform``: the per-example evaluation transform (default :func:`augment.eval_transform`; stages pass
  :func:`eval_transform` of their config).
  """
  out = train_lib.predict(lambda v, b: {"embedding": module.apply(v, b["image"], train=False)["embedding"]},
                          variables, source, batch_size=batch_size, transform=transform or augment.eval_transform,
                          mesh=mesh)
  return out["embedding"]


def eval_transform(cfg):
  """The evaluation transform a stage config selects with ``eval_augment`` ("default" when absent)."""
  return augment.get_eval_transform(cfg.get("eval_augment", "default") or "default")


def source_labels(source, key: str = "label") -> np.ndarray:
  """All labels of a source, in order (fast for in-memory sources)."""
  arrays = getattr(source, "arrays", None)
  if arrays is not None and key in arrays:
    return np.asarray(arrays[key])
  return np.asarray([source[i][key] for i in range(len(source))])


def eval_source(cfg):
  """``(source, labels)`` of the stage's optional ``eval_split`` (periodic evaluation), or ``(None, None)``."""
  if not cfg.get("eval_split"):
    return None, None
  source, _ = sources.get_source(cfg.data, cfg.eval_split)
  return source, source_labels(source)


def train_and_save(cfg, stage_dir: str, ctx: Context, task, source) -> bool:
  """Runs the training loop for a stage and saves its final variables to ``stage_dir/model``.

  Returns whether the stage finished; ``False`` after an early stop (``stop_at_step``), whose checkpoint lets a
  rerun resume.
  """
  state, _ = train_lib.train(cfg=cfg, workdir=stage_dir, task=task, source=source, mesh=ctx.mesh,
                             stop_at_step=ctx.stop_at_step)
  if int(state["step"]) < train_lib.steps_for(cfg.train, len(source))[1]:
    return False
  checkpoint.save_model(stage_dir, {"params": state["params"], **state["model_state"]})
  return True


def write_stage_results(stage_dir: str, payload, table: str):
  """The evaluation's plain results in its own stage directory (process 0); the experiment-level results.md/json
  and plots are the report's (``fct_jax.report.write``)."""
  if jax.process_index() == 0:
    checkpoint.write_json(os.path.join(stage_dir, "results.json"), payload)
    checkpoint.write_text(os.path.join(stage_dir, "results.md"), table + "\n")
    print(table, flush=True)


def check_finite_embeddings(x: np.ndarray, what: str):
  if not np.all(np.isfinite(x)):
    raise FCTError(f"{what} contain NaN/Inf ({int(np.sum(~np.isfinite(x)))} values)")


def eval_batch_size(cfg, mesh) -> int:
  """The configured eval batch size rounded up to a multiple of the device count."""
  n = (mesh.size if mesh is not None else jax.device_count())
  b = int(cfg.get("eval_batch_size", 256))
  return -(-b // n) * n
