"""The partial-backfilling curves as the report reads them from a results dictionary (``results.json``).

The evaluation stage's ``backfill`` section (``fct_jax.retrieval.summary``) holds one curve per transformed gallery
and ordering, keyed ``"<gallery model>:<ordering>"`` (``"h[simclr]:random"``, ``"h[fastfill]:sigma"``; the gallery
model named as in the case rows ``new/<gallery model>``), each ``{"gallery", "ordering", "fractions", "cmc_top1",
"cmc_top5", "mAP", "auc": {metric: …}}`` in percent, or None. A curve's AUC is the *mean* of the metric over the
grid points (FastFill's protocol), so it is comparable with FastFill's published numbers only on the same grid.

The Markdown (``render``), the plot (``plots``) and the multi-seed report (``seeds``) read the section through
:func:`curves`, so a ``results.json`` of an older version (one curve, trapezoid AUC) is refused in one place.
"""

import math
from typing import Mapping, Sequence

from fct_jax.errors import FCTError

METRICS = (("cmc_top1", "top-1"), ("cmc_top5", "top-5"), ("mAP", "mAP"))
# What each ordering means (the report prints the ones its curves use).
ORDERINGS = {"random": "a seeded random order (FCT's)",
             "sigma": "largest predicted uncertainty σ first (FastFill; h with an uncertainty head)",
             "distance": "largest ‖φ_new − h‖ first (an oracle: it needs φ_new of every item; for reference)"}
# The flat reference curves beside the backfilling curves: the case rows at "no update yet" and "fully backfilled".
REFERENCES = ("old/old", "new/new")


def curves(results: Mapping) -> dict:
  """The results' backfilling curves, ``{"<gallery>:<ordering>": curve}`` in their order ({} for none).

  Raises a one-line error for the single-curve section written by an older version of fct_jax (it has a
  ``fractions`` key of its own): its AUC is another rule, so it is not shown as if it were comparable.
  """
  bf = results.get("backfill")
  if not bf:
    return {}
  if "fractions" in bf:
    raise FCTError("results.json has the single backfilling curve of an older version of fct_jax; rerun the "
                   "evaluation stage with this version for the per-gallery, per-ordering curves")
  return dict(bf)


def split_key(key: str) -> tuple[str, str]:
  """``"h[fastfill,none]:sigma"`` -> ``("h[fastfill,none]", "sigma")``."""
  gallery, _, ordering = key.rpartition(":")
  return gallery, ordering


def grid(results: Mapping) -> list:
  """The backfilled fractions of the curves (the first curve's; the producer uses one grid), [] for none."""
  cs = curves(results)
  return list(next(iter(cs.values()))["fractions"]) if cs else []


def auc_rule(fractions: Sequence[float]) -> str:
  """The sentence defining the AUC over ``fractions``: ``"AUC: mean over the 22 grid points f = i/21"``."""
  n = len(fractions)
  if n > 1 and all(math.isclose(f, i / (n - 1), abs_tol=1e-9) for i, f in enumerate(fractions)):
    points = f"f = i/{n - 1}"
  else:
    points = "f ∈ {" + ", ".join(f"{f:.3g}" for f in fractions) + "}"
  return f"AUC: mean over the {n} grid points {points}"


def references(results: Mapping) -> dict:
  """The flat reference rows of the case table, ``{"old/old": [top-1, top-5, mAP], "new/new": …}`` (those present):
  a flat curve's AUC is the metric itself; new/new is also every curve's value at f = 1."""
  cases = results.get("cases") or {}
  return {r: [cases[r].get(m) for m, _ in METRICS] for r in REFERENCES if r in cases}
