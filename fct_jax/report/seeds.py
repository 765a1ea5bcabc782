r"""The combined report of a multi-seed plan (``--config.seeds=N``): mean ± sd over the seed sets.

Each seed set ran the whole plan in its own experiment workdir ``WORKDIR/seed_<i>/`` and wrote its own report
there. :func:`write` reads every ``seed_<i>/results.json`` and writes ``WORKDIR/results.json``, ``results.md`` and
``cases.png``: every case's CMC top-1, top-5 and mAP and every backfilling curve's AUCs (per ``gallery:ordering``)
as the mean and the *sample* standard deviation (``ddof=1``) over the seeds, with the per-seed values, and how many
seeds each of the evaluation stage's ``orderings`` holds in ("case_a > case_b" on CMC top-1, or
"gallery:ordering > gallery:ordering" on the backfilling curves' AUC top-1). One seed's numbers
say little about a gap of a few points; the spread across seeds says whether the gap is larger than the noise.

The combined ``results.json`` is told apart from a single run's by its ``seed_dirs`` key;
``python -m fct_jax.report --workdir WORKDIR`` redraws either (:func:`rerender`).
"""

import json
import os
import tempfile
from typing import Mapping, Optional, Sequence

import numpy as np
from etils import epath

from fct_jax.errors import FCTError
from fct_jax.report import backfill, plots, render

METRICS = (("cmc_top1", "CMC top-1 (%)"), ("cmc_top5", "CMC top-5 (%)"), ("mAP", "mAP@1.0 (%)"))
ORDERING_METRIC = "cmc_top1"
SD_NOTE = "sample standard deviation over seeds (ddof=1)"


def parse_ordering(ordering: str) -> tuple[str, str]:
  """``"new/h[simclr] > new/h[none]"`` -> ``("new/h[simclr]", "new/h[none]")``: two cases (compared on CMC top-1) or
  two backfilling curves ``gallery:ordering`` (``"h[fastfill]:sigma > h[simclr]:random"``, compared on their AUC
  top-1); a one-line error otherwise."""
  parts = [p.strip() for p in ordering.split(">")]
  kinds = {("curve" if ":" in p else "case" if "/" in p else None) for p in parts}
  if len(parts) != 2 or not all(parts) or None in kinds or len(kinds) != 1:
    raise FCTError(f"ordering {ordering!r} is not of the form 'query/gallery > query/gallery' or "
                   "'gallery:ordering > gallery:ordering'")
  return parts[0], parts[1]


def _stat(values: Sequence[Optional[float]]) -> dict:
  """Mean, sample sd (ddof=1) and the values; None (NaN in the JSON) where a value is missing."""
  arr = np.array([np.nan if v is None else v for v in values], dtype=float)
  mean = float(arr.mean()) if arr.size else float("nan")
  sd = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
  clean = lambda x: None if not np.isfinite(x) else x
  return {"mean": clean(mean), "sd": clean(sd), "per_seed": list(values)}


def _term_value(results: Mapping, term: str) -> Optional[float]:
  """A case's CMC top-1, or a backfilling curve's AUC top-1 (``gallery:ordering``); None when absent."""
  if ":" in term:
    curve = backfill.curves(results).get(term)
    return None if curve is None else curve["auc"].get(ORDERING_METRIC)
  return results["cases"].get(term, {}).get(ORDERING_METRIC)


def _ordering(ordering: str, per_seed: Sequence[Mapping]) -> dict:
  """Whether ``ordering`` holds (strictly) in each seed's results; None where a case, curve or value is missing."""
  a, b = parse_ordering(ordering)
  holds = []
  for r in per_seed:
    va, vb = (_term_value(r, t) for t in (a, b))
    holds.append(None if va is None or vb is None else bool(va > vb))
  return {"ordering": ordering, "metric": "auc_cmc_top1" if ":" in a else ORDERING_METRIC,
          "holds": sum(h is True for h in holds), "seeds": len(holds), "per_seed": holds}


def _backfill_auc(per_seed: Sequence[Mapping]) -> Optional[dict]:
  """``{curve key: {metric: mean, sd, per_seed}}`` of the backfilling AUCs, the curves in order of first appearance
  over the seeds; None when no seed has a curve. A seed without that curve (or without a backfill section) has None
  there, and the mean and sd are then None, as for a case missing in a seed: a mean over fewer seeds would not be
  the same quantity."""
  seed_curves = [backfill.curves(r) for r in per_seed]
  keys = list(dict.fromkeys(k for cs in seed_curves for k in cs))
  if not keys:
    return None
  return {k: {m: _stat([cs[k]["auc"].get(m) if k in cs else None for cs in seed_curves]) for m, _ in backfill.METRICS}
          for k in keys}


def combine(per_seed: Sequence[Mapping], seed_dirs: Sequence[str], orderings: Sequence[str] = ()) -> dict:
  """The combined results dictionary (what the combined ``results.json`` holds).

  Args:
    per_seed: each seed set's ``results.json``, in seed order.
    seed_dirs: their directory names (``seed_0``, …), in the same order.
    orderings: the evaluation stage's ``orderings``.

  Returns:
    ``experiment``, ``seed_dirs``, ``sd`` (which sd), ``cases`` (case → metric → mean, sd, per_seed; the cases of
    the first seed, in its order), ``backfill_auc`` (curve ``gallery:ordering`` → metric → mean, sd, per_seed;
    None without a backfilling curve), ``backfill_fractions`` (their grid, for the AUC's definition; [] without)
    and ``orderings`` (each: holds in how many of ``seeds``, per_seed True/False/None).
  """
  if len(per_seed) < 2 or len(per_seed) != len(seed_dirs):
    raise FCTError(f"a combined report needs the results of 2 or more seed sets, got {len(per_seed)}")
  cases = {case: {m: _stat([r["cases"].get(case, {}).get(m) for r in per_seed]) for m, _ in METRICS}
           for case in per_seed[0]["cases"]}
  grid = next((g for g in map(backfill.grid, per_seed) if g), [])
  return {"experiment": per_seed[0].get("experiment", ""), "seed_dirs": list(seed_dirs), "sd": SD_NOTE,
          "cases": cases, "backfill_auc": _backfill_auc(per_seed), "backfill_fractions": grid,
          "orderings": [_ordering(o, per_seed) for o in orderings]}


def _pm(stat: Mapping) -> str:
  """``mean ± sd``; "–" when no seed has the value."""
  return "–" if stat["mean"] is None else f"{render.fmt(stat['mean'])} ± {render.fmt(stat['sd'])}"


def case_table(results: Mapping) -> str:
  """The case table as mean ± sd, and the CMC top-1 of each seed."""
  head = ["Case"] + [label for _, label in METRICS] + ["CMC top-1 per seed"]
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
  for name, stats in results["cases"].items():
    per = ", ".join(render.fmt(v) for v in stats["cmc_top1"]["per_seed"])
    lines.append("| " + " | ".join([name] + [_pm(stats[m]) for m, _ in METRICS] + [per]) + " |")
  return "\n".join(lines)


def _orderings_md(results: Mapping) -> list[str]:
  if not results["orderings"]:
    return []
  mark = {True: "yes", False: "no", None: "–"}
  return (["## Orderings (CMC top-1 of cases, AUC top-1 of backfilling curves; strictly greater)", "",
           "| ordering | holds in | per seed |", "|---|---:|---|"]
          + [f"| {o['ordering']} | {o['holds']} / {o['seeds']} seeds | "
             f"{', '.join(mark[h] for h in o['per_seed'])} |" for o in results["orderings"]] + [""])


def _auc_rule(results: Mapping) -> str:
  return backfill.auc_rule(results.get("backfill_fractions") or [])


def backfill_auc(results: Mapping) -> dict:
  """The combined results' ``backfill_auc`` ({} for none); a one-line error for an older version's (one curve:
  metric → stats, without ``backfill_fractions``)."""
  auc = results.get("backfill_auc") or {}
  if auc and "backfill_fractions" not in results:
    raise FCTError("the combined results.json has the single backfilling curve of an older version of fct_jax; "
                   "rerun the seed sets' evaluation stages with this version")
  return auc


def _backfill_md(results: Mapping) -> list[str]:
  auc = backfill_auc(results)
  if not auc:
    return []
  head = ["curve (gallery:ordering)"] + [f"AUC {label} (%)" for _, label in backfill.METRICS] + ["AUC top-1 per seed"]
  return (["## Backfilling: area under the curve", "",
           f"{_auc_rule(results)}; mean ± sd over seeds (– where a seed lacks the curve).", "",
           "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
          + ["| " + " | ".join([key] + [_pm(stats[m]) for m, _ in backfill.METRICS]
                               + [", ".join(render.fmt(v) for v in stats["cmc_top1"]["per_seed"])]) + " |"
             for key, stats in auc.items()] + [""])


def markdown(results: Mapping, plot_files: Sequence[str] = ()) -> str:
  """The combined ``results.md``, rendered from the combined results dictionary alone."""
  dirs = results["seed_dirs"]
  parts = [f"# Results: {results.get('experiment') or 'experiment'}, {len(dirs)} seed sets", "",
           f"Mean ± {results['sd']}; seed sets {', '.join(dirs)} (each a full run of the plan, with its own "
           "report in its directory). Case = query model / gallery model.", "", "## Cases", "",
           case_table(results), ""]
  return "\n".join(parts + _orderings_md(results) + _backfill_md(results) + render.plots_md(plot_files))


def write_files(results: Mapping, workdir: str) -> list[str]:
  """Writes the combined ``results.json``, ``cases.png`` and ``results.md`` into ``workdir``; returns the paths."""
  with tempfile.TemporaryDirectory() as tmp:
    plot = plots.PLOTS["cases"]
    plots.plot_cases_sd(results, os.path.join(tmp, plot))
    return render.publish(tmp, results, markdown(results, [plot]), workdir, [plot])


def write(workdir: str, seed_dirs: Sequence[str], orderings: Sequence[str] = ()) -> dict:
  """Reads ``workdir/<seed_dir>/results.json`` of every seed set, writes the combined report; returns it."""
  per_seed = []
  for d in seed_dirs:
    path = epath.Path(workdir) / d / render.RESULTS_JSON
    if not path.exists():
      raise FCTError(f"{path} does not exist; finish seed set {d} first")
    per_seed.append(json.loads(path.read_text()))
  results = combine(per_seed, seed_dirs, orderings)
  paths = write_files(results, workdir)
  print(f"[report] wrote the combined report of {len(seed_dirs)} seed sets: "
        f"{', '.join(os.path.basename(p) for p in paths)} in {workdir}", flush=True)
  return results


def is_combined(workdir: str) -> bool:
  """True when ``workdir``'s ``results.json`` is a combined multi-seed report."""
  path = epath.Path(workdir) / render.RESULTS_JSON
  return path.exists() and "seed_dirs" in json.loads(path.read_text())


def readme_block(results: Mapping, source: str = "") -> str:
  """The README's results block of a multi-seed run: mean ± sd, the orderings, the AUC of CMC top-1 of every
  backfilling curve."""
  lines = [case_table(results), ""]
  lines += [f"Mean ± {results['sd']}, {len(results['seed_dirs'])} seed sets."]
  held = [f"{o['ordering']} ({o['holds']}/{o['seeds']})" for o in results["orderings"]]
  if held:
    lines += ["", "Orderings (CMC top-1 of cases, AUC top-1 of curves) and the seeds they hold in: " + "; ".join(held) + "."]
  auc = backfill_auc(results)
  if auc:
    lines += ["", f"Partial backfilling, area under the CMC top-1 curve ({_auc_rule(results)}; mean ± sd):", "",
              "| curve (gallery:ordering) | AUC top-1 (%) |", "|---|---:|"]
    lines += [f"| {key} | {_pm(stats['cmc_top1'])} |" for key, stats in auc.items()]
  return "\n".join(lines + render.generated_note(source))


def rerender(workdir: str, readme: str = "", source_name: str = "") -> list[str]:
  """``python -m fct_jax.report``: redraws a combined report from its ``results.json``, or a single run's
  (:func:`render.rerender`); with ``readme``, also that README's block of the experiment (mean ± sd for a
  combined report)."""
  if not is_combined(workdir):
    return render.rerender(workdir, readme, source_name)
  results = json.loads((epath.Path(workdir) / render.RESULTS_JSON).read_text())
  written = write_files(results, workdir)
  if readme:
    render.write_readme(readme, readme_block(results, source_name or workdir), results.get("experiment", ""))
    written.append(readme)
  return written
