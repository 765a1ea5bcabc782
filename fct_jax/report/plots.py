"""The report's PNG plots, drawn from the results dictionary alone (what ``results.json`` holds)."""

import os
from typing import Mapping

import numpy as np

from fct_jax.gallery import cost as cost_lib
from fct_jax.report import backfill as backfill_lib

# File names inside the experiment workdir.
PLOTS = {"cmc": "cmc.png", "cases": "cases.png", "backfill": "backfill.png", "compatibility": "compatibility.png"}


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # headless: servers, pods and the test suite have no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _percent_axes(ax, xlabel: str, ylabel: str):
  """Axis labels, a 0–100 % y axis and a light grid: the line plots' common frame."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_ylim(0, 100)
  ax.grid(alpha=0.3)


def _finish(plt, fig, ax, title: str, path: str, legend_loc: str = "best"):
  """Legend, title, layout; saves the figure to ``path`` and frees it."""
  ax.legend(fontsize=7, loc=legend_loc)
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_cmc(results: Mapping, path: str):
  """CMC curves (top-k hit rate against k), one line per case."""
  plt = _plt()
  curves = results["cmc_curves"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for case, ys in curves["cases"].items():
    ax.plot(curves["k"], [np.nan if y is None else y for y in ys], marker=".", label=case)
  _percent_axes(ax, "k", "CMC top-k (%)")
  _finish(plt, fig, ax, "CMC curves (query model / gallery model)", path, "lower right")


_BAR_METRICS = (("cmc_top1", "CMC top-1"), ("cmc_top5", "CMC top-5"), ("mAP", "mAP@1.0"))


def _nan(v):
  return np.nan if v is None else v


def _case_bars(plt, names, value, error=None):
  """``(fig, ax, x, w)``: grouped bars (top-1, top-5, mAP) per case; ``value(case, metric)`` and the optional
  ``error(case, metric)`` (error bars) give numbers or None."""
  x, w = np.arange(len(names)), 0.8 / len(_BAR_METRICS)
  fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names) + 2), 4))
  for i, (key, label) in enumerate(_BAR_METRICS):
    bars = {} if error is None else {"yerr": [_nan(error(c, key)) for c in names], "capsize": 2}
    ax.bar(x + (i - 1) * w, [_nan(value(c, key)) for c in names], w, label=label, **bars)
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 100)
  return fig, ax, x, w


def plot_cases(results: Mapping, path: str):
  """The case table as grouped bars (top-1, top-5, mAP), with the paper's top-1 as markers when named."""
  plt = _plt()
  cases = results["cases"]
  names = list(cases)
  fig, ax, x, w = _case_bars(plt, names, lambda c, key: cases[c].get(key))
  paper = (results.get("paper") or {}).get("rows") or {}
  if paper:
    px = [i for i, c in enumerate(names) if c in paper]
    ax.scatter([x[i] - w for i in px], [paper[names[i]][0] for i in px], marker="_", s=200, color="k",
               zorder=3, label=f"paper top-1 ({results['paper']['table']})")
  ax.set_ylabel("%")
  _finish(plt, fig, ax, "retrieval cases (query model / gallery model)", path)


def plot_cases_sd(results: Mapping, path: str):
  """A multi-seed report's case table (``report/seeds.py``) as grouped bars of the means with ± sd error bars."""
  plt = _plt()
  cases = results["cases"]
  fig, ax, _, _ = _case_bars(plt, list(cases), lambda c, key: cases[c][key]["mean"],
                             lambda c, key: cases[c][key]["sd"])
  ax.set_ylabel("% (mean ± sd over seeds)")
  _finish(plt, fig, ax, f"retrieval cases over {len(results['seed_dirs'])} seed sets (query / gallery model)", path)


# Line style per backfilling ordering (colour: per gallery model).
_ORDER_STYLES = {"random": "-", "sigma": "--", "distance": ":"}


def _auc_s(auc) -> str:
  return f"{auc:.1f}" if auc is not None and np.isfinite(auc) else "n/a"  # n/a: every query skipped


def plot_backfill(results: Mapping, path: str):
  """Every backfilling curve against the backfilled fraction: CMC top-1 (left) and mAP (right), a colour per gallery
  model and a line style per ordering (random solid, sigma dashed, distance dotted), new/new (every curve's end) as a
  grey reference line; one legend for both panels, with each curve's AUCs. The y axes fit the curves (the orderings
  differ by a few points; old/old, far below, is in results.md's table, not drawn)."""
  plt = _plt()
  curves = backfill_lib.curves(results)
  galleries = list(dict.fromkeys(c["gallery"] for c in curves.values()))
  colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(galleries)}
  refs = backfill_lib.references(results)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, (metric, label) in zip(axes, (("cmc_top1", "CMC top-1"), ("mAP", "mAP@1.0"))):
    for key, c in curves.items():
      ax.plot([100 * f for f in c["fractions"]], [_nan(v) for v in c[metric]], color=colours[c["gallery"]],
              ls=_ORDER_STYLES.get(c["ordering"], "-."), marker=".", ms=3, lw=1.2,
              label=f"{key} (AUC top-1 {_auc_s(c['auc'].get('cmc_top1'))}, mAP {_auc_s(c['auc'].get('mAP'))})")
    value = refs.get("new/new", [None, None, None])[0 if metric == "cmc_top1" else 2]
    if value is not None:
      ax.axhline(value, color="gray", ls="--", lw=0.8, label="new/new (reference)")
    ax.set_xlabel("gallery backfilled with φ_new (%)")
    ax.set_ylabel(f"{label} (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"{label}: new queries vs the partly backfilled gallery", fontsize=9)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95))
  fig.suptitle(f"partial backfilling ({backfill_lib.auc_rule(backfill_lib.grid(results))})", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
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
          ("backfill", plot_backfill, backfill_lib.curves(results)),
          ("compatibility", plot_compatibility, results.get("compatibility"))]
  for key, fn, needed in todo:
    if needed:
      fn(results, os.path.join(out_dir, PLOTS[key]))
      drawn.append(PLOTS[key])
  if results.get("cost") and "rows" in results["cost"]:
    cost_lib.save(results["cost"], out_dir)  # cost.json + cost.png (Figure 3's two panels)
    drawn.append("cost.png")
  return drawn
