"""Helpers shared by the training stages: the periodic-evaluation split, training then saving, the stage results.

Reading finished stages (configs, models, ψ, h) is :mod:`fct_jax.artifacts`' job.
"""

import os

import jax

from fct_jax import artifacts, checkpoint, train_lib
from fct_jax.data import sources


def eval_source(cfg):
  """``(source, labels)`` of the stage's optional ``eval_split`` (periodic evaluation), or ``(None, None)``."""
  if not cfg.eval_split:
    return None, None
  source, _ = sources.get_source(cfg.data, cfg.eval_split)
  return source, artifacts.source_labels(source)


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
