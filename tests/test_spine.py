"""The spine end to end: configs and overrides, every stage on the runlocal config, resume, devices, bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import common as cfg_common
from configs import demo
from fct_jax import artifacts, checkpoint, experiment, sharding, train_lib
from fct_jax.errors import FCTError, NonFiniteError
from fct_jax.stages import backbone
from fct_jax.data import sources

STAGES = ["old", "side_info", "new", "bct_new", "transformation_none", "transformation", "transformation_fastfill_none",
          "transformation_fastfill", "eval"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args, cwd=REPO):
  """Runs ``python -m fct_jax.main`` and returns (returncode, stdout, stderr)."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "fct_jax.main", *args], cwd=cwd, env=env, capture_output=True,
                     text=True, timeout=300)
  return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------- configs


def test_config_forms():
  full = demo.get_config()
  assert full.stage == "" and list(full.plan) == STAGES
  one = demo.get_config("stage=old,runlocal")  # the plan, with one stage selected
  assert one.stage == "old" and list(one.plan) == STAGES and one.stages.old.kind == "backbone"
  assert one.stages.old.train.steps == 2
  with pytest.raises(ValueError, match="unknown stage"):
    demo.get_config("stage=nope")
  with pytest.raises(ValueError, match="unknown config argument"):
    demo.get_config("bogus=1")


def test_cli_runs_a_stage_with_overrides(tmp_path):
  rc, out, err = _main("--config=configs/demo.py:stage=old,runlocal", f"--workdir={tmp_path}",
                       "--config.stages.old.train.steps=1", "--config.stages.old.seed=9",
                       "--config.stages.old.train.optimizer.lr=0.05")
  assert rc == 0, err
  saved = json.load(open(tmp_path / "old" / "config.json"))
  assert saved["train"]["steps"] == 1 and saved["seed"] == 9 and saved["train"]["optimizer"]["lr"] == 0.05
  assert "stage" not in saved and "experiment" not in saved  # same stage config as in a whole-plan run
  assert checkpoint.is_done(str(tmp_path / "old")) and "[old] 1/1 steps" in out


# ------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  """The whole runlocal plan, once for the module (8 simulated devices)."""
  wd = str(tmp_path_factory.mktemp("demo"))
  ran = experiment.run(demo.get_config("runlocal"), wd)
  return wd, ran


def test_every_stage_runs_and_writes_results(demo_run):
  wd, ran = demo_run
  assert ran == STAGES
  for s in ran:
    assert checkpoint.is_done(os.path.join(wd, s))
    assert os.path.exists(os.path.join(wd, s, "config.json"))
  res = json.load(open(os.path.join(wd, "results.json")))
  assert {"old/old", "new/old", "new/new", "h/h", "new/h", "new/h[none]", "new/h[simclr]"} <= set(res["cases"])
  assert res["side_info"] == "simclr" and 0.0 <= res["side_info_analysis"]["simclr:side_info"]["cka_old"] <= 1.0
  for m in res["cases"].values():
    for k in ("cmc_top1", "cmc_top5", "mAP"):
      assert 0.0 <= m[k] <= 100.0
  assert os.path.exists(os.path.join(wd, "results.md"))
  lines = [json.loads(l) for l in open(os.path.join(wd, "old", "metrics.jsonl"))]
  assert any("loss" in l for l in lines)


def test_rerun_skips_finished_stages(demo_run):
  wd, _ = demo_run
  assert experiment.run(demo.get_config("runlocal"), wd) == []


def test_changed_config_is_refused(demo_run):
  wd, _ = demo_run
  cfg = demo.get_config("runlocal")
  cfg.stages.new.train.optimizer.lr = 0.5
  before = open(os.path.join(wd, "new", "config.json")).read()
  with pytest.raises(FCTError, match="different config: train.optimizer.lr"):
    experiment.run(cfg, wd)
  assert open(os.path.join(wd, "new", "config.json")).read() == before


def test_single_stage_config_shares_the_workdir(demo_run):
  wd, _ = demo_run
  # The stage=old form of the same experiment recognises the finished stage.
  assert experiment.run(demo.get_config("stage=old,runlocal"), wd) == []


# ------------------------------------------------------------------------------ resume and devices


def _old_cfg(steps=4):
  """The runlocal demo's ``old`` stage config, ``steps`` steps, a checkpoint every step."""
  cfg = demo.get_config("runlocal").stages.old
  cfg.train.steps = steps
  cfg.train.checkpoint_every_steps = 1
  return cfg


def _one(cfg):
  """The demo plan of that one stage (what ``experiment.run`` takes)."""
  return cfg_common.experiment("demo", [cfg], cfg.name)


def _params(wd, stage="old"):
  return jax.tree.map(np.asarray, checkpoint.load_model(os.path.join(wd, stage)))


def test_resume_is_bit_exact(tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  experiment.run(_one(_old_cfg()), full)
  assert experiment.run(_one(_old_cfg()), split, stop_at_step=2) == []
  assert not checkpoint.is_done(os.path.join(split, "old"))
  assert experiment.run(_one(_old_cfg()), split) == ["old"]
  a, b = _params(full), _params(split)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_same_loss_on_one_and_eight_devices(tmp_path):
  assert jax.device_count() == 8
  cfg = _old_cfg(steps=1)
  source, info = sources.get_source(cfg.data, cfg.split)
  model = artifacts.build_backbone(cfg, info.num_classes)
  out = {}
  for n in (1, 8):
    mesh = sharding.make_mesh(jax.devices()[:n])
    task = backbone.make_task(cfg, model, info.num_classes)
    state, hist = train_lib.train(cfg=cfg, workdir=str(tmp_path / f"d{n}"), task=task, source=source, mesh=mesh)
    out[n] = (hist[0]["loss"], jax.tree.map(np.asarray, state["params"]))
  np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[1][1], out[8][1])


# --------------------------------------------------------------------------------------- bad input


def test_batch_not_divisible_by_devices(tmp_path):
  cfg = _old_cfg()
  cfg.train.batch_size = 12
  with pytest.raises(FCTError, match="not a positive multiple of the device count 8"):
    experiment.run(_one(cfg), str(tmp_path))


def test_nan_loss_stops_without_checkpoint(tmp_path):
  cfg = _old_cfg()
  source, info = sources.get_source(cfg.data, cfg.split)
  model = artifacts.build_backbone(cfg, info.num_classes)
  task = backbone.make_task(cfg, model, info.num_classes)
  good = task.loss
  task.loss = lambda *a: (lambda l, aux: (l * np.nan, aux))(*good(*a))
  with pytest.raises(NonFiniteError, match="loss is nan at step 1"):
    train_lib.train(cfg=cfg, workdir=str(tmp_path), task=task, source=source)
  assert not os.listdir(tmp_path / "checkpoints")


def test_empty_class_subset(tmp_path):
  cfg = _old_cfg()
  cfg.data.num_old_train = 0
  with pytest.raises(FCTError, match="split 'old_train' is empty"):
    experiment.run(_one(cfg), str(tmp_path / "a"))
  cfg = _old_cfg()
  cfg.split = "train_0"  # the first 0 shapes
  with pytest.raises(FCTError, match="K must be in"):
    experiment.run(_one(cfg), str(tmp_path / "b"))


def test_transformation_without_upstream(tmp_path):
  with pytest.raises(FCTError, match="needs stage 'old'.*is missing"):
    experiment.run(demo.get_config("stage=transformation,runlocal"), str(tmp_path))


def test_cli_errors_are_one_line(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "experiment.json").write_text(json.dumps({"experiment": "cifar100"}))
  cases = [
      (["--config=configs/demo.py:stage=bogus", f"--workdir={wd}"], "unknown stage 'bogus'"),
      (["--config=configs/demo.py", "--config.stages.old.nope=1", f"--workdir={wd}"],
       "unknown config field in --config.stages.old.nope"),
      (["--config=configs/missing.py", f"--workdir={wd}"], "cannot load config file configs/missing.py"),
      (["--config=configs/demo.py", "--config.stages.old.train.epochs=abc", f"--workdir={wd}"],
       "could not convert string to float: 'abc'"),
      (["--config=configs/demo.py:runlocal", f"--workdir={wd}"], "holds experiment 'cifar100', not 'demo'"),
  ]
  for args, msg in cases:
    rc, out, err = _main(*args)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert rc != 0, (args, err)
    assert len(lines) == 1 and msg in lines[0], (args, err)
  assert sorted(os.listdir(wd)) == ["experiment.json"]  # nothing written
