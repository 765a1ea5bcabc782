r"""The report's files: ``results.json``, ``results.md`` (rendered from that dictionary alone, so the Markdown's
numbers are the JSON's), the plots, and the README's results block.

The README block is the text between ``<!-- demo-results:start -->`` and ``<!-- demo-results:end -->``.
"""

import json
import os
import shutil
import tempfile
from typing import Mapping, Sequence

from etils import epath

from fct_jax.errors import FCTError
from fct_jax.report import backfill as backfill_lib
from fct_jax.report import plots as plots_lib

# File names inside the experiment workdir.
RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
# The README block of an experiment's results: between these markers, named by the experiment (``demo``, ``digits``).
README_MARKERS = "<!-- {}-results:start -->", "<!-- {}-results:end -->"


def fmt(x, digits: int = 1) -> str:
  """A number as the report prints it; "–" for a missing one (None: NaN in the JSON)."""
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
    row = [name, fmt(r.get("cmc_top1")), fmt(r.get("cmc_top5")), fmt(r.get("mAP"))]
    if paper:
      row += [_paper_cell(v) for v in paper[name]] if name in paper else ["", "", ""]
    row += [str(r.get("num_queries", "")), str(r.get("num_skipped", ""))]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines)


def _matrix_table(rows: Sequence[str], cols: Sequence[str], values, corner: str, digits: int) -> str:
  lines = ["| " + " | ".join([corner] + list(cols)) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
  for r, vals in zip(rows, values):
    lines.append("| " + " | ".join([r] + [fmt(v, digits) for v in vals]) + " |")
  return "\n".join(lines)


def _compatibility_md(results: Mapping) -> list[str]:
  comp = results.get("compatibility")
  if not comp:
    return []
  return ["## Compatibility matrix (CMC top-1 %, query model × gallery model)", "",
          _matrix_table(comp["queries"], comp["galleries"], comp["values"], "query \\ gallery", 1), ""]


def _hops_md(results: Mapping) -> list[str]:
  hops = results.get("hop_errors")
  if not hops:
    return []
  parts = ["## Hop errors (update sequences)", "",
           "Relative squared error of each hop's output against the embedding its target model computes from "
           "the images (Σ‖out − target‖² / Σ‖target − mean‖²; 0 = exact, 1 = the target's mean).", "",
           "| row | hop | h | φ error | g | ψ error |", "|---|---:|---|---:|---|---:|"]
  for row, errors in hops.items():
    parts += [f"| {row} | {i} | {e['h']} | {fmt(e['phi_rel_sq_err'], 3)} | {e['g'] or '–'} | "
              f"{fmt(e['psi_rel_sq_err'], 3)} |" for i, e in enumerate(errors, start=1)]
  return parts + [""]


def _cka_md(results: Mapping) -> list[str]:
  cka = results.get("cka")
  if not cka or len(cka["models"]) <= 1:
    return []
  return ["## Linear CKA between embeddings of the evaluation set", "",
          _matrix_table(cka["models"], cka["models"], cka["values"], "CKA", 3), ""]


def _side_info_md(results: Mapping) -> list[str]:
  analysis = results.get("side_info_analysis") or {}
  if not analysis:
    return []
  parts = ["## Side-information", "", "| ψ | width | CKA(φ_old, ψ) | 1-NN top-1 % (ψ / φ_old / φ_new) |",
           "|---|---:|---:|---|"]
  for name, a in analysis.items():
    probes = "; ".join(f"{f}: {fmt(a['knn_top1'][f])} / {fmt(a['knn_top1_old'][f])} / {fmt(a['knn_top1_new'][f])}"
                       for f in a.get("knn_top1", {}))
    parts.append(f"| {name} | {a.get('dim', '')} | {fmt(a.get('cka_old'), 3)} | {probes} |")
  paper_cka = (results.get("paper") or {}).get("cka")
  if paper_cka:
    parts += ["", "Paper (Table 6) CKA(φ_old, ψ): " + ", ".join(f"{k} {v:g}" for k, v in paper_cka.items()) + "."]
  return parts + [""]


def _cost_md(results: Mapping) -> list[str]:
  cost = results.get("cost")
  if not cost:
    return []
  if "error" in cost:
    return ["## Cost of the update, per gallery item", "", f"not computed: {cost['error']}", ""]
  return (["## Cost of the update, per gallery item", "",
           f"Backfilling: {cost['new_model']} at {cost['image_size']} px; FCT: {cost['transformation']} "
           f"on stored vectors ({cost['source']}).", "", "| method | MACs | extra storage (bytes) |", "|---|---:|---:|"]
          + [f"| {r['method']} | {r['macs']:,.0f} | {r['storage_bytes']:,} |" for r in cost["rows"]] + [""])


def _paper_backfill(results: Mapping) -> dict:
  """FastFill's AUCs beside ours (``paper.backfill``: ``curves``, ``references``, …), {} for none."""
  return (results.get("paper") or {}).get("backfill") or {}


def _backfill_row(name: str, values: Sequence, paper: Mapping, paper_values) -> str:
  """One row of the backfilling table: our three AUCs, then the paper's (blank where it has none)."""
  row = [name] + [fmt(v) for v in values]
  if paper:
    row += [_paper_cell(v) for v in paper_values] if paper_values else ["", "", ""]
  return "| " + " | ".join(row) + " |"


def backfill_table(results: Mapping) -> str:
  """The backfilling curves' AUCs (top-1, top-5, mAP), one row per curve ``gallery:ordering``, then the flat
  references old/old and new/new (the case table's values; new/new is every curve at f = 1), with FastFill's numbers
  beside them where the paper table has some; "" without curves."""
  curves = backfill_lib.curves(results)
  if not curves:
    return ""
  paper = _paper_backfill(results)
  head = ["curve (gallery:ordering)"] + [f"AUC {label} (%)" for _, label in backfill_lib.METRICS]
  if paper:
    head += [f"paper AUC top-1 (FastFill, {paper['dataset']})", "paper top-5", "paper mAP"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for key, c in curves.items():
    lines.append(_backfill_row(key, [c["auc"].get(m) for m, _ in backfill_lib.METRICS], paper,
                               paper.get("curves", {}).get(key)))
  for ref, values in backfill_lib.references(results).items():
    name = f"{ref} (reference, f = 1)" if ref == "new/new" else f"{ref} (reference)"
    lines.append(_backfill_row(name, values, paper, paper.get("references", {}).get(ref)))
  return "\n".join(lines)


def _backfill_md(results: Mapping) -> list[str]:
  curves = backfill_lib.curves(results)
  if not curves:
    return []
  fractions = backfill_lib.grid(results)
  present = {backfill_lib.split_key(k)[1] for k in curves}
  used = [o for o in backfill_lib.ORDERINGS if o in present] + sorted(present - set(backfill_lib.ORDERINGS))
  parts = ["## Partial backfilling (new queries; gallery items re-embedded h → φ_new one by one)", "",
           f"Curve = transformed gallery model : ordering. {backfill_lib.auc_rule(fractions)} (FastFill's protocol), "
           "in %. A curve starts (f = 0) at its case new/<gallery model> and ends (f = 1) at new/new; old/old and "
           "new/new are flat references (AUC = the metric itself). Orderings: "
           + "; ".join(f"{o}: {backfill_lib.ORDERINGS.get(o, o)}" for o in used) + ".", "",
           backfill_table(results), ""]
  paper = _paper_backfill(results)
  if paper:
    parts += [f"Paper: {paper['source']}, {paper['setting']} (AUC: mean over f = i/21, i = 0…21). {paper['note']}",
              ""]
  parts += ["### CMC top-1 (%) per backfilled fraction f", "", "| f | " + " | ".join(curves) + " |",
            "|" + "|".join(["---:"] * (len(curves) + 1)) + "|"]
  parts += ["| " + " | ".join([f"{100 * f:.1f}%"] + [fmt(c["cmc_top1"][i]) for c in curves.values()]) + " |"
            for i, f in enumerate(fractions)]
  return parts + [""]


def markdown(results: Mapping, plots: Sequence[str] = ()) -> str:
  """``results.md``: rendered from the results dictionary (what ``results.json`` holds)."""
  title = results.get("experiment") or "experiment"
  n = results.get("num_eval")
  side = results.get("side_info")
  parts = [f"# Results: {title}", "",
           f"Retrieval on the evaluation set{f' ({n} images)' if n else ''}, used as both query and gallery "
           f"(each query's own image removed); L2 distance. Case = query model / gallery model"
           f"{f'; h = h(φ_old, ψ) with side-information {side}' if side else ''}.",
           "", "## Cases", "", case_table(results), ""]
  for section in (_compatibility_md, _hops_md, _cka_md, _side_info_md, _cost_md, _backfill_md):
    parts += section(results)
  return "\n".join(parts + plots_md(plots))


def plots_md(plots: Sequence[str]) -> list[str]:
  """The Markdown ``Plots`` section showing the image files ``plots`` (none: no section)."""
  if not plots:
    return []
  return ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]


def write_files(results: Mapping, workdir: str) -> list[str]:
  """Writes ``results.json``, the plots and ``results.md`` into ``workdir``; returns the paths written.

  ``workdir`` may be a bucket (``gs://``): matplotlib writes local files, so everything is drawn into a temporary
  directory and copied.
  """
  with tempfile.TemporaryDirectory() as tmp:
    plots = plots_lib.plot_all(results, tmp)
    return publish(tmp, results, markdown(results, plots), workdir,
                   plots + (["cost.json"] if "cost.png" in plots else []))


def publish(tmp: str, results: Mapping, md: str, workdir: str, drawn: Sequence[str]) -> list[str]:
  """Writes ``results.json`` and the Markdown ``md`` beside the files ``drawn`` in the local folder ``tmp`` (a
  report is drawn there: matplotlib writes local files), then moves them all into ``workdir`` (copies to a bucket,
  ``gs://``); returns the paths, ``results.json`` and ``results.md`` first."""
  # Not checkpoint.write_json: that sorts keys, and the cases' order is the table's row order.
  with open(os.path.join(tmp, RESULTS_JSON), "w") as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(tmp, RESULTS_MD), "w") as f:
    f.write(md)
  written = []
  for name in [RESULTS_JSON, RESULTS_MD, *drawn]:
    dst = epath.Path(workdir) / name
    if "://" in str(workdir):
      dst.write_bytes(open(os.path.join(tmp, name), "rb").read())
    else:
      shutil.move(os.path.join(tmp, name), str(dst))  # a rename within a file system: readers never see half
    written.append(str(dst))
  return written


def readme_block(results: Mapping, source: str = "") -> str:
  """The README's results block: the case table, then the AUC of CMC top-1 of every backfilling curve (with
  FastFill's where the paper table has it), produced by the code (``--update_readme``)."""
  lines = [case_table(results)]
  curves = backfill_lib.curves(results)
  if curves:
    paper = _paper_backfill(results).get("curves")
    rule = backfill_lib.auc_rule(backfill_lib.grid(results))
    lines += ["", f"Partial backfilling, area under the CMC top-1 curve ({rule}; orderings in results.md):", "",
              "| curve (gallery:ordering) | AUC top-1 (%) |" + (" paper |" if paper else ""),
              "|---|---:|" + ("---:|" if paper else "")]
    for key, c in curves.items():
      cell = [_paper_cell(paper[key][0]) if key in paper else ""] if paper else []
      lines.append("| " + " | ".join([key, fmt(c["auc"].get("cmc_top1"))] + cell) + " |")
  return "\n".join(lines + generated_note(source))


def generated_note(source: str) -> list[str]:
  """The README block's last lines: the command that wrote it from ``source`` (none without one)."""
  if not source:
    return []
  return ["", f"<sub>Generated by `python -m fct_jax.report --workdir {source} --update_readme README.md` from "
              "that run's results.json; do not edit by hand.</sub>"]


def update_readme(readme: str, block: str, experiment: str = "demo") -> str:
  """Replaces the text between the ``<experiment>-results`` markers of ``readme`` (a string) with ``block``."""
  first, last = (m.format(experiment) for m in README_MARKERS)
  start, end = readme.find(first), readme.find(last)
  if start < 0 or end < start:
    raise FCTError(f"README has no {first} … {last} block to update")
  return readme[:start + len(first)] + "\n" + block + "\n" + readme[end:]


def write_readme(readme: str, block: str, experiment: str):
  """Rewrites the README file ``readme``'s results block of ``experiment`` with ``block``."""
  with open(readme) as f:
    text = f.read()
  text = update_readme(text, block, experiment or "demo")
  with open(readme, "w") as f:
    f.write(text)


def rerender(workdir: str, readme: str = "", source_name: str = "") -> list[str]:
  """Redraws ``results.md`` and the plots from ``workdir``'s ``results.json`` (``python -m fct_jax.report``).

  Args:
    workdir: an experiment workdir whose evaluation stage wrote ``results.json``.
    readme: also rewrite this README file's results block with the case table ("" for no).
    source_name: the workdir name shown in the README's note (default: ``workdir``).

  Returns:
    The paths written, the README last.
  """
  path = epath.Path(workdir) / RESULTS_JSON
  if not path.exists():
    raise FCTError(f"{path} does not exist; run the plan's evaluation stage first")
  results = json.loads(path.read_text())
  if "cmc_curves" not in results:
    raise FCTError(f"{path} has no report sections; rerun the evaluation stage with this version of fct_jax")
  written = write_files(results, workdir)
  if readme:
    write_readme(readme, readme_block(results, source_name or workdir), results.get("experiment", ""))
    written.append(readme)
  return written
