"""The experiment report: the demo plan through ``main`` writes results.md/.json and plots that agree; pieces."""

import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from fct_jax import report
from fct_jax.errors import FCTError
from fct_jax.report import render
from fct_jax.retrieval import metrics, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
  # One device and the test session's persistent compile cache: the subprocess's repeats become cache hits.
  cache = os.environ.get("FCT_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fct_jax_cache"))
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("report") / "demo")
  p = subprocess.run([sys.executable, "-m", "fct_jax.main", "--config=configs/demo.py:runlocal", f"--workdir={wd}"],
                     cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return wd


def _md_cases(md: str):
  """The case table of results.md: {case: [top-1, top-5, mAP]} as printed."""
  section = md.split("## Cases", 1)[1].split("\n## ", 1)[0]
  rows = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 4 and re.fullmatch(r"[\d.–]+", cells[1]):
      rows[cells[0]] = cells[1:4]
  return rows


# results.json's top-level keys after the evaluation payload's, in order (the file's format).
REPORT_KEYS = ["experiment", "cmc_curves", "cka", "paper", "backfill", "compatibility", "cost"]


def test_demo_plan_writes_consistent_report(demo_workdir):
  wd = demo_workdir
  res = json.load(open(os.path.join(wd, "results.json")))
  payload = json.load(open(os.path.join(wd, "eval", "results.json")))  # the stage's own results (keys sorted)
  assert list(res)[len(payload):] == REPORT_KEYS and set(list(res)[:len(payload)]) == set(payload)
  md = open(os.path.join(wd, "results.md")).read()
  for png in ("cmc.png", "cases.png", "backfill.png", "cost.png"):
    path = os.path.join(wd, png)
    assert os.path.getsize(path) > 1000 and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", png
    assert f"]({png})" in md
  assert not os.path.exists(os.path.join(wd, "compatibility.png"))  # no sequence rows in the demo
  # Every number of the case table in results.md is the JSON's, rounded as printed.
  rows = _md_cases(md)
  assert list(rows) == list(res["cases"]) and "new/h[simclr]" in rows
  for case, r in res["cases"].items():
    assert rows[case] == [render.fmt(r["cmc_top1"]), render.fmt(r["cmc_top5"]), render.fmt(r["mAP"])], case
  # The CMC curve starts at the table's top-1 and passes its top-5; it never decreases.
  for case, ys in res["cmc_curves"]["cases"].items():
    assert ys[0] == pytest.approx(res["cases"][case]["cmc_top1"])
    assert ys[4] == pytest.approx(res["cases"][case]["cmc_top5"])
    assert all(b >= a for a, b in zip(ys, ys[1:]))
  # CKA, cost and backfilling sections match the JSON too.
  cka = res["cka"]
  assert "h" in cka["models"] and "h[simclr]" not in cka["models"]  # the alias of h is not repeated
  i, j = cka["models"].index("old"), cka["models"].index("new")
  assert f"{cka['values'][i][j]:.3f}" in md
  assert [r["method"] for r in res["cost"]["rows"]] == ["backfilling", "BCT", "FCT"]
  assert f"| FCT | {res['cost']['rows'][2]['macs']:,.0f} |" in md
  # Backfilling (needs the evaluation stage's per-gallery, per-ordering curves): every curve runs from its case row
  # new/<gallery> (f = 0) to new/new (f = 1) on FastFill's grid, its AUC is the mean over the grid, and results.md
  # prints its AUCs; FastFill's h also has the σ order.
  curves = res["backfill"]
  assert curves and "h[simclr]:random" in curves and "h[none]:random" in curves
  for key, c in curves.items():
    assert key == f"{c['gallery']}:{c['ordering']}" and c["ordering"] in ("random", "sigma", "distance")
    assert c["fractions"] == pytest.approx([i / 21 for i in range(22)])
    for m in ("cmc_top1", "cmc_top5", "mAP"):
      assert c[m][0] == pytest.approx(res["cases"][f"new/{c['gallery']}"][m]), (key, m)
      assert c[m][-1] == pytest.approx(res["cases"]["new/new"][m]), (key, m)
      assert c["auc"][m] == pytest.approx(np.mean(c[m])), (key, m)
    assert f"| {key} | {' | '.join(render.fmt(c['auc'][m]) for m in ('cmc_top1', 'cmc_top5', 'mAP'))} |" in md
  for gallery in {c["gallery"] for c in curves.values() if "fastfill" in c["gallery"]}:
    assert f"{gallery}:sigma" in curves
  assert "AUC: mean over the 22 grid points f = i/21" in md


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "fct_jax.report", *args], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)


def test_cli_rerenders_and_updates_readme(demo_workdir, tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\nbefore\n<!-- demo-results:start -->\nold table\n<!-- demo-results:end -->\nafter\n")
  before = open(os.path.join(demo_workdir, "results.json"), "rb").read()
  p = _cli(f"--workdir={demo_workdir}", f"--update_readme={readme}", "--source_name=/tmp/d")
  assert p.returncode == 0, p.stderr[-3000:]
  text = readme.read_text()
  assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
  assert "--workdir /tmp/d --update_readme README.md" in text
  block = text.split("<!-- demo-results:start -->")[1].split("<!-- demo-results:end -->")[0]
  assert _md_cases("## Cases\n" + block) == _md_cases(open(os.path.join(demo_workdir, "results.md")).read())
  assert open(os.path.join(demo_workdir, "results.json"), "rb").read() == before  # re-rendered byte for byte
  p = _cli("--workdir", str(tmp_path))  # no results.json: one-line error
  assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "\n" not in p.stderr.strip()


def test_build_keeps_the_payload_first_and_the_sections_in_order():
  payload = {"cases": {"old/old": {"cmc_top1": float("nan"), "cmc_top5": np.float32(50.0), "mAP": 1.0}},
             "num_eval": 3, "side_info": "simclr"}
  sections = {"compatibility": None, "backfill": None, "cka": {"models": ["old"], "values": [[1.0]]},
              "cmc_curves": {"k": [1], "cases": {"old/old": [float("nan")]}}}
  out = report.build(summary.EvaluationResults(payload, sections), experiment="x", paper_table="table1")
  assert list(out) == list(payload) + REPORT_KEYS
  assert out["cases"]["old/old"] == {"cmc_top1": None, "cmc_top5": 50.0, "mAP": 1.0}  # strict JSON
  assert out["paper"] == {"table": "table1", "rows": {"old/old": [46.5, 64.6, 29.9]}, "cka": None, "backfill": None}
  assert out["cost"] is None and out["cmc_curves"]["cases"]["old/old"] == [None]
  with pytest.raises(FCTError, match="unknown paper_table 'table9'"):
    report.build(summary.EvaluationResults(payload, sections), paper_table="table9")


def test_cmc_curves_match_evaluate():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 30)
  curves = summary.cmc_curves({"a": x, "b": y}, labels, ["a/a", "a/b"], max_k=100)
  assert curves["k"] == list(range(1, 30))  # capped at N − 1
  for case, (q, g) in (("a/a", (x, x)), ("a/b", (x, y))):
    ref = metrics.evaluate(q, g, labels, labels, query_is_gallery=True, ks=(1, 3, 29))
    ys = curves["cases"][case]
    assert [ys[0], ys[2], ys[28]] == pytest.approx([ref["cmc_top1"], ref["cmc_top3"], ref["cmc_top29"]])


def test_compatibility_matrix_and_sequence_rows():
  cases = {"v1/v1": {"cmc_top1": 30.0}, "v2/v2": {"cmc_top1": 46.0}, "v3/v3": {"cmc_top1": 68.0},
           "v2/h2(v1)": {"cmc_top1": 40.0}, "v3/h3(h2(v1))": {"cmc_top1": 57.0}, "v3/h13(v1)": {"cmc_top1": 60.0}}
  assert summary.is_sequence(cases) and not summary.is_sequence({"old/old": {}, "new/h": {}})
  m = summary.compatibility_matrix(cases)
  assert m["queries"] == ["v1", "v2", "v3"]
  assert m["galleries"] == ["v1", "v2", "v3", "h2(v1)", "h3(h2(v1))", "h13(v1)"]
  assert m["values"][2][4] == 57.0 and m["values"][0][1] is None
  res = {"cases": {c: {"cmc_top1": v["cmc_top1"], "cmc_top5": 0.0, "mAP": 1.0} for c, v in cases.items()},
         "compatibility": m, "paper": {"table": "table5", "rows": report.paper_rows("table5", list(cases))}}
  with tempfile.TemporaryDirectory() as d:
    assert report.plot_all(res, d) == ["cases.png", "compatibility.png"]
  md = report.markdown(res)
  assert "Compatibility matrix" in md and "| v3/h3(h2(v1)) | 57.0 | 0.0 | 1.0 | 57.4 | 78.0 | 33.5 |" in md


def test_paper_tables():
  assert report.paper_rows("table1", ["old/old", "new/h", "x/y"]) == {"old/old": [46.5, 64.6, 29.9],
                                                                      "new/h": [65.0, 82.3, 43.6]}
  with pytest.raises(FCTError, match="unknown paper_table 'table9'"):
    report.paper_rows("table9", [])
  # new/old's mAP is printed with the paper's precision, not rounded to 0.0.
  res = {"cases": {"new/old": {"cmc_top1": 0.2, "cmc_top5": 1.0, "mAP": 0.01}},
         "paper": {"table": "table1", "rows": report.paper_rows("table1", ["new/old"])}}
  assert "| new/old | 0.2 | 1.0 | 0.0 | 0.1 | 0.5 | 0.003 |" in report.case_table(res)
  with pytest.raises(FCTError, match="no <!-- demo-results:start -->"):
    report.update_readme("no markers", "x")


def test_paper_rows_follow_the_side_information():
  cases = ["old/old", "h/h", "new/h", "new/h[none]"]
  assert report.paper_rows("table1", cases, "simclr")["new/h"] == [65.0, 82.3, 43.6]
  none = report.paper_rows("table1", cases, "none")  # Table 1's plan run without side-information
  assert none["new/h"] == [61.8, 80.5, 39.9] and "h/h" not in none and none["old/old"] == [46.5, 64.6, 29.9]


# ------------------------------------------------------------------------------------ partial backfilling

GRID = [i / 21 for i in range(22)]
AUC_RULE = "AUC: mean over the 22 grid points f = i/21"


def _curve(gallery, ordering, start, end, bend=1.0, fractions=GRID):
  """A synthetic backfilling curve from ``start`` to ``end`` ([top-1, top-5, mAP]); AUC = the mean over the grid."""
  c = {"gallery": gallery, "ordering": ordering, "fractions": list(fractions)}
  for i, m in enumerate(("cmc_top1", "cmc_top5", "mAP")):
    c[m] = [start[i] + (end[i] - start[i]) * f ** bend for f in fractions]
  c["auc"] = {m: float(np.mean(c[m])) for m in ("cmc_top1", "cmc_top5", "mAP")}
  return c


def _backfill_results(table="table1", side_info="simclr"):
  """What the evaluation stage returns for a plan with FCT and FastFill h's (synthetic values)."""
  rows = {"old/old": [46.0, 65.0, 29.0], "new/new": [68.0, 84.0, 45.0], "new/h[none]": [61.0, 80.0, 39.0],
          "new/h[simclr]": [65.0, 82.0, 43.0], "new/h[fastfill,none]": [62.0, 80.5, 40.0],
          "new/h[fastfill]": [66.0, 83.0, 44.0]}
  curves = {}
  for gallery in ("h[none]", "h[simclr]", "h[fastfill,none]", "h[fastfill]"):
    for ordering, bend in (("random", 1.0), ("sigma", 0.5), ("distance", 0.3)):
      if ordering != "sigma" or "fastfill" in gallery:
        curves[f"{gallery}:{ordering}"] = _curve(gallery, ordering, rows[f"new/{gallery}"], rows["new/new"], bend)
  payload = {"cases": {c: {"cmc_top1": v[0], "cmc_top5": v[1], "mAP": v[2], "num_queries": 40, "num_skipped": 0}
                       for c, v in rows.items()}, "num_eval": 41, "side_info": side_info}
  sections = {"cmc_curves": {"k": [1], "cases": {c: [v[0]] for c, v in rows.items()}}, "cka": None,
              "backfill": curves, "compatibility": None}
  return report.build(summary.EvaluationResults(payload, sections), experiment="bf", paper_table=table)


def _row(name, *values):
  return "| " + " | ".join([name] + [render.fmt(v) if isinstance(v, float) else str(v) for v in values]) + " |"


def test_backfill_table_has_every_curve_the_references_and_fastfills_numbers(tmp_path):
  res = _backfill_results()
  curves = res["backfill"]
  assert len(curves) == 10  # 4 galleries × (random, distance) + σ for the two FastFill h's
  # FastFill's ImageNet AUCs go with table1, matched to our curve keys only.
  pb = res["paper"]["backfill"]
  assert pb["dataset"] == "imagenet" and "ψ := φ_old" in pb["note"]
  assert pb["curves"] == {"h[none]:random": [62.8, 81.1, 40.5], "h[simclr]:random": [64.7, 82.4, 42.6],
                          "h[fastfill,none]:sigma": [66.5, 83.6, 44.8], "h[fastfill]:sigma": [67.8, 84.2, 46.2]}
  assert pb["references"] == {"old/old": [46.6, 65.2, 28.5], "new/new": [68.2, 84.6, 45.3]}
  md = report.markdown(res)
  section = md.split("## Partial backfilling", 1)[1]
  assert AUC_RULE in section and "Jaeckle et al., FastFill, ICLR 2023" in section
  # The orderings used are explained, in their canonical order.
  assert section.index("random: a seeded") < section.index("sigma: largest predicted") < section.index("distance:")
  ff = curves["h[fastfill]:sigma"]["auc"]
  assert _row("h[fastfill]:sigma", ff["cmc_top1"], ff["cmc_top5"], ff["mAP"], "67.8", "84.2", "46.2") in section
  d = curves["h[simclr]:distance"]["auc"]
  assert _row("h[simclr]:distance", d["cmc_top1"], d["cmc_top5"], d["mAP"], "", "", "") in section
  assert _row("old/old (reference)", 46.0, 65.0, 29.0, "46.6", "65.2", "28.5") in section
  assert _row("new/new (reference, f = 1)", 68.0, 84.0, 45.0, "68.2", "84.6", "45.3") in section
  # The per-fraction CMC top-1 table: one column per curve, one row per grid point, ending at new/new.
  per_f = section.split("### CMC top-1 (%) per backfilled fraction f", 1)[1]
  assert "| f | " + " | ".join(curves) + " |" in per_f
  assert _row("0.0%", *[c["cmc_top1"][0] for c in curves.values()]) in per_f
  assert _row("4.8%", *[c["cmc_top1"][1] for c in curves.values()]) in per_f
  assert _row("100.0%", *([68.0] * 10)) in per_f
  # The README block: AUC top-1 per curve, FastFill's beside it where it has one.
  block = report.readme_block(res)
  assert AUC_RULE in block
  assert _row("h[fastfill]:sigma", ff["cmc_top1"], "67.8") in block
  assert _row("h[fastfill]:random", curves["h[fastfill]:random"]["auc"]["cmc_top1"], "") in block
  # backfill.png: every curve is drawn.
  assert "backfill.png" in report.plot_all(res, str(tmp_path))
  assert os.path.getsize(tmp_path / "backfill.png") > 1000


def test_backfill_without_paper_numbers_and_other_datasets():
  res = _backfill_results(table="")
  md = report.markdown(res)
  assert "paper AUC" not in md and "Jaeckle" not in md and AUC_RULE in md
  assert "| curve (gallery:ordering) | AUC top-1 (%) |\n" in report.readme_block(res)
  # table2 (Places): FastFill has no numbers there.
  assert _backfill_results(table="table2")["paper"]["backfill"] is None
  # The CIFAR-100 plan's table: FastFill's CIFAR-100 numbers exist without side-information only.
  cifar = _backfill_results(table="mlfct_cifar100")
  assert cifar["paper"]["backfill"]["curves"] == {"h[none]:random": [49.1, 73.6, 29.1],
                                                  "h[fastfill,none]:sigma": [53.6, 75.3, 32.5]}
  assert cifar["paper"]["rows"] == {"old/old": [32.9, 59.3, 16.1], "new/new": [56.4, 77.5, 36.5]}
  # An evaluation without compare_transformations has one gallery, "h": matched through its side-information.
  assert report.backfill_section("table1", ["h:random", "h:sigma"], "none")["curves"] == {
      "h:random": [62.8, 81.1, 40.5]}
  assert report.backfill_section("table1", ["h:random"], "simclr")["curves"] == {"h:random": [64.7, 82.4, 42.6]}
  assert report.backfill_section("table1", ["h[alt_old]:random"]) is None  # no curve FastFill has


def test_backfill_grid_other_than_fastfills_is_named():
  curve = _curve("h", "random", [10.0, 20.0, 5.0], [30.0, 40.0, 15.0], fractions=[0.0, 0.25, 1.0])
  res = {"cases": {"new/new": {"cmc_top1": 30.0, "cmc_top5": 40.0, "mAP": 15.0}}, "backfill": {"h:random": curve}}
  md = report.markdown(res)
  assert "AUC: mean over the 3 grid points f ∈ {0, 0.25, 1}" in md
  assert _row("h:random", curve["auc"]["cmc_top1"], curve["auc"]["cmc_top5"], curve["auc"]["mAP"]) in md
  assert curve["auc"]["cmc_top1"] == pytest.approx(np.mean([10.0, 15.0, 30.0]))
  assert "old/old (reference)" not in md and _row("new/new (reference, f = 1)", 30.0, 40.0, 15.0) in md


def test_an_older_single_backfill_curve_is_refused_in_one_line(tmp_path):
  old = {"order": "random", "fractions": [0.0, 1.0], "cmc_top1": [1.0, 2.0], "mAP": [1.0, 2.0],
         "auc": {"cmc_top1": 1.5, "mAP": 1.5}}
  res = {"experiment": "x", "cases": {"new/new": {"cmc_top1": 2.0}}, "cmc_curves": {"k": [], "cases": {}},
         "backfill": old}
  for fn in (report.markdown, report.readme_block, lambda r: report.plot_all(r, str(tmp_path))):
    with pytest.raises(FCTError, match="single backfilling curve of an older version") as e:
      fn(res)
    assert "\n" not in str(e.value)
