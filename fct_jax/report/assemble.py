"""The report's content: an evaluation stage's results plus the paper's rows and the cost of the update.

``results.json`` holds, in this order: the evaluation payload's keys (``cases``, ``num_eval``, …), then
``experiment``, ``cmc_curves``, ``cka``, ``paper``, ``backfill``, ``compatibility`` and ``cost``. The order is the
file's format (readers and the README's block follow it), so :func:`build` writes it out key by key. ``paper``
carries FastFill's backfilling AUCs for our curves too (``paper.backfill``), where the paper table has them.
"""

import os
from typing import Optional

import jax
from etils import epath

from fct_jax.errors import FCTError
from fct_jax.gallery import cost as cost_lib
from fct_jax.report import backfill, paper, render
from fct_jax.retrieval import cases as cases_lib
from fct_jax.retrieval import summary


def cost_section(transformation_dir: str) -> Optional[dict]:
  """The per-item cost of the update (`gallery.cost.cost_report`) of a finished transformation stage, or None.

  None when there is no such stage; ``{"error": ...}`` when it cannot be computed here (e.g. the new model's data is
  not here to tell its image size), so the rest of the report is still written.
  """
  if not transformation_dir or not epath.Path(transformation_dir, "config.json").exists():
    return None
  try:
    return cost_lib.cost_report(transformation_dir)
  except FCTError as e:
    return {"error": str(e)}


def build(results: summary.EvaluationResults, *, experiment: str = "", paper_table: str = "",
          transformation_dir: str = "") -> dict:
  """Everything the report shows, as one JSON-friendly dictionary (the content of ``results.json``).

  Args:
    results: what the evaluation stage returned (its payload and the sections computed from the embeddings).
    experiment: the experiment's name (the report's title).
    paper_table: a key of :data:`paper.PAPER_TABLES`, or "" for none.
    transformation_dir: a finished transformation stage, for the cost table ("" or missing: no cost table).

  Returns:
    The payload plus ``experiment``, ``cmc_curves``, ``cka``, ``paper``, ``backfill``, ``compatibility`` and
    ``cost`` (``paper``, ``backfill``, ``compatibility`` and ``cost`` None when not applicable); NaN as None.
  """
  paper.check_table(paper_table)
  payload, sections = results.payload, results.sections
  out = dict(payload)
  out["experiment"] = experiment
  out["cmc_curves"] = sections["cmc_curves"]
  out["cka"] = sections["cka"]
  curve_keys = list(backfill.curves({"backfill": sections["backfill"]}))
  out["paper"] = (paper.paper_section(paper_table, list(payload["cases"]), payload.get("side_info", "") or "",
                                      curve_keys) if paper_table else None)
  out["backfill"] = sections["backfill"]
  out["compatibility"] = sections["compatibility"]
  out["cost"] = cost_section(transformation_dir)
  return cases_lib.to_jsonable(out)


def write(workdir: str, results: summary.EvaluationResults, cfg, experiment: str) -> dict:
  """Builds the report of an evaluation stage and writes it into the experiment workdir.

  Every process builds (the cost analysis compiles the models; cheap), process 0 writes.

  Args:
    workdir: the experiment workdir (the stage directories' parent).
    results: what the evaluation stage's ``run`` returned.
    cfg: the (resolved) evaluation stage config: ``paper_table`` ("" for none) and ``transformation`` (the stage
      whose cost is reported; "" for none, e.g. update sequences).
    experiment: the experiment's name (the report's title).

  Returns:
    The results dictionary (what ``results.json`` holds).
  """
  # A plan on stored vectors has no image models whose cost the update would save: no cost table.
  costed = cfg.transformation and cfg.data.name != "vectors"
  out = build(results, experiment=experiment, paper_table=cfg.paper_table,
              transformation_dir=os.path.join(workdir, cfg.transformation) if costed else "")
  if jax.process_index() == 0:
    paths = render.write_files(out, workdir)
    print(f"[report] wrote {', '.join(os.path.basename(p) for p in paths)} in {workdir}", flush=True)
  return out
