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


def _backfill_md(results: Mapping) -> list[str]:
  bf = results.get("backfill")
  if not bf:
    return []
  return ([f"## Backfilling (new queries; gallery items re-embedded h → φ_new in {bf['order']} order)", "",
           "| backfilled | CMC top-1 (%) | mAP (%) |", "|---:|---:|---:|"]
          + [f"| {fr:.0%} | {fmt(t1)} | {fmt(m)} |" for fr, t1, m in zip(bf["fractions"], bf["cmc_top1"], bf["mAP"])]
          + ["", f"Area under the curve: CMC top-1 {fmt(bf['auc']['cmc_top1'])}, mAP {fmt(bf['auc']['mAP'])}.", ""])


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
  """The README's results block: the case table, produced by the code (``--update_readme``)."""
  lines = [case_table(results)]
  bf = results.get("backfill")
  if bf:
    lines += ["", f"Partial backfilling ({bf['order']} order): area under the CMC top-1 curve "
                  f"{fmt(bf['auc']['cmc_top1'])} %."]
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
