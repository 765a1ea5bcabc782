r"""The experiment report: ``results.md``, ``results.json`` and PNG plots in the experiment workdir.

An evaluation stage (``stages/evaluation.py``, ``stages/sequence.py``) returns its case table and what it computed
from the embeddings (:class:`fct_jax.retrieval.summary.EvaluationResults`: CMC curves, CKA, the partial-backfilling
curves per transformed gallery and ordering, the compatibility matrix of update sequences); ``experiment.run`` then
calls :func:`write`, which adds

* the paper's numbers side by side, when the evaluation stage config names a paper table (``paper_table``:
  ``table1`` … ``table6``, ``mlfct_cifar100``, see :data:`PAPER_TABLES`, data in ``paper_tables.json``), and
  FastFill's backfilling AUCs where that table's dataset has them (:data:`PAPER_BACKFILL`);
* the per-example cost of the update (backfilling vs BCT vs FCT, ``gallery/cost.py``);

and renders. Everything lands in ``results.json`` first; ``results.md`` and the plots are rendered from that
dictionary alone, so ``python -m fct_jax.report --workdir DIR`` redraws them later (see ``__main__.py``).

A multi-seed plan (``--config.seeds=N``) gets a combined report over its seed sets' reports (`seeds`: mean ± sample
sd, the orderings that hold in each seed).

Modules: `backfill` (the backfilling curves as the report reads them: keys, grid, AUC rule, references), `paper`
(the published tables as data), `assemble` (the results dictionary; :func:`write`), `render` (Markdown, files, the
README block), `plots`, `seeds` (the multi-seed report).
"""

from fct_jax.report.assemble import build, write
from fct_jax.report.backfill import curves as backfill_curves
from fct_jax.report.paper import PAPER_BACKFILL, PAPER_CKA, PAPER_SIDE_INFO, PAPER_TABLES, backfill_section
from fct_jax.report.paper import check_table, paper_rows
from fct_jax.report.plots import plot_all
from fct_jax.report.render import RESULTS_JSON, RESULTS_MD, backfill_table, case_table, markdown, readme_block
from fct_jax.report.render import rerender, update_readme, write_files
from fct_jax.report.seeds import parse_ordering
from fct_jax.report.seeds import write as write_seeds

__all__ = ["build", "write", "backfill_curves", "PAPER_TABLES", "PAPER_CKA", "PAPER_SIDE_INFO", "PAPER_BACKFILL",
           "backfill_section", "check_table", "paper_rows", "plot_all", "RESULTS_JSON", "RESULTS_MD", "backfill_table",
           "case_table", "markdown", "readme_block", "rerender", "update_readme", "write_files", "parse_ordering",
           "write_seeds"]
