"""The published numbers, kept as data in ``paper_tables.json`` beside this module.

``PAPER_TABLES``: table -> case -> (CMC top-1 %, CMC top-5 %, mAP@1.0 %), keyed by our case names (query model /
gallery model; ``bct-new`` is φ_new^BCT, ``h`` is h(φ_old, ψ)); ``table1`` … ``table6`` (Ramanujan et al., CVPR
2022) and ``mlfct_cifar100`` (ml-fct's README), the evaluation stage config's ``paper_table``. ``PAPER_CKA``:
Table 6's CKA(φ_old, ψ) column by side-information method. ``PAPER_SIDE_INFO``: the side-information behind each
table's h rows. ``PAPER_BACKFILL``: FastFill's (Jaeckle et al., ICLR 2023) partial-backfilling AUCs, by dataset,
keyed by our curve names (``h[fastfill]:sigma``); ``BACKFILL_TABLES``: the ``paper_table`` → that dataset. The JSON
file says which table is which.
"""

import json
import os
from typing import Optional, Sequence

from fct_jax.errors import FCTError
from fct_jax.report import backfill
from fct_jax.retrieval import summary

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper_tables.json"), encoding="utf-8") as _f:
  _DATA = json.load(_f)
PAPER_TABLES = {table: {case: tuple(v) for case, v in rows.items()} for table, rows in _DATA["tables"].items()}
PAPER_CKA = _DATA["cka"]
# A run with another kind of side-information is compared only where the paper has that kind's row (Table 1's plan
# without side-information: new/h ↔ Table 6's "None", new/h[none]).
PAPER_SIDE_INFO = _DATA["side_info"]
# FastFill's numbers: dataset -> {"setting", "curves": {curve key: [t1, t5, mAP]}, "references": {case: [...]}}, and
# the paper_table whose experiment they belong to (the FCT plan of the same dataset) -> dataset.
PAPER_BACKFILL = _DATA["backfill"]["datasets"]
BACKFILL_TABLES = _DATA["backfill"]["tables"]
BACKFILL_SOURCE = "Jaeckle et al., FastFill, ICLR 2023"
BACKFILL_SIDE_INFO_NOTE = _DATA["backfill"]["side_info_note"]


def check_table(table: str, *, optional: bool = True):
  """Raises a one-line error unless ``table`` is a key of :data:`PAPER_TABLES`, or "" (none) when ``optional``."""
  if (table or not optional) and table not in PAPER_TABLES:
    raise FCTError(f"unknown paper_table {table!r}; valid: {', '.join(PAPER_TABLES)}")


def paper_rows(table: str, cases: Sequence[str], side_info: str = "") -> dict:
  """The paper's (top-1, top-5, mAP) of the cases that ``table`` has: ``{"q/g": [t1, t5, mAP]}``.

  ``side_info``: the kind behind our ``h``; when it is not the table's (:data:`PAPER_SIDE_INFO`), a row with ``h``
  is matched only to the paper's row for that kind (``new/h`` → ``new/h[none]``), or left without a paper value.
  """
  check_table(table, optional=False)
  rows = PAPER_TABLES[table]
  other_kind = bool(side_info) and table in PAPER_SIDE_INFO and side_info != PAPER_SIDE_INFO[table]
  out = {}
  for c in cases:
    key = c
    if other_kind and "h" in summary.split_case(c):
      key = f"{c}[{side_info}]"
    if key in rows:
      out[c] = list(rows[key])
  return out


def backfill_section(table: str, curve_keys: Sequence[str], side_info: str = "") -> Optional[dict]:
  """FastFill's AUCs for our curves ``curve_keys`` (``"<gallery>:<ordering>"``) in the experiment of ``table``.

  ``side_info``: the kind behind our plain ``h`` (an evaluation without ``compare_transformations`` names its only
  gallery ``h``): ``h:random`` is matched as ``h[<side_info>]:random``.

  Returns:
    ``{"source", "dataset", "setting", "curves": {key: [t1, t5, mAP]} (the keys we have), "references": {"old/old",
    "new/new"}, "note"}``; None when ``table`` has no FastFill numbers or none of our curves has one.
  """
  dataset = BACKFILL_TABLES.get(table)
  if not dataset:
    return None
  data = PAPER_BACKFILL[dataset]
  matched = {}
  for k in curve_keys:
    gallery, ordering = backfill.split_key(k)
    key = f"h[{side_info}]:{ordering}" if gallery == "h" and side_info else k
    if key in data["curves"]:
      matched[k] = list(data["curves"][key])
  if not matched:
    return None
  return {"source": BACKFILL_SOURCE, "dataset": dataset, "setting": data["setting"], "curves": matched,
          "references": {k: list(v) for k, v in data["references"].items()}, "note": BACKFILL_SIDE_INFO_NOTE}


def paper_section(table: str, cases: Sequence[str], side_info: str = "", curve_keys: Sequence[str] = ()) -> dict:
  """The report's ``paper`` section: the table's name, its rows for ``cases``, Table 6's CKA column, and FastFill's
  backfilling AUCs for our curves ``curve_keys`` (:func:`backfill_section`; None without)."""
  return {"table": table, "rows": paper_rows(table, cases, side_info),
          "cka": PAPER_CKA if table == "table6" else None, "backfill": backfill_section(table, curve_keys, side_info)}
