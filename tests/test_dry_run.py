"""``--dry_run``: every dataset config prints its plan, reads no data and writes nothing."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from fct_jax import checkpoint, config_schema, experiment
from fct_jax.errors import FCTError
from fct_jax.data import shapes, sizes, sources, tfds_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("demo", "demo_sequence", "cifar100", "cifar100_sequence", "imagenet", "places365", "vggface2", "digits")


@pytest.fixture
def no_data(monkeypatch):
  """Any attempt to open or generate a dataset fails the test."""
  def touched(*a, **k):
    raise AssertionError(f"dry run touched data: {a}")
  monkeypatch.setattr(sources, "get_source", touched)
  monkeypatch.setattr(tfds_source, "open_split", touched)
  monkeypatch.setattr(shapes, "make_split", touched)


@pytest.mark.parametrize("name,arg", [(n, a) for n in CONFIGS for a in ("", "runlocal", "ablation")
                                      # digits and the sequences: no ablation variant
                                      if not (n in ("digits", "demo_sequence", "cifar100_sequence")
                                              and a == "ablation")])
def test_every_config_prints_its_plan(name, arg, tmp_path, capsys, no_data):
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  if arg == "ablation":  # Table 6: every side-information kind gets its own h and row (beside FastFill's h's)
    assert config.stages.eval.compare_transformations == [
        "transformation_none", "transformation", "transformation_fastfill_none", "transformation_fastfill",
        "transformation_ae", "transformation_alt", "transformation_altmix"]
  wd = tmp_path / "wd"
  plan = experiment.dry_run(config, str(wd))
  out = capsys.readouterr().out
  assert not wd.exists()
  assert [r["stage"] for r in plan] == list(config.plan)
  assert all(r["state"] == "to run" for r in plan)
  for i, r in enumerate(plan, 1):
    assert f"{i}. {r['stage']} [{r['kind']}] to run" in out
    if "total_steps" in r and r["num_examples"] is not None:
      assert r["steps_per_epoch"] == r["num_examples"] // r["batch_size"]
      assert r["total_steps"] > 0 and f"{r['total_steps']:,} steps" in out
  if name not in ("places365", "vggface2") or arg == "runlocal":  # their old_train counts need the label index
    assert all(r.get("num_examples") is not None for r in plan if "split" in r), plan


def test_known_sizes_and_unknown_ones():
  from configs import imagenet, places365  # pylint: disable=g-import-not-at-top
  im = imagenet.get_config().stages
  assert sizes.split_size(im.old.data, "old_train")[0] == 640_542
  assert sizes.split_size(im.eval.data, "eval")[0] == 50_000
  assert sizes.split_size(im.old.data, "train_250") == (None, sizes.UNKNOWN)
  assert sizes.split_size(places365.get_config().stages.old.data, "old_train") == (None, sizes.UNKNOWN)
  # The shapes demo's train_<K> (first K shapes of new_train): counted from the config, as the source counts it.
  from configs import demo_sequence  # pylint: disable=g-import-not-at-top
  data = demo_sequence.get_config("runlocal").stages.v2.data
  for k in (1, 4, 5):
    n, _ = sizes.split_size(data, f"train_{k}")
    assert n == sources.get_source(data, f"train_{k}")[1].num_examples and 0 < n <= data.num_new_train


def test_reports_finished_stages_and_refusals(tmp_path, capsys, no_data):
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("runlocal")
  wd = str(tmp_path / "wd")
  old_dir = os.path.join(wd, "old")
  os.makedirs(old_dir)
  checkpoint.write_json(os.path.join(wd, "experiment.json"), {"experiment": "demo"})
  checkpoint.write_json(os.path.join(old_dir, "config.json"), config.stages.old.to_dict())
  checkpoint.mark_done(old_dir)
  changed = dict(config.stages.new.to_dict(), seed=99)
  os.makedirs(os.path.join(wd, "new"))
  checkpoint.write_json(os.path.join(wd, "new", "config.json"), changed)
  before = sorted(os.listdir(wd))
  plan = experiment.dry_run(config, wd)
  out = capsys.readouterr().out
  states = {r["stage"]: r["state"] for r in plan}
  assert states["old"] == "finished (skipped)" and states["side_info"] == "to run"
  assert states["new"].startswith("refused: workdir stage 'new' was run with a different config: seed=99")
  assert "1. old [backbone] finished (skipped)" in out
  assert sorted(os.listdir(wd)) == before


def test_main_flag(tmp_path):
  wd = tmp_path / "wd"
  p = subprocess.run([sys.executable, "-m", "fct_jax.main", "--config=configs/imagenet.py:data_dir=/nonexistent",
                      f"--workdir={wd}", "--dry_run"], cwd=REPO, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"))
  assert p.returncode == 0, p.stderr[-2000:]
  assert "640,542 examples" in p.stdout and "62,500 steps" in p.stdout and not wd.exists()


@pytest.mark.parametrize("stage,changes", [("old", {}), ("transformation", {"feature_mode": "online"}),
                                           ("transformation", {"train.arrays_on_device": False})])
def test_steps_per_call_without_device_arrays_is_refused_up_front(stage, changes, tmp_path, no_data):
  """train.steps_per_call > 1 only works on the cached transformation's device arrays: refused by the plan check,
  before any stage runs or the workdir is created (not after a feature-caching pass)."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config("runlocal")
  scfg = config.stages[stage]
  scfg.train.steps_per_call = 4
  for key, value in changes.items():
    target, leaf = (scfg.train, key.split(".")[1]) if key.startswith("train.") else (scfg, key)
    target[leaf] = value
  wd = tmp_path / "wd"
  for fn in (experiment.dry_run, experiment.run):
    with pytest.raises(experiment.FCTError, match=f"stage '{stage}': train.steps_per_call=4 needs the device"):
      fn(config, str(wd))
  assert not wd.exists()
  ok = demo.get_config("runlocal")
  ok.stages.transformation.train.steps_per_call = 4  # the cached transformation on device arrays: accepted
  assert [r["state"] for r in experiment.dry_run(ok, str(wd))] == ["to run"] * len(ok.plan)


# ------------------------------------------------------------------------------------ resolved configs


def _stage_block(out: str, config, name: str) -> str:
  """The dry run's printed lines of stage ``name`` (up to the next stage's)."""
  start = out.index(f". {name} [{config.stages[name].kind}]")
  return out[start:out.find("\n" + str(list(config.plan).index(name) + 2) + ". ", start)]


def test_imagenet_dry_run_shows_every_resolved_field(tmp_path, capsys, no_data):
  """The dry run prints each stage's complete config: optimizer, schedule, epochs, batch, augmentation,
  eval_augment and the dataset's normalisation, besides the sizes and steps."""
  config = importlib.import_module("configs.imagenet").get_config()
  experiment.dry_run(config, str(tmp_path / "wd"))
  out = capsys.readouterr().out
  for name, scfg in experiment.stage_configs(config):
    block = _stage_block(out, config, name)
    for key, value in experiment._flatten(scfg.to_dict()).items():  # pylint: disable=protected-access
      assert f"       {key} = {value!r}" in block, (name, key)
    assert "data normalisation: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)" in block
  old = config.stages.old
  for line in ("train.optimizer.name = 'momentum'", "train.optimizer.schedule = 'cosine'", "train.epochs = 100.0",
               "train.batch_size = 1024", "augment = 'inception_crop_flip'", "eval_augment = 'resize256_crop224'"):
    assert f"       {line}\n" in out, line
  assert old.train.optimizer.warmup_epochs == 5


PAPER_CONFIGS = ("imagenet", "places365", "vggface2", "cifar100")
FASTFILL_STAGES = ("transformation_fastfill_none", "transformation_fastfill")


@pytest.mark.parametrize("name,arg", [(n, a) for n in PAPER_CONFIGS for a in ("", "runlocal")])
def test_paper_configs_plan_fastfill_with_the_official_recipe(name, arg, tmp_path, capsys, no_data):
  """Every paper config trains FastFill's two h's (ψ = 0 and ψ = the plan's side-information) with FCT's h recipe
  plus the official FastFill loss (ml-fct@1a7f8b5 configs/*_fastfill_transformation.yaml), compares them in eval,
  and its dry run prints that recipe."""
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  plan = list(config.plan)
  assert plan[plan.index("transformation") + 1:plan.index("transformation") + 3] == list(FASTFILL_STAGES)
  assert config.stages.eval.compare_transformations[-2:] == list(FASTFILL_STAGES)
  assert config.stages.eval.report.backfill_orderings == ["random", "sigma", "distance"]
  assert config.stages.eval.report.backfill_fractions == pytest.approx([i / 21 for i in range(22)])
  fct = {"transformation_fastfill_none": config.stages.transformation_none,
         "transformation_fastfill": config.stages.transformation}
  for stage in FASTFILL_STAGES:
    ff = config.stages[stage].to_dict()
    assert ff["kind"] == "transformation" and ff["method"] == "fastfill"
    assert ff["fastfill"] == {"sigma_dim": 1, "mu_sim": 1.0, "mu_disc": 1.0, "mu_unc": 0.5, "label_smoothing": 0.1}
    # One recipe: everything else is the FCT transformation's with the same side-information.
    twin = fct[stage].to_dict()
    assert twin["method"] == "fct"
    assert {k: v for k, v in ff.items() if k not in ("name", "method", "fastfill")} == {
        k: v for k, v in twin.items() if k not in ("name", "method", "fastfill")}
  assert config.stages.transformation_fastfill_none.side_info.kind == "none"
  assert config.stages.transformation_fastfill.side_info.stage == "side_info"
  if not arg:  # the reference recipe of ml-fct's (FastFill) transformation
    ff = config.stages.transformation_fastfill
    assert (ff.train.optimizer.name, ff.train.optimizer.lr, ff.train.optimizer.weight_decay) == (
        "adam", 5e-4, 3.0517578125e-5)
    assert (ff.train.optimizer.schedule, ff.train.optimizer.warmup_epochs) == ("cosine", 5)
    assert (ff.train.epochs, ff.train.batch_size, ff.bn_eval_after) == (80.0, 1024, 0.5)
    assert (ff.model.name, ff.model.inner_dim) == ("fct_mlp", 2048)
  experiment.dry_run(config, str(tmp_path / "wd"))
  out = capsys.readouterr().out
  for stage in FASTFILL_STAGES:
    block = _stage_block(out, config, stage)
    assert f". {stage} [transformation] to run" in block
    for line in ("method = 'fastfill'", "fastfill.sigma_dim = 1", "fastfill.mu_sim = 1.0", "fastfill.mu_disc = 1.0",
                 "fastfill.mu_unc = 0.5", "fastfill.label_smoothing = 0.1", "train.optimizer.name = 'adam'",
                 "train.optimizer.lr = 0.0005", f"train.epochs = {config.stages[stage].train.epochs!r}"):
      assert f"       {line}\n" in block, (stage, line)
  assert "       method = 'fct'\n" in _stage_block(out, config, "transformation")


def test_config_json_is_the_resolved_config(tmp_path):
  """A stage's config.json holds exactly its resolved config (every field, defaults included)."""
  plan = importlib.import_module("configs.demo").get_config("stage=old,runlocal")
  plan.stages.old.train.steps = 1
  assert experiment.run(plan, str(tmp_path)) == ["old"]
  saved = checkpoint.read_json(str(tmp_path / "old" / "config.json"))
  want = config_schema.resolve(plan.stages.old).to_dict()
  assert saved == json.loads(json.dumps(want))
  assert saved["eval_augment"] == "default" and saved["loss"]["arcface_scale"] == 64.0


def test_saved_config_without_later_fields_still_matches(tmp_path):
  """An old workdir's config.json, written before a field existed, is resolved before the comparison."""
  scfg = dict(experiment.stage_configs(importlib.import_module("configs.demo").get_config("runlocal")))["eval"]
  saved = scfg.to_dict()
  del saved["eval_augment"], saved["report"]  # as written before these fields existed
  checkpoint.write_json(str(tmp_path / "config.json"), saved)
  experiment.check_stage_config("eval", scfg, str(tmp_path))
  scfg.report.max_k = 5
  with pytest.raises(FCTError, match="report.max_k=20 there, 5 now"):
    experiment.check_stage_config("eval", scfg, str(tmp_path))


def test_resolve_refuses_unknown_kinds_fields_and_missing_ones():
  stage = config_schema.resolve(importlib.import_module("configs.digits").get_config().stages.old)
  assert config_schema.resolve(stage) == stage  # idempotent
  bad = [({"kind": "nope"}, "unknown kind 'nope'; valid: backbone, side_info"),
         ({"train": {"optimizer": {"momentun": 0.9}}}, "unknown field 'train.optimizer.momentun'; valid: name, lr"),
         ({"data": {"name": "mnist"}}, "unknown dataset data.name='mnist'; valid: shapes, digits"),
         ({"loss": {"kind": "cosface"}}, "unknown loss.kind 'cosface'; valid: softmax, arcface")]
  for change, msg in bad:
    cfg = stage.to_dict()
    for key, value in change.items():
      cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key != "data" else value
    with pytest.raises(config_schema.ConfigError, match=msg.replace("(", r"\(")) as e:
      config_schema.resolve(cfg)
    assert "\n" not in str(e.value)
  missing = stage.to_dict()
  del missing["train"]["batch_size"]
  with pytest.raises(config_schema.ConfigError, match="stage 'old': train.batch_size is required"):
    config_schema.resolve(missing)


def test_schema_covers_the_library():
  """Every stage kind the library runs has a schema, and every dataset it reads a data block (stored vectors too)."""
  from fct_jax.stages import STAGE_KINDS  # pylint: disable=g-import-not-at-top
  assert set(config_schema.KINDS) == set(STAGE_KINDS)
  assert set(config_schema.DATA) == {"shapes", "digits", "vectors", *sources.TFDS_DATASETS}
