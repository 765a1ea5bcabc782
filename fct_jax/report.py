r"""The experiment's report: ``results.md``, ``results.json`` and PNG plots in the experiment workdir.

Written at the end of the evaluation stage (``stages/evaluation.py`` calls :func:`write`) from what it computed:
the case table (percent), the embeddings of the evaluation set and their labels. The report adds

* the paper's numbers side by side, when the evaluation stage config names a paper table (``paper_table``:
  ``table1`` … ``table6``, see :data:`PAPER_TABLES`);
* CMC curves top-1…top-k per case (from the retrieval kernel's per-query ``first_rank``);
* linear CKA between every pair of evaluated embeddings (old, new, h, …);
* the per-example cost of the update (backfilling vs BCT vs FCT, ``gallery/cost.py``);
* the partial-backfilling curve (``retrieval/backfill.py``: new queries, gallery h → φ_new in random order);
* for update sequences (rows such as ``v3/h3(h2(v1))``) the compatibility matrix, query model × gallery model,
  and each hop's error against the embedding its target model computes from the images.

Everything lands in ``results.json`` first; ``results.md`` and the plots are rendered from that dictionary alone,
so the Markdown's numbers are the JSON's, and ``python -m fct_jax.report --workdir DIR`` redraws them later:

  python -m fct_jax.report --workdir /tmp/fct_demo                          # re-render results.md and plots
  python -m fct_jax.report --workdir /tmp/fct_demo --update-readme README.md  # and the README's results block

The README block is the text between ``<!-- demo-results:start -->`` and ``<!-- demo-results:end -->``.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Mapping, Optional, Sequence

import numpy as np

from fct_jax.errors import FCTError

# File names inside the experiment workdir.
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
PLOTS = {"cmc": "cmc.png", "cases": "cases.png", "backfill": "backfill.png", "compatibility": "compatibility.png"}
README_START, README_END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"

# The paper's numbers (Ramanujan et al., CVPR 2022), typed from its tables: case -> (CMC top-1 %, CMC top-5 %,
# mAP@1.0 %), keyed by our case names (query model / gallery model; "bct-new" is φ_new^BCT, "h" is h(φ_old, ψ)).
PAPER_TABLES = {
    # Table 1: ImageNet-500 → ImageNet-1k, ResNet50-128 old and new, SimCLR side-information.
    "table1": {"old/old": (46.5, 64.6, 29.9), "new/old": (0.1, 0.5, 0.003), "new/new": (68.1, 84.4, 45.0),
               "bct-new/old": (46.9, 65.4, 30.1), "bct-new/bct-new": (62.4, 81.9, 41.1),
               "h/h": (59.3, 76.4, 41.3), "new/h": (65.0, 82.3, 43.6),
               # Table 6's "None" and "SimCLR-128-ImageNet-500" rows, the same experiment.
               "new/h[none]": (61.8, 80.5, 39.9), "new/h[simclr]": (65.0, 82.3, 43.6)},
    # Table 2: Places-182 → Places-365, ResNet50-512.
    "table2": {"old/old": (29.6, 58.2, 11.6), "new/old": (0.3, 1.5, 0.12), "new/new": (37.0, 65.1, 17.0),
               "bct-new/old": (30.4, 58.7, 12.6), "bct-new/bct-new": (34.9, 64.2, 16.0),
               "h/h": (34.0, 62.3, 17.3), "new/h": (35.8, 64.5, 18.1)},
    # Table 3: VGGFace2-863 → VGGFace2-8631, ArcFace, old ResNet18-128, new ResNet50-128, alt-old side-info.
    "table3": {"old/old": (84.0, 93.5, 44.6), "new/old": (0.2, 1.0, 0.2), "new/new": (96.6, 98.4, 77.8),
               "bct-new/old": (84.2, 93.9, 45.0), "bct-new/bct-new": (95.1, 98.3, 74.3),
               "h/h": (87.2, 94.9, 53.4), "new/h": (92.5, 97.5, 62.6)},
    # Table 4: changing architecture (new: ResNet50-128 on ImageNet-1k), one entry per old architecture.
    "table4_resnet18": {"new/new": (68.1, 84.4, 45.0), "old/old": (40.1, 60.1, 19.9), "h/h": (57.0, 75.0, 39.4),
                        "new/h": (64.2, 82.1, 42.6)},
    "table4_mobilenet": {"new/new": (68.1, 84.4, 45.0), "old/old": (42.3, 62.7, 20.3), "h/h": (57.6, 75.7, 39.8),
                         "new/h": (64.3, 82.1, 42.9)},
    "table4_resnet50_64": {"new/new": (68.1, 84.4, 45.0), "old/old": (44.7, 62.7, 30.6),
                           "h/h": (56.6, 74.1, 39.0), "new/h": (63.6, 81.9, 42.0)},
    # Table 5: the update sequence v1 (ImageNet-250) → v2 (-500) → v3 (-1k), SimCLR side-information.
    "table5": {"v1/v1": (29.6, 44.1, 15.5), "v2/v2": (46.5, 65.1, 28.7), "v3/v3": (68.1, 84.4, 45.0),
               "v2/h2(v1)": (40.5, 58.8, 26.4), "v3/h3(v2)": (65.0, 82.3, 43.6),
               "v3/h3(h2(v1))": (57.4, 78.0, 33.5), "v3/h13(v1)": (59.9, 79.3, 37.0)},
    # Table 6: kinds of side-information, new/h(φ_old, ψ) on ImageNet-500 → ImageNet-1k (CKA in PAPER_CKA).
    "table6": {"new/h[none]": (61.8, 80.5, 39.9), "new/h[autoencoder]": (62.0, 80.9, 40.5),
               "new/h[alt_old]": (63.5, 81.6, 42.1), "new/h[alt_old_mixup]": (63.8, 81.9, 42.4),
               "new/h[simclr]": (65.0, 82.3, 43.6), "new/h[simclr_imagenet1k]": (66.5, 83.3, 46.6)},
}
# Table 6's CKA(φ_old, ψ) column, keyed by side-information method.
PAPER_CKA = {"none": 0.0, "autoencoder": 0.04, "alt_old": 0.70, "alt_old_mixup": 0.66, "simclr": 0.27,
             "simclr_imagenet1k": 0.25}

# The side-information behind each table's h rows. A run with another kind is compared only where the paper has
# that kind's row (Table 1's plan without side-information: new/h ↔ Table 6's "None", new/h[none]).
PAPER_SIDE_INFO = {"table1": "simclr", "table2": "simclr", "table3": "alt_old", "table4_resnet18": "simclr",
                   "table4_mobilenet": "simclr", "table4_resnet50_64": "simclr", "table5": "simclr"}

_SEQUENCE_MODEL = re.compile(r"^v\d+$")


# ----------------------------------------------------------------------------------------------------- compute


def cmc_curves(embeddings: Mapping[str, np.ndarray], labels, cases: Sequence[str], *, max_k: int = 20,
               mesh=None) -> dict:
  """CMC top-1…top-``max_k`` (percent) of each case, from the retrieval kernel's per-query first positive rank.

  Args:
    embeddings: model name -> (N, d) embeddings of the evaluation set (the set is query and gallery).
    labels: (N,) labels.
    cases: case names ``"q/g"``.
    max_k: the last cut-off (capped at N − 1, the gallery size without the query itself).
    mesh: optional Mesh with a ``data`` axis (every process must call this on a multi-host mesh).

  Returns:
    ``{"k": [1..K], "cases": {"q/g": [cmc@1, ..., cmc@K]}}``.
  """
  from fct_jax import retrieval  # pylint: disable=g-import-not-at-top
  labels = np.asarray(labels)
  top = max(1, min(int(max_k), len(labels) - 1))
  ks = np.arange(1, top + 1)
  out = {}
  for case in cases:
    q, g = split_case(case)
    stats = retrieval.rank_stats(np.asarray(embeddings[q], np.float32), np.asarray(embeddings[g], np.float32),
                                 labels, labels, query_is_gallery=True, mesh=mesh)
    valid = stats.num_pos > 0
    ranks = stats.first_rank[valid]
    out[case] = ([float(100.0 * np.mean(ranks < k)) for k in ks] if ranks.size else [float("nan")] * len(ks))
  return {"k": [int(k) for k in ks], "cases": out}


def cka_matrix(embeddings: Mapping[str, np.ndarray]) -> dict:
  """Linear CKA between every pair of embeddings of the same images: ``{"models": [...], "values": [[...]]}``."""
  from fct_jax.retrieval import cka as cka_lib  # pylint: disable=g-import-not-at-top
  names = list(embeddings)
  vals = [[1.0 if i == j else None for j in range(len(names))] for i in range(len(names))]
  for i, a in enumerate(names):
    for j in range(i + 1, len(names)):
      vals[i][j] = vals[j][i] = float(cka_lib.linear_cka(embeddings[a], embeddings[names[j]]))
  return {"models": names, "values": vals}


def split_case(case: str) -> tuple[str, str]:
  """``"q/g"`` -> ``("q", "g")``; model names never contain ``/`` (``h3(h2(v1))`` is one name)."""
  q, sep, g = case.partition("/")
  if not sep:
    raise FCTError(f"case {case!r} is not of the form query_model/gallery_model")
  return q, g


def is_sequence(cases: Mapping[str, object]) -> bool:
  """True when the results hold update-sequence rows (query models named ``v1``, ``v2``, …)."""
  return any(_SEQUENCE_MODEL.match(split_case(c)[0]) for c in cases)


def compatibility_matrix(cases: Mapping[str, Mapping[str, float]], metric: str = "cmc_top1") -> dict:
  """The compatibility matrix of a set of cases: rows are query models, columns gallery models.

  Args:
    cases: ``{"q/g": {metric: value, ...}}`` (e.g. ``v3/h3(h2(v1))``).
    metric: which value fills a cell.

  Returns:
    ``{"metric", "queries": [...], "galleries": [...], "values": [[value or None]]}``, models in order of first
    appearance; a pair that was not evaluated is None.
  """
  queries, galleries = [], []
  for c in cases:
    q, g = split_case(c)
    queries += [q] if q not in queries else []
    galleries += [g] if g not in galleries else []
  values = [[_clean(cases.get(f"{q}/{g}", {}).get(metric)) for g in galleries] for q in queries]
  return {"metric": metric, "queries": queries, "galleries": galleries, "values": values}


def paper_rows(table: str, cases: Sequence[str], side_info: str = "") -> dict:
  """The paper's (top-1, top-5, mAP) of the cases that ``table`` has: ``{"q/g": [t1, t5, mAP]}``.

  ``side_info``: the kind behind our ``h``; when it is not the table's (:data:`PAPER_SIDE_INFO`), a row with ``h``
  is matched only to the paper's row for that kind (``new/h`` → ``new/h[none]``), or left without a paper value.
  """
  if table not in PAPER_TABLES:
    raise FCTError(f"unknown paper_table {table!r}; valid: {', '.join(PAPER_TABLES)}")
  rows = PAPER_TABLES[table]
  out = {}
  for c in cases:
    key = c
    if side_info and table in PAPER_SIDE_INFO and side_info != PAPER_SIDE_INFO[table] and "h" in split_case(c):
      key = f"{c}[{side_info}]"
    if key in rows:
      out[c] = list(rows[key])
  return out


def _clean(v):
  """NaN → None (strict JSON has no NaN); numpy scalars → python."""
  if v is None:
    return None
  v = v.item() if hasattr(v, "item") else v
  return None if isinstance(v, float) and math.isnan(v) else v


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return _clean(x)


def build(payload: Mapping, embeddings: Mapping[str, np.ndarray], labels, *, experiment: str = "",
          paper_table: str = "", transformation_dir: str = "", backfill_fractions: Sequence[float] = (
              0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), max_k: int = 20, mesh=None) -> dict:
  """Everything the report shows, as one JSON-friendly dictionary (the content of ``results.json``).

  Args:
    payload: the evaluation's results (``{"cases": {"q/g": {"cmc_top1", "cmc_top5", "mAP", ...}}, ...}``,
      percent); kept as is, the report's sections are added beside it.
    embeddings: model name -> (N, d) embeddings of the evaluation images (the models the cases name).
    labels: (N,) labels.
    experiment: the experiment's name (the report's title).
    paper_table: a key of :data:`PAPER_TABLES`, or "" for none.
    transformation_dir: a finished transformation stage, for the cost table ("" or missing: no cost table).
    backfill_fractions: backfilled fractions of the curve (needs models ``h`` and ``new``).
    max_k: last CMC cut-off of the curves.
    mesh: Mesh for the retrieval kernel (all processes call this on a multi-host mesh).

  Returns:
    ``payload`` plus ``experiment``, ``cmc_curves``, ``cka``, ``cost``, ``backfill``, ``paper`` and
    ``compatibility`` (the last three None when not applicable).
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from fct_jax.retrieval import backfill as backfill_lib  # pylint: disable=g-import-not-at-top
  cases = payload["cases"]
  if paper_table and paper_table not in PAPER_TABLES:
    raise FCTError(f"unknown paper_table {paper_table!r}; valid: {', '.join(PAPER_TABLES)}")
  used = [m for m in embeddings if any(m in split_case(c) for c in cases)]
  # One array under two names (the evaluation's "h" is also "h[simclr]") would only add a CKA of 1: keep the first.
  used = [m for i, m in enumerate(used) if not any(embeddings[m] is embeddings[p] for p in used[:i])]
  out = dict(payload)
  out["experiment"] = experiment
  out["cmc_curves"] = cmc_curves(embeddings, labels, list(cases), max_k=max_k, mesh=mesh)
  out["cka"] = cka_matrix({m: embeddings[m] for m in used})
  out["paper"] = ({"table": paper_table,
                   "rows": paper_rows(paper_table, list(cases), payload.get("side_info", "") or ""),
                   "cka": PAPER_CKA if paper_table == "table6" else None} if paper_table else None)
  out["backfill"] = None
  if "h" in embeddings and "new" in embeddings and np.shape(embeddings["h"]) == np.shape(embeddings["new"]):
    out["backfill"] = backfill_lib.backfill_curve(embeddings["h"], embeddings["new"], labels, order="random",
                                                  fractions=tuple(backfill_fractions), mesh=mesh)
  out["compatibility"] = compatibility_matrix(cases) if is_sequence(cases) else None
  out["cost"] = None
  if transformation_dir and epath.Path(transformation_dir, "config.json").exists():
    from fct_jax.gallery import cost as cost_lib  # pylint: disable=g-import-not-at-top
    try:
      out["cost"] = cost_lib.cost_report(transformation_dir)
    except FCTError as e:  # e.g. the new model's data is not here to tell its image size: say so, go on
      out["cost"] = {"error": str(e)}
  return _jsonable(out)


# ------------------------------------------------------------------------------------------------------ render


def _f(x, digits: int = 1) -> str:
  return "–" if x is None else f"{x:.{digits}f}"


def _paper_cell(v: float) -> str:
  # The paper prints new/old mAP with more digits (0.003); keep them rather than showing 0.0.
  return f"{v:g}" if 0 < abs(v) < 0.1 else f"{v:.1f}"


def case_table(results: Mapping) -> str:
  """The case table in the paper's layout (CMC top-1, top-5, mAP@1.0), with the paper's numbers when named."""
  paper = (results.get("paper") or {}).get("rows") or {}
  head = ["Case", "CMC top-1 (%)", "CMC top-5 (%)", "mAP@1.0 (%)"]
  if paper:
    head += [f"paper top-1 ({results['paper']['table']})", "paper top-5", "paper mAP"]
  head += ["queries", "skipped"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for name, r in results["cases"].items():
    row = [name, _f(r.get("cmc_top1")), _f(r.get("cmc_top5")), _f(r.get("mAP"))]
    if paper:
      row += [_paper_cell(v) for v in paper[name]] if name in paper else ["", "", ""]
    row += [str(r.get("num_queries", "")), str(r.get("num_skipped", ""))]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _matrix_table(rows: Sequence[str], cols: Sequence[str], values, corner: str, digits: int) -> str:
  lines = ["| " + " | ".join([corner] + list(cols)) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
  for r, vals in zip(rows, values):
    lines.append("| " + " | ".join([r] + [_f(v, digits) for v in vals]) + " |")
  return "\n".join(lines)


def markdown(results: Mapping, plots: Sequence[str] = ()) -> str:
  """``results.md``: rendered from the dictionary :func:`build` returns (and ``results.json`` holds)."""
  title = results.get("experiment") or "experiment"
  parts = [f"# Results: {title}", ""]
  n = results.get("num_eval")
  side = results.get("side_info")
  parts.append(f"Retrieval on the evaluation set{f' ({n} images)' if n else ''}, used as both query and gallery "
               f"(each query's own image removed); L2 distance. Case = query model / gallery model"
               f"{f'; h = h(φ_old, ψ) with side-information {side}' if side else ''}.")
  parts += ["", "## Cases", "", case_table(results), ""]
  comp = results.get("compatibility")
  if comp:
    parts += ["## Compatibility matrix (CMC top-1 %, query model × gallery model)", "",
              _matrix_table(comp["queries"], comp["galleries"], comp["values"], "query \\ gallery", 1), ""]
  hops = results.get("hop_errors")
  if hops:
    parts += ["## Hop errors (update sequences)", "",
              "Relative squared error of each hop's output against the embedding its target model computes from "
              "the images (Σ‖out − target‖² / Σ‖target − mean‖²; 0 = exact, 1 = the target's mean).", "",
              "| row | hop | h | φ error | g | ψ error |", "|---|---:|---|---:|---|---:|"]
    for row, errors in hops.items():
      parts += [f"| {row} | {i} | {e['h']} | {_f(e['phi_rel_sq_err'], 3)} | {e['g'] or '–'} | "
                f"{_f(e['psi_rel_sq_err'], 3)} |" for i, e in enumerate(errors, start=1)]
    parts.append("")
  cka = results.get("cka")
  if cka and len(cka["models"]) > 1:
    parts += ["## Linear CKA between embeddings of the evaluation set", "",
              _matrix_table(cka["models"], cka["models"], cka["values"], "CKA", 3), ""]
  analysis = results.get("side_info_analysis") or {}
  if analysis:
    parts += ["## Side-information", "", "| ψ | width | CKA(φ_old, ψ) | 1-NN top-1 % (ψ / φ_old / φ_new) |",
              "|---|---:|---:|---|"]
    for name, a in analysis.items():
      probes = "; ".join(f"{f}: {_f(a['knn_top1'][f])} / {_f(a['knn_top1_old'][f])} / {_f(a['knn_top1_new'][f])}"
                         for f in a.get("knn_top1", {}))
      parts.append(f"| {name} | {a.get('dim', '')} | {_f(a.get('cka_old'), 3)} | {probes} |")
    paper_cka = (results.get("paper") or {}).get("cka")
    if paper_cka:
      parts.append("")
      parts.append("Paper (Table 6) CKA(φ_old, ψ): " + ", ".join(f"{k} {v:g}" for k, v in paper_cka.items()) + ".")
    parts.append("")
  cost = results.get("cost")
  if cost:
    parts += ["## Cost of the update, per gallery item", ""]
    if "error" in cost:
      parts += [f"not computed: {cost['error']}", ""]
    else:
      parts += [f"Backfilling: {cost['new_model']} at {cost['image_size']} px; FCT: {cost['transformation']} "
                f"on stored vectors ({cost['source']}).", "", "| method | MACs | extra storage (bytes) |",
                "|---|---:|---:|"]
      parts += [f"| {r['method']} | {r['macs']:,.0f} | {r['storage_bytes']:,} |" for r in cost["rows"]]
      parts.append("")
  bf = results.get("backfill")
  if bf:
    parts += [f"## Backfilling (new queries; gallery items re-embedded h → φ_new in {bf['order']} order)", "",
              "| backfilled | CMC top-1 (%) | mAP (%) |", "|---:|---:|---:|"]
    parts += [f"| {fr:.0%} | {_f(t1)} | {_f(m)} |" for fr, t1, m in zip(bf["fractions"], bf["cmc_top1"], bf["mAP"])]
    parts += ["", f"Area under the curve: CMC top-1 {_f(bf['auc']['cmc_top1'])}, mAP {_f(bf['auc']['mAP'])}.", ""]
  if plots:
    parts += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
  return "\n".join(parts)


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # headless: servers, pods and the test suite have no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def plot_cmc(results: Mapping, path: str):
  """CMC curves (top-k hit rate against k), one line per case."""
  plt = _plt()
  curves = results["cmc_curves"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for case, ys in curves["cases"].items():
    ax.plot(curves["k"], [np.nan if y is None else y for y in ys], marker=".", label=case)
  ax.set_xlabel("k")
  ax.set_ylabel("CMC top-k (%)")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title("CMC curves (query model / gallery model)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cases(results: Mapping, path: str):
  """The case table as grouped bars (top-1, top-5, mAP), with the paper's top-1 as markers when named."""
  plt = _plt()
  cases = results["cases"]
  names = list(cases)
  x = np.arange(len(names))
  metrics = [("cmc_top1", "CMC top-1"), ("cmc_top5", "CMC top-5"), ("mAP", "mAP@1.0")]
  w = 0.8 / len(metrics)
  fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
  for i, (key, label) in enumerate(metrics):
    ys = [np.nan if cases[c].get(key) is None else cases[c][key] for c in names]
    ax.bar(x + (i - 1) * w, ys, w, label=label)
  paper = (results.get("paper") or {}).get("rows") or {}
  if paper:
    px = [i for i, c in enumerate(names) if c in paper]
    ax.scatter([x[i] - w for i in px], [paper[names[i]][0] for i in px], marker="_", s=200, color="k",
               zorder=3, label=f"paper top-1 ({results['paper']['table']})")
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("%")
  ax.set_ylim(0, 100)
  ax.legend(fontsize=7)
  ax.set_title("retrieval cases (query model / gallery model)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_backfill(results: Mapping, path: str):
  """CMC top-1 and mAP against the backfilled fraction, with new/new and new/h as reference lines."""
  plt = _plt()
  bf = results["backfill"]
  fig, ax = plt.subplots(figsize=(6, 4))
  fr = [100 * f for f in bf["fractions"]]
  for key, label in (("cmc_top1", "CMC top-1"), ("mAP", "mAP")):
    auc = bf["auc"].get(key)
    auc_s = f"{auc:.1f}" if auc is not None and np.isfinite(auc) else "n/a"  # n/a: every query skipped
    ax.plot(fr, bf[key], marker="o", label=f"{label} (AUC {auc_s})")
  nn = results["cases"].get("new/new", {}).get("cmc_top1")
  if nn is not None:
    ax.axhline(nn, color="gray", ls="--", lw=0.8, label="new/new top-1")
  ax.set_xlabel(f"gallery backfilled with φ_new (%, {bf['order']} order)")
  ax.set_ylabel("%")
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="lower right")
  ax.set_title("partial backfilling: new queries vs h → φ_new gallery", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_compatibility(results: Mapping, path: str):
  """The compatibility matrix as a heat map (CMC top-1 %; blank where a pair was not evaluated)."""
  plt = _plt()
  comp = results["compatibility"]
  vals = np.array([[np.nan if v is None else v for v in row] for row in comp["values"]], dtype=float)
  fig, ax = plt.subplots(figsize=(1.2 * len(comp["galleries"]) + 2, 0.6 * len(comp["queries"]) + 1.6))
  im = ax.imshow(vals, vmin=0, vmax=100, cmap="viridis")
  for i in range(vals.shape[0]):
    for j in range(vals.shape[1]):
      if not np.isnan(vals[i, j]):
        ax.text(j, i, f"{vals[i, j]:.1f}", ha="center", va="center", fontsize=8,
                color="w" if vals[i, j] < 60 else "k")
  ax.set_xticks(range(len(comp["galleries"])))
  ax.set_xticklabels(comp["galleries"], rotation=30, ha="right", fontsize=8)
  ax.set_yticks(range(len(comp["queries"])))
  ax.set_yticklabels(comp["queries"], fontsize=8)
  ax.set_xlabel("gallery model")
  ax.set_ylabel("query model")
  fig.colorbar(im, ax=ax, label=f"{comp['metric']} (%)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_all(results: Mapping, out_dir: str) -> list[str]:
  """Draws every plot the results allow into ``out_dir``; returns their file names (relative to it)."""
  drawn = []
  todo = [("cmc", plot_cmc, results.get("cmc_curves")), ("cases", plot_cases, results.get("cases")),
          ("backfill", plot_backfill, results.get("backfill")),
          ("compatibility", plot_compatibility, results.get("compatibility"))]
  for key, fn, needed in todo:
    if needed:
      fn(results, os.path.join(out_dir, PLOTS[key]))
      drawn.append(PLOTS[key])
  if results.get("cost") and "rows" in results["cost"]:
    from fct_jax.gallery import cost as cost_lib  # pylint: disable=g-import-not-at-top
    cost_lib.save(results["cost"], out_dir)  # cost.json + cost.png (Figure 3's two panels)
    drawn.append("cost.png")
  return drawn


def render(results: Mapping, workdir: str) -> list[str]:
  """Writes ``results.json``, the plots and ``results.md`` into ``workdir``; returns the paths written.

  ``workdir`` may be a bucket (``gs://``): matplotlib writes local files, so everything is drawn into a temporary
  directory and copied.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    plots = plot_all(results, tmp)
    # Not checkpoint.write_json: that sorts keys, and the cases' order is the table's row order.
    with open(os.path.join(tmp, RESULTS_JSON), "w") as f:
      json.dump(results, f, indent=2)
    with open(os.path.join(tmp, RESULTS_MD), "w") as f:
      f.write(markdown(results, plots))
    written = []
    for name in [RESULTS_JSON, RESULTS_MD] + plots + (["cost.json"] if "cost.png" in plots else []):
      dst = epath.Path(workdir) / name
      if "://" in str(workdir):
        dst.write_bytes(open(os.path.join(tmp, name), "rb").read())
      else:
        shutil.move(os.path.join(tmp, name), str(dst))  # a rename within a file system: readers never see half
      written.append(str(dst))
  return written


def write(workdir: str, payload: Mapping, embeddings: Mapping[str, np.ndarray], labels, *, cfg=None,
          mesh=None) -> Optional[dict]:
  """Builds the report and writes it into the experiment workdir (process 0 writes; all processes compute).

  Args:
    workdir: the experiment workdir (the stage directories' parent).
    payload: the evaluation's results (``cases`` in percent, ...).
    embeddings: model name -> (N, d) evaluation-set embeddings.
    labels: (N,) labels.
    cfg: the evaluation stage config: ``paper_table`` (optional), ``transformation`` (the stage whose cost is
      reported), ``report`` (optional: ``max_k``, ``backfill_fractions``).
    mesh: Mesh for the retrieval kernel.

  Returns:
    The results dictionary (what ``results.json`` holds).
  """
  import jax  # pylint: disable=g-import-not-at-top
  cfg = cfg if cfg is not None else {}
  opts = cfg.get("report", None) or {}
  opts = opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)
  experiment = ""
  from etils import epath  # pylint: disable=g-import-not-at-top
  marker = epath.Path(workdir) / "experiment.json"
  if marker.exists():
    experiment = json.loads(marker.read_text()).get("experiment", "")
  transformation = cfg.get("transformation", "") or ""
  results = build(payload, embeddings, labels, experiment=experiment, paper_table=cfg.get("paper_table", "") or "",
                  transformation_dir=os.path.join(workdir, transformation) if transformation else "", mesh=mesh,
                  **opts)
  if jax.process_index() == 0:
    paths = render(results, workdir)
    print(f"[report] wrote {', '.join(os.path.basename(p) for p in paths)} in {workdir}", flush=True)
  return results


# -------------------------------------------------------------------------------------------------- README / CLI


def readme_block(results: Mapping, source: str = "") -> str:
  """The README's results block: the case table, produced by the code (``--update-readme``)."""
  lines = [case_table(results)]
  bf = results.get("backfill")
  if bf:
    lines += ["", f"Partial backfilling ({bf['order']} order): area under the CMC top-1 curve "
                  f"{_f(bf['auc']['cmc_top1'])} %."]
  if source:
    lines += ["", f"<sub>Generated by `python -m fct_jax.report --workdir {source} --update-readme README.md` from "
                  "that run's results.json; do not edit by hand.</sub>"]
  return "\n".join(lines)


def update_readme(readme: str, block: str) -> str:
  """Replaces the text between the demo-results markers of ``readme`` (a string) with ``block``."""
  start, end = readme.find(README_START), readme.find(README_END)
  if start < 0 or end < start:
    raise FCTError(f"README has no {README_START} … {README_END} block to update")
  return readme[:start + len(README_START)] + "\n" + block + "\n" + readme[end:]


def main(argv=None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(prog="python -m fct_jax.report",
                               description="Re-render results.md and the plots from an experiment's results.json.")
  ap.add_argument("--workdir", required=True, help="experiment workdir holding results.json")
  ap.add_argument("--update-readme", default=None, metavar="README",
                  help="also rewrite README's <!-- demo-results:start/end --> block with the case table")
  ap.add_argument("--source-name", default=None, help="workdir name shown in the README note (default: --workdir)")
  args = ap.parse_args(argv)
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(args.workdir) / RESULTS_JSON
    if not path.exists():
      raise FCTError(f"{path} does not exist; run the plan's evaluation stage first")
    results = json.loads(path.read_text())
    if "cmc_curves" not in results:
      raise FCTError(f"{path} has no report sections; rerun the evaluation stage with this version of fct_jax")
    for p in render(results, args.workdir):
      print(p)
    if args.update_readme:
      with open(args.update_readme) as f:
        text = f.read()
      text = update_readme(text, readme_block(results, args.source_name or args.workdir))
      with open(args.update_readme, "w") as f:
        f.write(text)
      print(f"updated {args.update_readme}")
  except FCTError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
