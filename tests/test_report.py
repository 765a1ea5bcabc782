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
from fct_jax.retrieval import metrics

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


def test_demo_plan_writes_consistent_report(demo_workdir):
  wd = demo_workdir
  res = json.load(open(os.path.join(wd, "results.json")))
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
    assert rows[case] == [report._f(r["cmc_top1"]), report._f(r["cmc_top5"]), report._f(r["mAP"])], case
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
  bf = res["backfill"]
  assert bf["fractions"][0] == 0.0 and bf["fractions"][-1] == 1.0
  assert bf["cmc_top1"][0] == pytest.approx(res["cases"]["new/h"]["cmc_top1"])
  assert bf["cmc_top1"][-1] == pytest.approx(res["cases"]["new/new"]["cmc_top1"])
  assert f"| 100% | {report._f(bf['cmc_top1'][-1])} | {report._f(bf['mAP'][-1])} |" in md


def test_cli_rerenders_and_updates_readme(demo_workdir, tmp_path):
  readme = tmp_path / "README.md"
  readme.write_text("# x\n\nbefore\n<!-- demo-results:start -->\nold table\n<!-- demo-results:end -->\nafter\n")
  before = json.load(open(os.path.join(demo_workdir, "results.json")))
  assert report.main(["--workdir", demo_workdir, "--update-readme", str(readme), "--source-name", "/tmp/d"]) == 0
  text = readme.read_text()
  assert "old table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith("after\n")
  block = text.split("<!-- demo-results:start -->")[1].split("<!-- demo-results:end -->")[0]
  assert _md_cases("## Cases\n" + block) == _md_cases(open(os.path.join(demo_workdir, "results.md")).read())
  assert json.load(open(os.path.join(demo_workdir, "results.json"))) == before  # row order kept on re-render
  assert report.main(["--workdir", str(tmp_path)]) == 2  # no results.json: one-line error


def test_cmc_curves_match_evaluate():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(30, 4)).astype(np.float32)
  labels = rng.integers(0, 4, 30)
  curves = report.cmc_curves({"a": x, "b": y}, labels, ["a/a", "a/b"], max_k=100)
  assert curves["k"] == list(range(1, 30))  # capped at N − 1
  for case, (q, g) in (("a/a", (x, x)), ("a/b", (x, y))):
    ref = metrics.evaluate(q, g, labels, labels, query_is_gallery=True, ks=(1, 3, 29))
    ys = curves["cases"][case]
    assert [ys[0], ys[2], ys[28]] == pytest.approx([ref["cmc_top1"], ref["cmc_top3"], ref["cmc_top29"]])


def test_compatibility_matrix_and_sequence_rows():
  cases = {"v1/v1": {"cmc_top1": 30.0}, "v2/v2": {"cmc_top1": 46.0}, "v3/v3": {"cmc_top1": 68.0},
           "v2/h2(v1)": {"cmc_top1": 40.0}, "v3/h3(h2(v1))": {"cmc_top1": 57.0}, "v3/h13(v1)": {"cmc_top1": 60.0}}
  assert report.is_sequence(cases) and not report.is_sequence({"old/old": {}, "new/h": {}})
  m = report.compatibility_matrix(cases)
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
