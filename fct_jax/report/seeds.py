r"""The combined report of a multi-seed plan (``--config.seeds=N``): mean ± sd over the seed sets.

Each seed set ran the whole plan in its own experiment workdir ``WORKDIR/seed_<i>/`` and wrote its own report
there. :func:`write` reads every ``seed_<i>/results.json`` and writes ``WORKDIR/results.json``, ``results.md`` and
``cases.png``: every case's CMC top-1, top-5 and mAP and the backfilling AUC as the mean and the *sample* standard
deviation (``ddof=1``) over the seeds, with the per-seed values, and how many seeds each of the evaluation stage's
``orderings`` ("case_a > case_b" on CMC top-1) holds in. One seed's numbers say little about a gap of a few points;
the spread across seeds says whether the gap is larger than the noise.

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
from fct_jax.report import plots, render

METRICS = (("cmc_top1", "CMC top-1 (%)"), ("cmc_top5", "CMC top-5 (%)"), ("mAP", "mAP@1.0 (%)"))
ORDERING_METRIC = "cmc_top1"
SD_NOTE = "sample standard deviation over seeds (ddof=1)"


def parse_ordering(ordering: str) -> tuple[str, str]:
  """``"new/h[simclr] > new/h[none]"`` -> ``("new/h[simclr]", "new/h[none]")``; a one-line error otherwise."""
  parts = [p.strip() for p in ordering.split(">")]
  if len(parts) != 2 or not all(parts) or any("/" not in p for p in parts):
    raise FCTError(f"ordering {ordering!r} is not of the form 'query/gallery > query/gallery'")
  return parts[0], parts[1]


def _stat(values: Sequence[Optional[float]]) -> dict:
  """Mean, sample sd (ddof=1) and the values; None (NaN in the JSON) where a value is missing."""
  arr = np.array([np.nan if v is None else v for v in values], dtype=float)
  mean = float(arr.mean()) if arr.size else float("nan")
  sd = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
  clean = lambda x: None if not np.isfinite(x) else x
  return {"mean": clean(mean), "sd": clean(sd), "per_seed": list(values)}


def _ordering(ordering: str, per_seed: Sequence[Mapping]) -> dict:
  """Whether ``ordering`` holds (strictly) in each seed's case table; None where a case or value is missing."""
  a, b = parse_ordering(ordering)
  holds = []
  for r in per_seed:
    va, vb = (r["cases"].get(c, {}).get(ORDERING_METRIC) for c in (a, b))
    holds.append(None if va is None or vb is None else bool(va > vb))
  return {"ordering": ordering, "metric": ORDERING_METRIC, "holds": sum(h is True for h in holds),
          "seeds": len(holds), "per_seed": holds}


def combine(per_seed: Sequence[Mapping], seed_dirs: Sequence[str], orderings: Sequence[str] = ()) -> dict:
  """The combined results dictionary (what the combined ``results.json`` holds).

  Args:
    per_seed: each seed set's ``results.json``, in seed order.
    seed_dirs: their directory names (``seed_0``, …), in the same order.
    orderings: the evaluation stage's ``orderings``.

  Returns:
    ``experiment``, ``seed_dirs``, ``sd`` (which sd), ``cases`` (case → metric → mean, sd, per_seed; the cases of
    the first seed, in its order), ``backfill_auc`` (metric → mean, sd, per_seed; None without a backfilling
    curve) and ``orderings`` (each: holds in how many of ``seeds``, per_seed True/False/None).
  """
  if len(per_seed) < 2 or len(per_seed) != len(seed_dirs):
    raise FCTError(f"a combined report needs the results of 2 or more seed sets, got {len(per_seed)}")
  cases = {case: {m: _stat([r["cases"].get(case, {}).get(m) for r in per_seed]) for m, _ in METRICS}
           for case in per_seed[0]["cases"]}
  backfill = None
  if all(r.get("backfill") for r in per_seed):
    backfill = {m: _stat([r["backfill"]["auc"].get(m) for r in per_seed]) for m in per_seed[0]["backfill"]["auc"]}
  return {"experiment": per_seed[0].get("experiment", ""), "seed_dirs": list(seed_dirs), "sd": SD_NOTE,
          "cases": cases, "backfill_auc": backfill, "orderings": [_ordering(o, per_seed) for o in orderings]}


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
  return (["## Orderings (CMC top-1, strictly greater)", "", "| ordering | holds in | per seed |", "|---|---:|---|"]
          + [f"| {o['ordering']} | {o['holds']} / {o['seeds']} seeds | "
             f"{', '.join(mark[h] for h in o['per_seed'])} |" for o in results["orderings"]] + [""])


def _backfill_md(results: Mapping) -> list[str]:
  auc = results.get("backfill_auc")
  if not auc:
    return []
  return (["## Backfilling: area under the curve", "", "| metric | mean ± sd | per seed |", "|---|---:|---|"]
          + [f"| {m} | {_pm(s)} | {', '.join(render.fmt(v) for v in s['per_seed'])} |" for m, s in auc.items()]
          + [""])


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
  """The README's results block of a multi-seed run: mean ± sd, the orderings, the backfilling AUC."""
  lines = [case_table(results), ""]
  lines += [f"Mean ± {results['sd']}, {len(results['seed_dirs'])} seed sets."]
  held = [f"{o['ordering']} ({o['holds']}/{o['seeds']})" for o in results["orderings"]]
  if held:
    lines += ["", "Orderings of CMC top-1 and the seeds they hold in: " + "; ".join(held) + "."]
  auc = (results.get("backfill_auc") or {}).get("cmc_top1")
  if auc:
    lines += ["", f"Partial backfilling (random order): area under the CMC top-1 curve {_pm(auc)} %."]
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
