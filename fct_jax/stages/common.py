"""Helpers shared by the training stages: the periodic-evaluation split, training then saving, the stage results.

Reading finished stages (configs, models, ψ, h) is :mod:`fct_jax.artifacts`' job.
"""

import os

import jax

from fct_jax import artifacts, checkpoint, retrieval, train_lib
from fct_jax.data import sources


def eval_source(cfg):
  """``(source, labels)`` of the stage's optional ``eval_split`` (periodic evaluation), or ``(None, None)``."""
  if not cfg.eval_split:
    return None, None
  source, _ = sources.get_source(cfg.data, cfg.eval_split)
  return source, artifacts.source_labels(source)


def retrieval_eval(cfg, module, select, eval_source, eval_labels, mesh, what: str):
  """The periodic ``evaluate(state)`` of a stage that trains an embedding: retrieval top-1 and mAP on its
  ``eval_split`` (query = gallery, self excluded) of the embedding ``module`` computes with the variables
  ``select`` picks from the train state; None without an eval split. ``what`` names the embedding in errors."""
  if eval_source is None:
    return None
  batch_size, transform = artifacts.eval_batch_size(cfg, mesh), artifacts.eval_transform(cfg)

  def evaluate(state):
    variables = select({"params": state["params"], **state["model_state"]})
    emb = artifacts.embed(module, variables, eval_source, batch_size=batch_size, mesh=mesh, transform=transform)
    artifacts.check_finite_embeddings(emb, f"stage {cfg.name!r} {what}")
    r = retrieval.evaluate(emb, emb, eval_labels, eval_labels, query_is_gallery=True, ks=(1,))
    return {"retrieval_top1": r["cmc_top1"], "mAP": r["mAP"]}

  return evaluate


def train_and_save(cfg, stage_dir: str, ctx: artifacts.Context, task, source) -> bool:
  """Runs the training loop for a stage and saves its final variables to ``stage_dir/model``.

  Returns whether the stage finished; ``False`` after an early stop (``stop_at_step``), whose checkpoint lets a
  rerun resume.
  """
  state, _ = train_lib.train(cfg=cfg, workdir=stage_dir, task=task, source=source, mesh=ctx.mesh,
                             stop_at_step=ctx.stop_at_step)
  if int(state["step"]) < train_lib.resolve_steps(cfg.train, len(source)).total:
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
