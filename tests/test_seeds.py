"""Multi-seed plans (``--config.seeds=N``): one full plan per seed set in ``seed_<i>/``, then the combined report."""

import json

import numpy as np
import pytest

from configs import demo
from fct_jax import checkpoint, experiment
from fct_jax.errors import FCTError
from fct_jax.report import seeds as seeds_report

METRICS = ("cmc_top1", "cmc_top5", "mAP")


def _read(path):
  return json.loads(path.read_text())


def _stat(values):
  return float(np.mean(values)), float(np.std(values, ddof=1))


def test_two_seed_demo_end_to_end(tmp_path, capsys):
  config = demo.get_config("runlocal")
  config.seeds = 2
  wd = tmp_path / "wd"
  ran = experiment.run(config, str(wd))
  assert ran == [f"seed_{i}/{s}" for i in range(2) for s in config.plan]
  per_seed = [_read(wd / f"seed_{i}" / "results.json") for i in range(2)]
  combined = _read(wd / "results.json")
  assert combined["seed_dirs"] == ["seed_0", "seed_1"] and "ddof=1" in combined["sd"]
  assert list(combined["cases"]) == list(per_seed[0]["cases"])
  for case, stats in combined["cases"].items():
    for m in METRICS:
      values = [r["cases"][case][m] for r in per_seed]
      assert stats[m]["per_seed"] == values
      np.testing.assert_allclose((stats[m]["mean"], stats[m]["sd"]), _stat(values), rtol=1e-12, atol=1e-12)
  # Backfilling AUCs per curve (gallery:ordering; needs the evaluation stage's per-curve backfill section).
  assert "h[simclr]:random" in per_seed[0]["backfill"]
  assert list(combined["backfill_auc"]) == list(per_seed[0]["backfill"])
  for key, by_metric in combined["backfill_auc"].items():
    assert list(by_metric) == list(METRICS)
    for m, stats in by_metric.items():
      values = [r["backfill"][key]["auc"][m] for r in per_seed]
      assert stats["per_seed"] == values
      np.testing.assert_allclose((stats["mean"], stats["sd"]), _stat(values))
  assert combined["backfill_fractions"] == per_seed[0]["backfill"]["h[simclr]:random"]["fractions"]
  # Every ordering is checked in every seed, against that seed's own case table.
  assert [o["ordering"] for o in combined["orderings"]] == demo.ORDERINGS + demo.FASTFILL_ORDERINGS
  for o in combined["orderings"]:
    a, b = seeds_report.parse_ordering(o["ordering"])
    value = lambda r, t: r["backfill"][t]["auc"]["cmc_top1"] if ":" in t else r["cases"][t]["cmc_top1"]
    assert o["per_seed"] == [value(r, a) > value(r, b) for r in per_seed]
    assert o["holds"] == sum(o["per_seed"]) and o["seeds"] == 2
  md = (wd / "results.md").read_text()
  assert "± sample standard deviation over seeds (ddof=1)" in md and "seeds |" in md
  assert "AUC: mean over the 22 grid points f = i/21" in md and "| h[simclr]:random | " in md
  assert (wd / "cases.png").exists()
  # The seeds really changed: other weights, other numbers.
  assert per_seed[0]["cases"] != per_seed[1]["cases"]
  # Seed set 0 is the plan as written (same stage configs, so a single-seed run's results); set 1 only moves seeds.
  for name in config.plan:
    saved0 = _read(wd / "seed_0" / name / "config.json")
    assert saved0 == json.loads(json.dumps(config.stages[name].to_dict()))
    saved1 = _read(wd / "seed_1" / name / "config.json")
    if "seed" in saved0:
      assert saved1.pop("seed") == saved0.pop("seed") + experiment.SEED_OFFSET
    assert saved1 == saved0
  # A rerun skips every seed set and rewrites the same combined report; the CLI re-renders it.
  before = (wd / "results.json").read_text()
  capsys.readouterr()
  assert experiment.run(config, str(wd)) == []
  assert "[seed_1] finished earlier" in capsys.readouterr().out
  assert (wd / "results.json").read_text() == before
  assert sorted(p.rsplit("/", 1)[-1] for p in seeds_report.rerender(str(wd))) == [
      "cases.png", "results.json", "results.md"]
  # The README's block of the experiment ("demo") becomes the mean ± sd table; a README without it is refused.
  readme = tmp_path / "README.md"
  readme.write_text("x\n<!-- demo-results:start -->\nstale table\n<!-- demo-results:end -->\ny\n")
  seeds_report.rerender(str(wd), readme=str(readme), source_name="/tmp/d")
  text = readme.read_text()
  assert "stale table" not in text and " ± " in text and "2 seed sets" in text and "--workdir /tmp/d" in text
  auc = combined["backfill_auc"]["h[simclr]:random"]["cmc_top1"]
  assert f"| h[simclr]:random | {seeds_report._pm(auc)} |" in text  # pylint: disable=protected-access
  readme.write_text("no markers\n")
  with pytest.raises(FCTError, match="no <!-- demo-results:start -->"):
    seeds_report.rerender(str(wd), readme=str(readme))


def test_one_seed_plan_is_unchanged(tmp_path):
  config = demo.get_config("runlocal")
  assert config.seeds == 1
  assert experiment.seed_set(config, 0).to_dict() == config.to_dict()
  # No seed sub-workdirs in the dry run of a single-seed plan.
  rows = experiment.dry_run(config, str(tmp_path / "wd"))
  assert all("seed_dir" not in r for r in rows)


def test_dry_run_names_the_seed_sets(tmp_path, capsys):
  config = demo.get_config("runlocal")
  config.seeds = 3
  rows = experiment.dry_run(config, str(tmp_path / "wd"))
  out = capsys.readouterr().out
  assert "3 seed sets" in out and "seed_<i>" in out
  assert [r["seed_dir"] for r in rows] == [f"seed_{i}" for i in range(3) for _ in config.plan]
  assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("seeds", [0, -1])
def test_bad_seeds(seeds, tmp_path):
  config = demo.get_config("runlocal")
  config.seeds = seeds
  with pytest.raises(FCTError, match="seeds must be a positive integer"):
    experiment.run(config, str(tmp_path))


@pytest.mark.parametrize("ordering", ["new/h > ", "new/h < old/old", "a > b", "new/new > old/old > h/h",
                                      "h[none]:random > new/h"])
def test_bad_ordering_is_refused_before_running(ordering, tmp_path):
  config = demo.get_config("runlocal")
  config.stages.eval.orderings = [ordering]
  with pytest.raises(FCTError, match="is not of the form"):
    experiment.run(config, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_combine_by_hand():
  per_seed = [{"experiment": "x", "cases": {"a/a": {"cmc_top1": v, "cmc_top5": 50.0, "mAP": None},
                                            "b/b": {"cmc_top1": 40.0, "cmc_top5": 50.0, "mAP": 1.0}},
               "backfill": None} for v in (30.0, 50.0, 46.0)]
  out = seeds_report.combine(per_seed, ["seed_0", "seed_1", "seed_2"], ["a/a > b/b", "a/a > c/c"])
  assert out["cases"]["a/a"]["cmc_top1"] == {"mean": 42.0, "sd": pytest.approx(np.std([30, 50, 46], ddof=1)),
                                             "per_seed": [30.0, 50.0, 46.0]}
  assert out["cases"]["a/a"]["mAP"]["mean"] is None and out["backfill_auc"] is None
  assert out["orderings"][0]["per_seed"] == [False, True, True] and out["orderings"][0]["holds"] == 2
  assert out["orderings"][1]["per_seed"] == [None] * 3 and out["orderings"][1]["holds"] == 0
  assert "| a/a > b/b | 2 / 3 seeds | no, yes, yes |" in seeds_report.markdown(out)
  assert "42.0 ± 10.6" in seeds_report.markdown(out)
  with pytest.raises(FCTError, match="2 or more seed sets"):
    seeds_report.combine(per_seed[:1], ["seed_0"])


def test_orderings_of_backfilling_curves_compare_auc_top1():
  per_seed = [{"experiment": "x", "cases": {"a/a": {"cmc_top1": 1.0, "cmc_top5": 1.0, "mAP": 1.0}},
               "backfill": {"h[x]:sigma": _auc_curve("h[x]", "sigma", s), "h[x]:random": _auc_curve("h[x]", "random", r)}}
              for s, r in ((60.0, 50.0), (40.0, 50.0), (55.0, 55.0))]
  out = seeds_report.combine(per_seed, ["seed_0", "seed_1", "seed_2"], ["h[x]:sigma > h[x]:random"])
  assert out["orderings"][0]["per_seed"] == [True, False, False] and out["orderings"][0]["metric"] == "auc_cmc_top1"


def _auc_curve(gallery, ordering, t1, t5=70.0, m=30.0):
  return {"gallery": gallery, "ordering": ordering, "fractions": [0.0, 0.5, 1.0], "cmc_top1": [t1] * 3,
          "cmc_top5": [t5] * 3, "mAP": [m] * 3, "auc": {"cmc_top1": t1, "cmc_top5": t5, "mAP": m}}


def test_combine_backfill_auc_per_curve():
  """AUCs per curve key; a seed without a curve, or without any backfill section, gives None there (the mean is
  then missing, as for a case), and the combined report still renders."""
  cases = {"a/a": {"cmc_top1": 1.0, "cmc_top5": 2.0, "mAP": 3.0}}
  per_seed = [
      {"cases": cases, "backfill": {"h[simclr]:random": _auc_curve("h[simclr]", "random", 60.0),
                                    "h[fastfill]:sigma": _auc_curve("h[fastfill]", "sigma", 64.0)}},
      {"cases": cases, "backfill": {"h[simclr]:random": _auc_curve("h[simclr]", "random", 62.0),
                                    "h[fastfill]:sigma": _auc_curve("h[fastfill]", "sigma", 67.0, m=33.0)}},
      {"cases": cases, "backfill": {"h[simclr]:random": _auc_curve("h[simclr]", "random", 64.0),
                                    "h[none]:random": _auc_curve("h[none]", "random", 50.0)}}]
  out = seeds_report.combine(per_seed, ["seed_0", "seed_1", "seed_2"])
  auc = out["backfill_auc"]
  assert list(auc) == ["h[simclr]:random", "h[fastfill]:sigma", "h[none]:random"]  # order of first appearance
  assert all(list(v) == list(METRICS) for v in auc.values())
  assert auc["h[simclr]:random"]["cmc_top1"] == {"mean": 62.0, "sd": pytest.approx(2.0),
                                                 "per_seed": [60.0, 62.0, 64.0]}
  assert auc["h[fastfill]:sigma"]["mAP"] == {"mean": None, "sd": None, "per_seed": [30.0, 33.0, None]}
  assert auc["h[none]:random"]["cmc_top1"]["per_seed"] == [None, None, 50.0]
  assert out["backfill_fractions"] == [0.0, 0.5, 1.0]
  md = seeds_report.markdown(out)
  assert "AUC: mean over the 3 grid points f = i/2" in md
  assert "| h[simclr]:random | 62.0 ± 2.0 | 70.0 ± 0.0 | 30.0 ± 0.0 | 60.0, 62.0, 64.0 |" in md
  assert "| h[fastfill]:sigma | – | – | – | 64.0, 67.0, – |" in md
  block = seeds_report.readme_block(out)
  assert "| h[simclr]:random | 62.0 ± 2.0 |" in block and "| h[none]:random | – |" in block
  # A seed without any backfill section: None there; no seed with one: no backfill_auc and no section.
  per_seed[1] = dict(per_seed[1], backfill=None)
  out = seeds_report.combine(per_seed, ["seed_0", "seed_1", "seed_2"])
  assert out["backfill_auc"]["h[simclr]:random"]["cmc_top1"]["per_seed"] == [60.0, None, 64.0]
  none = seeds_report.combine([dict(r, backfill=None) for r in per_seed], ["seed_0", "seed_1", "seed_2"])
  assert none["backfill_auc"] is None and none["backfill_fractions"] == []
  assert "Backfilling" not in seeds_report.markdown(none) and "backfill" not in seeds_report.readme_block(none)
  # An older version's combined report (one curve: metric → stats) is refused in one line, not misread.
  old = dict(none, backfill_auc={"cmc_top1": {"mean": 1.0, "sd": 0.0, "per_seed": [1.0, 1.0]}})
  del old["backfill_fractions"]
  with pytest.raises(FCTError, match="older version"):
    seeds_report.markdown(old)


def test_orderings_do_not_refuse_an_earlier_evaluation(tmp_path):
  """An evaluation stage run before ``orderings`` existed (or with others) still matches: they change no result."""
  config = demo.get_config("runlocal")
  saved = config.stages.eval.to_dict()
  del saved["orderings"]
  checkpoint.write_json(str(tmp_path / "config.json"), saved)
  experiment.check_stage_config("eval", config.stages.eval, str(tmp_path))  # no error
