"""Transformation at full strength: the sequence plan (h, g), cached and online features, the cached mode's
device-resident multi-step training (steps per call, resume, devices), the BatchNorm switch, width checks, and the
BCT baseline's influence loss through the frozen old classifier."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar100_sequence, demo, demo_sequence, imagenet_sequence
from fct_jax import checkpoint, config_schema, experiment, sharding, train_lib
from fct_jax.data import pipeline, sources
from fct_jax.errors import FCTError, NonFiniteError
from fct_jax import artifacts
from fct_jax.stages import backbone, transformation
import stage_logs  # tests/stage_logs.py  pylint: disable=g-bad-import-order

SEQUENCE_ROWS = ("v2/h2(v1)", "v3/h3(v2)", "v3/h3(h2(v1))", "v3/h13(v1)")


@pytest.fixture(scope="module")
def seq_run(tmp_path_factory):
  """The whole runlocal sequence plan once (8 simulated devices); other tests reuse its finished stages."""
  wd = str(tmp_path_factory.mktemp("seq"))
  ran = experiment.run(demo_sequence.get_config("runlocal"), wd)
  return wd, ran


def _stage_cfg(stage, **changes):
  cfg = demo_sequence.get_config("runlocal").stages[stage]
  for k, v in changes.items():
    target = cfg
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return cfg


def _run_stage(cfg, wd, name):
  d = os.path.join(wd, name)
  shutil.rmtree(d, ignore_errors=True)
  os.makedirs(d)
  return transformation.run(cfg, d, artifacts.Context(workdir=wd)), d


def test_sequence_plan_end_to_end(seq_run):
  wd, ran = seq_run
  assert ran == list(demo_sequence.get_config("runlocal").plan)
  res = json.load(open(os.path.join(wd, "results.json")))
  want = {"v1/v1", "v2/v2", "v3/v3", *SEQUENCE_ROWS, *(r + "[none]" for r in SEQUENCE_ROWS)}
  assert set(res["cases"]) == want
  for m in res["cases"].values():
    assert 0.0 <= m["cmc_top1"] <= 100.0 and 0.0 <= m["mAP"] <= 100.0
  assert res["rows"]["v3/h3(h2(v1))"]["hops"] == [["h2", "g2"], ["h3", ""]]
  assert os.path.exists(os.path.join(wd, "compatibility.png"))  # the report's sequence matrix
  # g2 maps (φ1, ψ1) to ψ2's width.
  g, gcfg, side = artifacts.load_h(artifacts.Context(workdir=wd), "g2", "test")
  assert artifacts.target_kind(gcfg, artifacts.Context(workdir=wd)) == "side_info" and side.stage == "side1"
  n = 5
  out = g(np.zeros((n, 8), np.float32), np.zeros((n, 8), np.float32))
  assert out.shape == (n, 8)


def test_cached_and_online_both_train(seq_run):
  wd, _ = seq_run
  for mode in ("online", "cached"):
    cfg = _stage_cfg("h2", feature_mode=mode, name=f"h2_{mode}")
    finished, d = _run_stage(cfg, wd, f"h2_{mode}")
    assert finished
    hist = stage_logs.records(d)
    assert len(hist) == 2 and all(np.isfinite(r["loss"]) for r in hist)
    assert os.path.isdir(os.path.join(d, "features")) == (mode == "cached")
  feats = np.load(os.path.join(wd, "h2_cached", "features", "old.npy"))
  n = len(sources.get_source(cfg.data, cfg.split)[0])
  assert feats.shape == (n * cfg.cache_views, 8)  # K views of every v2 training image
  # A rerun of the cached stage reuses the stored features (same rows, no recomputation).
  meta = json.load(open(os.path.join(wd, "h2_cached", "features", "meta.json")))
  assert meta["views"] == 2 and meta["num_images"] == n


def test_bn_eval_switch_at_configured_step(seq_run):
  wd, _ = seq_run
  cfg = _stage_cfg("h3_none", **{"name": "h3_bn", "bn_eval_after": 0.5, "train.steps": 4})
  _, d = _run_stage(cfg, wd, "h3_bn")
  assert [r["bn_train_mode"] for r in stage_logs.records(d)] == [1.0, 1.0, 0.0, 0.0]
  # Switched from the first step: BatchNorm statistics are never updated (still their initial 0 / 1).
  cfg = _stage_cfg("h3_none", **{"name": "h3_bn0", "bn_eval_after": 0.0})
  _, d = _run_stage(cfg, wd, "h3_bn0")
  assert [r["bn_train_mode"] for r in stage_logs.records(d)] == [0.0, 0.0]
  stats = checkpoint.load_model(d)["batch_stats"]
  for leaf_path, leaf in jax.tree_util.tree_leaves_with_path(stats):
    expect = 0.0 if "mean" in jax.tree_util.keystr(leaf_path) else 1.0
    np.testing.assert_array_equal(np.asarray(leaf), expect)


def _cached_cfg(name, **changes):
  """h2, cached, 6 steps logged once at the end (so a call may hold several steps), no periodic checkpoint;
  BatchNorm switches to eval mode at step 3."""
  base = {"name": name, "feature_mode": "cached", "train.steps": 6, "train.log_every_steps": 6,
          "train.checkpoint_every_steps": 0, "bn_eval_after": 0.5}
  return _stage_cfg("h2", **{**base, **changes})


def _model(d):
  return jax.tree.map(np.asarray, checkpoint.load_model(d))


def test_cached_multi_step_calls_and_resume_are_bit_identical(seq_run, capsys):
  wd, _ = seq_run
  _, ref = _run_stage(_cached_cfg("h2_spc1", **{"train.steps_per_call": 1}), wd, "h2_spc1")  # 6 calls of 1 step
  assert "up to 1 steps per call" in capsys.readouterr().out
  _, multi = _run_stage(_cached_cfg("h2_spc4", **{"train.steps_per_call": 4}), wd, "h2_spc4")  # calls of 4 + 2
  assert "up to 4 steps per call" in capsys.readouterr().out  # the runs differ in their calls
  # Stopped after 3 steps (one call of 3; checkpoint), resumed (one call of 3).
  cfg = _cached_cfg("h2_resumed", **{"train.steps_per_call": 4})
  resumed = os.path.join(wd, "h2_resumed")
  shutil.rmtree(resumed, ignore_errors=True)
  os.makedirs(resumed)
  assert not transformation.run(cfg, resumed, artifacts.Context(workdir=wd, stop_at_step=3))
  assert transformation.run(cfg, resumed, artifacts.Context(workdir=wd))
  for other in (multi, resumed):
    jax.tree.map(np.testing.assert_array_equal, _model(ref), _model(other))
  # The logged loss is the mean over the same 6 steps however they were grouped into calls.
  assert [r["step"] for r in stage_logs.records(multi)] == [6]
  np.testing.assert_allclose(stage_logs.records(multi)[-1]["loss"], stage_logs.records(ref)[-1]["loss"], rtol=1e-6)
  assert stage_logs.records(multi)[-1]["bn_train_mode"] == 0.5
  # The cache held on the host (one call per step, host-side gather): the same batches through a separately
  # compiled step, so equal up to float rounding.
  _, host = _run_stage(_cached_cfg("h2_host", **{"train.arrays_on_device": False}), wd, "h2_host")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), _model(ref), _model(host))


def test_cached_one_and_eight_devices_agree(seq_run):
  wd, _ = seq_run
  out = {}
  for n in (1, 8):
    cfg = _cached_cfg(f"h2_d{n}", **{"train.steps_per_call": 4})
    d = os.path.join(wd, cfg.name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    assert transformation.run(cfg, d, artifacts.Context(workdir=wd, mesh=sharding.make_mesh(jax.devices()[:n])))
    assert stage_logs.hparams(d)[0]["devices"] == str(n)  # the mesh was used
    out[n] = (stage_logs.records(d)[-1]["loss"], _model(d))
  np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out[1][1], out[8][1])


def test_bn_switch_inside_a_multi_step_call(seq_run, capsys):
  wd, _ = seq_run
  cfg = _stage_cfg("h3_none", **{"name": "h3_bn_call", "bn_eval_after": 0.25, "train.steps": 4,
                                 "train.log_every_steps": 2, "train.checkpoint_every_steps": 0,
                                 "train.steps_per_call": 2})
  _, d = _run_stage(cfg, wd, "h3_bn_call")
  assert "up to 2 steps per call" in capsys.readouterr().out
  # Switch at step 1: the first call (steps 0, 1) has one step in train mode, the second none.
  assert [(r["step"], r["bn_train_mode"]) for r in stage_logs.records(d)] == [(2, 0.5), (4, 0.0)]


def test_steps_per_call_needs_device_arrays(seq_run):
  wd, _ = seq_run
  for changes in ({"feature_mode": "online"}, {"train.arrays_on_device": False}):
    cfg = _cached_cfg("h2_spc_bad", **{"train.steps_per_call": 4, **changes})
    with pytest.raises(FCTError, match="steps_per_call=4 needs the device-resident arrays path"):
      _run_stage(cfg, wd, "h2_spc_bad")


def test_load_h_reads_widths_from_configs_not_checkpoints(seq_run):
  wd, _ = seq_run
  src = os.path.join(wd, "seq_widths")
  shutil.rmtree(src, ignore_errors=True)
  for stage in ("v1", "v2", "side1", "h2"):
    shutil.copytree(os.path.join(wd, stage), os.path.join(src, stage))
  for stage in ("v1", "v2"):  # φ_old and φ_new checkpoints are not needed to use h
    shutil.rmtree(os.path.join(src, stage, "model"))
  h, _, side = artifacts.load_h(artifacts.Context(workdir=src), "h2", "test")
  assert side.stage == "side1" and h(np.zeros((3, 8), np.float32), np.zeros((3, 8), np.float32)).shape == (3, 8)
  # An upstream stage whose recorded width no longer fits the trained h: a one-line error.
  cfg_path = os.path.join(src, "v2", "config.json")
  c = json.load(open(cfg_path))
  c["model"]["embedding_dim"] = 12
  json.dump(c, open(cfg_path, "w"))
  with pytest.raises(FCTError, match=r"transformation 'h2' does not fit the widths .* d_new=12") as e:
    artifacts.load_h(artifacts.Context(workdir=src), "h2", "test")
  assert "\n" not in str(e.value)


def test_sequence_evaluation_loads_each_side_info_once_and_shares_hops(seq_run, tmp_path, monkeypatch):
  """The sequence evaluation loads 4 transformations over 2 ψ models (h2, g2, h13 over side1; h3 over side2):
  each ψ checkpoint is read once; rows that start with the same hop (v2/h2(v1) and v3/h3(h2(v1)), and their
  [none] twins) apply it once; and the results are the plan's."""
  wd, _ = seq_run
  for stage in demo_sequence.get_config("runlocal").plan:
    if stage != "eval":
      os.symlink(os.path.join(wd, stage), tmp_path / stage)
  loads, applied = [], []
  real_load, real_load_h = artifacts.load_side_info, artifacts.load_h
  monkeypatch.setattr(artifacts, "load_side_info", lambda ctx, stage, by: loads.append(stage) or
                      real_load(ctx, stage, by))

  class Counting:  # the loaded h or g, counting its applications
    def __init__(self, fn, stage):
      self.fn, self.stage, self.target_kind = fn, stage, fn.target_kind

    def __call__(self, phi, psi):
      applied.append(self.stage)
      return self.fn(phi, psi)

  def counting_load_h(ctx, stage, *args, **kwargs):
    fn, *rest = real_load_h(ctx, stage, *args, **kwargs)
    return Counting(fn, stage), *rest
  monkeypatch.setattr(artifacts, "load_h", counting_load_h)
  os.makedirs(tmp_path / "eval")
  from fct_jax.stages import sequence  # pylint: disable=g-import-not-at-top
  res = sequence.run(_stage_cfg("eval"), str(tmp_path / "eval"), artifacts.Context(workdir=str(tmp_path)))
  assert res  # a finished stage: its results (the experiment writes the report from them)
  assert sorted(loads) == ["side1", "side2"]
  # 9 hop applications over the 8 rows (11 without sharing): h2 and h2_none once each, shared by two rows; h3 (and
  # h3_none) twice, on v2 and on h2(v1).
  assert sorted(applied) == sorted(["h2", "h3", "g2", "h3", "h13", "h2_none", "h3_none", "h3_none", "h13_none"])
  got = res.payload
  want = json.load(open(os.path.join(wd, "results.json")))
  assert got["cases"] == want["cases"] and got["hop_errors"] == want["hop_errors"]


def test_sequence_hop_errors(seq_run):
  """Each row's hop errors: one entry per hop; h2's and g2's recomputed here from the models and the images."""
  from fct_jax.stages import sequence  # pylint: disable=g-import-not-at-top
  wd, _ = seq_run
  res = json.load(open(os.path.join(wd, "results.json")))
  hops = res["hop_errors"]
  assert set(hops) == {*SEQUENCE_ROWS, *(r + "[none]" for r in SEQUENCE_ROWS)}
  for row, errors in hops.items():
    assert [[e["h"], e["g"]] for e in errors] == res["rows"][row]["hops"]
    for e in errors:
      assert np.isfinite(e["phi_rel_sq_err"]) and e["phi_rel_sq_err"] >= 0
      assert (e["psi_rel_sq_err"] is None) == (not e["g"])
  assert "## Hop errors" in open(os.path.join(wd, "results.md")).read()
  ctx = artifacts.Context(workdir=wd)
  cfg = _stage_cfg("eval")
  source, _ = sources.get_source(cfg.data, cfg.split)
  embed = lambda stage: artifacts.embed(*artifacts.load_backbone(ctx, stage, "test")[:2], source, batch_size=16,
                                     transform=artifacts.eval_transform(cfg))
  psi = lambda stage: artifacts.load_side_info(ctx, stage, "test").embed(source, batch_size=16,
                                                              transform=artifacts.eval_transform(cfg))
  phi1, psi1 = embed("v1"), psi("side1")
  h2, g2 = artifacts.load_h(ctx, "h2", "test")[0], artifacts.load_h(ctx, "g2", "test")[0]
  first = hops["v3/h3(h2(v1))"][0]
  np.testing.assert_allclose(first["phi_rel_sq_err"],
                             sequence.relative_squared_error(h2(phi1, psi1), embed("v2")), rtol=1e-5)
  np.testing.assert_allclose(first["psi_rel_sq_err"],
                             sequence.relative_squared_error(g2(phi1, psi1), psi("side2")), rtol=1e-5)
  assert hops["v2/h2(v1)"][0]["phi_rel_sq_err"] == first["phi_rel_sq_err"]


def test_relative_squared_error():
  from fct_jax.stages import sequence  # pylint: disable=g-import-not-at-top
  t = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
  assert sequence.relative_squared_error(t, t) == 0.0
  assert sequence.relative_squared_error(np.broadcast_to(t.mean(0), t.shape), t) == pytest.approx(1.0)
  # Σ(t − mean)² = 8 + 26 = 34 (columns 0, 2, 4 and 1, 3, 8); an error of 1 in one entry → 1 / 34.
  p = t.copy()
  p[0, 0] += 1.0
  assert sequence.relative_squared_error(p, t) == pytest.approx(1.0 / 34.0)
  assert np.isnan(sequence.relative_squared_error(t, np.ones_like(t)))  # a constant target: undefined


def test_sequence_row_with_a_g_in_place_of_h_is_refused(seq_run):
  from fct_jax.stages import sequence  # pylint: disable=g-import-not-at-top
  wd, _ = seq_run
  cfg = _stage_cfg("eval")
  cfg.rows = [{"name": "v2/g(v1)", "query": "v2", "hops": [["g2", ""]]}]
  with pytest.raises(FCTError, match=r"'g2' is a g \(its target 'side2' is side-information\), not an h") as e:
    sequence.run(cfg, os.path.join(wd, "eval_bad"), artifacts.Context(workdir=wd))
  assert "\n" not in str(e.value)


def _vector_task(rows, *, nan_from=None):
  """A linear model on device-held rows; its metrics show which rows each step saw."""
  x = np.random.default_rng(0).normal(size=(rows, 3)).astype(np.float32)

  def loss(params, model_state, frozen, batch, rng, step):
    del frozen, rng
    l = jnp.mean((batch["x"] @ params["w"] - 1.0) ** 2)
    if nan_from is not None:
      l = l + jnp.where(step >= nan_from, jnp.nan, 0.0)  # the loss only (a NaN branch of where poisons grads)
    checksum = jnp.sum(batch["x"] * jnp.arange(1, batch["x"].shape[0] + 1)[:, None])
    return l, ({"checksum": checksum}, model_state)

  return train_lib.Task(name="vec", init=lambda rng, batch: {"params": {"w": jnp.zeros((3,))}}, loss=loss,
                        transform=lambda ex, rng: ex, arrays={"x": x},
                        indices=pipeline.row_indices(rows, batch_size=8, seed=0))


def _vector_cfg(**train):
  """A ``train`` block by hand, every field (the schema's defaults for those not set here), as a stage gets it."""
  t = {**config_schema.TRAIN, "batch_size": 8, "epochs": 1.0, "steps": 10,
       "optimizer": {**config_schema.OPTIMIZER, "name": "sgd", "lr": 0.1}, "log_every_steps": 1,
       "checkpoint_every_steps": 0, **train}
  return ml_collections.ConfigDict({"seed": 0, "prng_impl": "rbg", "train": t})


def test_device_rows_padded_gather_matches_host(tmp_path):
  # 37 rows: not a multiple of 8 devices (padded shards); 10 steps of 8 cross two epochs.
  runs = {}
  for name, mesh, train in (("d8", None, {}), ("d1", jax.devices()[:1], {}),
                            ("host", None, {"arrays_on_device": False})):
    mesh = sharding.make_mesh(mesh) if mesh else None
    _, hist = train_lib.train(cfg=_vector_cfg(**train), workdir=str(tmp_path / name), task=_vector_task(37),
                              source=np.arange(37), mesh=mesh)
    runs[name] = [(r["step"], r["checksum"], r["loss"]) for r in hist]
  assert [r[0] for r in runs["d8"]] == list(range(1, 11))  # log_every 1: one step per call
  np.testing.assert_allclose(np.asarray(runs["d8"]), np.asarray(runs["host"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(runs["d8"]), np.asarray(runs["d1"]), rtol=1e-6)


def test_nan_inside_a_multi_step_call_stops_before_checkpoint(tmp_path, capsys):
  cfg = _vector_cfg(steps=6, log_every_steps=6, checkpoint_every_steps=3, steps_per_call=4)
  with pytest.raises(NonFiniteError, match="loss is nan at step 6"):  # steps 5, 6 (1-based) are NaN
    train_lib.train(cfg=cfg, workdir=str(tmp_path), task=_vector_task(37, nan_from=4), source=np.arange(37))
  assert "up to 4 steps per call" in capsys.readouterr().out  # steps 4-6 ran in one call
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [3]


def test_stored_feature_width_mismatch_is_one_line(seq_run):
  wd, _ = seq_run
  src = os.path.join(wd, "h2_cached")
  if not os.path.isdir(os.path.join(src, "features")):
    pytest.skip("needs test_cached_and_online_both_train")
  cfg = _stage_cfg("h2", feature_mode="cached", name="h2_bad")
  d = os.path.join(wd, "h2_bad")
  shutil.rmtree(d, ignore_errors=True)
  shutil.copytree(os.path.join(src, "features"), os.path.join(d, "features"))
  old = np.load(os.path.join(d, "features", "old.npy"))
  np.save(os.path.join(d, "features", "old.npy"), old[:, :5])  # features stored by a 5-d model
  with pytest.raises(FCTError, match=r"'old' features of width 5 but h expects 8") as e:
    transformation.run(cfg, d, artifacts.Context(workdir=wd))
  assert "\n" not in str(e.value)
  # Stored gallery vectors of the wrong width given to a trained h: the same kind of error.
  h, _, _ = artifacts.load_h(artifacts.Context(workdir=wd), "h2", "test")
  with pytest.raises(FCTError, match=r"takes 8-d φ_old but got an array of shape \(3, 6\)") as e:
    h(np.zeros((3, 6), np.float32), np.zeros((3, 8), np.float32))
  assert "\n" not in str(e.value)


def test_bct_influence_through_frozen_old_classifier(seq_run):
  wd, _ = seq_run
  ctx = artifacts.Context(workdir=wd)
  old_dir = os.path.join(wd, "v1")
  before = artifacts.stage_fingerprint(old_dir)
  cfg = demo.get_config("runlocal").stages.bct_new
  cfg.bct.old = "v1"
  cfg.name = "bct"
  d = os.path.join(wd, "bct")
  os.makedirs(d, exist_ok=True)
  assert backbone.run(cfg, d, ctx)
  assert artifacts.stage_fingerprint(old_dir) == before  # the old model is never re-saved
  hist = stage_logs.records(d)
  assert all(np.isfinite(r["influence_loss"]) for r in hist)

  # The extended classifier keeps the old columns and adds the old model's class means for the new classes.
  source, info = sources.get_source(cfg.data, cfg.split)
  w, old_loss = backbone.bct_old_head(cfg, ctx, source, info.num_classes, 8)
  assert old_loss["kind"] == "softmax"
  old_kernel = np.asarray(checkpoint.load_model(old_dir)["params"]["classifier"]["kernel"])
  assert w.shape == (8, info.num_classes)
  np.testing.assert_allclose(w[:, :old_kernel.shape[1]], old_kernel)
  module, old_vars, _ = artifacts.load_backbone(ctx, "v1", "test")
  emb = artifacts.embed(module, old_vars, source, batch_size=16, transform=artifacts.eval_transform(cfg))
  labels = artifacts.source_labels(source)
  c = info.num_classes - 1
  np.testing.assert_allclose(w[:, c], emb[labels == c].mean(0), rtol=1e-4, atol=1e-5)

  # The step's gradient: none flows to the frozen classifier, and the influence term moves φ_new.
  model = artifacts.build_backbone(cfg, info.num_classes)
  task = backbone.make_task(cfg, model, info.num_classes, old_classifier=w, old_loss=old_loss)
  plain = backbone.make_task(cfg, model, info.num_classes)
  batch = {"image": jnp.asarray(np.stack([source[i]["image"] for i in range(8)]), jnp.float32) / 255.0,
           "label": jnp.asarray(labels[:8])}
  variables = dict(task.init(jax.random.key(0, impl="rbg"), batch))
  params = variables.pop("params")
  rng, frozen = jax.random.key(1, impl="rbg"), {"old_classifier": jnp.asarray(w)}
  g_frozen = jax.grad(lambda f: task.loss(params, variables, f, batch, rng, 0)[0])(frozen)
  assert float(jnp.abs(g_frozen["old_classifier"]).max()) == 0.0
  g_bct = jax.grad(lambda p: task.loss(p, variables, frozen, batch, rng, 0)[0])(params)
  g_ce = jax.grad(lambda p: plain.loss(p, variables, None, batch, rng, 0)[0])(params)
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), g_bct, g_ce)
  assert max(jax.tree.leaves(diff)) > 0.0


def test_bct_width_mismatch_is_one_line(seq_run):
  wd, _ = seq_run
  cfg = demo.get_config("runlocal").stages.bct_new
  cfg.bct.old, cfg.name = "v1", "bct_wide"
  cfg.model.embedding_dim = 12
  with pytest.raises(FCTError, match="BCT needs equal embedding widths, but the new model is 12-d") as e:
    backbone.run(cfg, os.path.join(wd, "bct_wide"), artifacts.Context(workdir=wd))
  assert "\n" not in str(e.value)


def test_configs():
  plan = list(demo.get_config().plan)
  assert "bct_new" in plan and plan[-1] == "eval"
  assert demo.get_config().stages.eval.bct == "bct_new"
  seq = imagenet_sequence.get_config()
  assert list(seq.plan) == list(demo_sequence.get_config().plan)
  assert seq.stages.g2.new == "side2" and seq.stages.g2.side_info.stage == "side1"
  assert seq.stages.v1.split == "train_250" and seq.stages.h13.old == "v1" and seq.stages.h13.new == "v3"
  assert [r["name"] for r in seq.stages.eval.rows][:4] == list(SEQUENCE_ROWS)
  # The sequence's SimCLR ψ follow the demo's recipe (per-image standardisation, gamma views, 18 epochs).
  for arg in ("", "runlocal"):
    want = demo.get_config(arg or None).stages.side_info
    assert want.input_norm == "image" and want.simclr.views.gamma == 2.0
    for side in ("side1", "side2"):
      got = demo_sequence.get_config(arg or None).stages[side]
      assert got.input_norm == want.input_norm and got.simclr.to_dict() == want.simclr.to_dict()
      assert got.train.epochs == want.train.epochs and got.train.optimizer.to_dict() == want.train.optimizer.to_dict()
  # Every other side-information stage keeps ψ's raw input.
  assert all(st.input_norm == "none" for st in seq.stages.values() if st.kind == "side_info")


def test_longer_sequence_config():
  """N versions: an h (and h_none) per update, a g per intermediate version, the direct h, and rows for every
  update, every hop-by-hop upgrade of the v1 gallery, and the direct one; N = 3 is Table 5's plan."""
  c = cifar100_sequence.get_config("versions=4")
  assert [c.stages[f"v{i}"].split for i in range(1, 5)] == ["train_25", "train_50", "train_75", "new_train"]
  assert list(c.plan) == ["v1", "side1", "v2", "side2", "v3", "side3", "v4", "h2", "h2_none", "g2", "h3", "h3_none",
                          "g3", "h4", "h4_none", "h14", "h14_none", "eval"]
  assert (c.stages.g3.old, c.stages.g3.new, c.stages.g3.side_info.stage) == ("v2", "side3", "side2")
  rows = {r["name"]: (r["query"], [list(h) for h in r["hops"]]) for r in c.stages.eval.rows}
  assert rows["v4/h4(h3(h2(v1)))"] == ("v4", [["h2", "g2"], ["h3", "g3"], ["h4", ""]])
  assert rows["v3/h3(h2(v1))"] == ("v3", [["h2", "g2"], ["h3", ""]])
  assert rows["v4/h4(h3(h2(v1)))[none]"] == ("v4", [["h2_none", ""], ["h3_none", ""], ["h4_none", ""]])
  assert rows["v4/h14(v1)"] == ("v4", [["h14", ""]]) and len(rows) == 2 * (3 + 2 + 1)
  assert list(c.stages.eval.backbones) == ["v1", "v2", "v3", "v4"]
  assert cifar100_sequence.get_config("versions=5").stages.v2.split == "train_40"
  assert "h1to10" in cifar100_sequence.get_config("versions=10").plan
  three = cifar100_sequence.get_config("versions=3")
  assert list(three.plan) == list(demo_sequence.get_config().plan)
  assert [r["name"] for r in three.stages.eval.rows] == [r["name"] for r in demo_sequence.get_config().stages.eval.rows]
  for bad in ("versions=2", "versions=101"):
    with pytest.raises(ValueError, match="versions="):
      cifar100_sequence.get_config(bad)


@pytest.mark.slow
def test_longer_sequence_end_to_end(tmp_path):
  """Four versions on tfds mock data (runlocal): ψ carried through two g's, every row evaluated (~90 s)."""
  wd = str(tmp_path)
  cfg = cifar100_sequence.get_config("runlocal,versions=4")
  assert experiment.run(cfg, wd) == list(cfg.plan)
  res = json.load(open(os.path.join(wd, "results.json")))
  assert set(res["cases"]) == {f"v{i}/v{i}" for i in range(1, 5)} | {r["name"] for r in cfg.stages.eval.rows}
  chain = res["hop_errors"]["v4/h4(h3(h2(v1)))"]
  assert [(e["h"], e["g"]) for e in chain] == [("h2", "g2"), ("h3", "g3"), ("h4", "")]
  assert all(np.isfinite(e["psi_rel_sq_err"]) for e in chain[:2])


def test_fastfill_stage_trains_h_with_uncertainty_in_both_modes(seq_run):
  """FastFill (method="fastfill"): h gains the uncertainty head, the loss reads the labels and φ_new's frozen
  classifier, in the online and the cached mode; the loaded h returns s beside the embedding."""
  wd, _ = seq_run
  ctx = artifacts.Context(workdir=wd)
  new_before = _model(os.path.join(wd, "v2"))
  for mode in ("online", "cached"):
    name = f"h2_ff_{mode}"
    cfg = _stage_cfg("h2", name=name, feature_mode=mode, method="fastfill")
    finished, d = _run_stage(cfg, wd, name)
    assert finished
    hist = stage_logs.records(d)
    assert all(np.isfinite(r["loss"]) and "mean_log_var" in r and "new_classifier_accuracy" in r for r in hist)
    params = checkpoint.load_model(d)["params"]
    assert params["uncertainty"]["kernel"].shape == (8, 1) and "classifier" not in params
    checkpoint.write_json(os.path.join(d, "config.json"), config_schema.resolve(cfg).to_dict())
    checkpoint.mark_done(d)  # what the experiment does after a stage's run
    t = artifacts.load_transformation(ctx, name, "test")
    assert t.sigma_dim == 1
    old, psi = np.ones((3, 8), np.float32), np.zeros((3, 8), np.float32)
    emb, s = t.with_uncertainty(old, psi)
    assert emb.shape == (3, 8) and s.shape == (3, 1) and np.isfinite(s).all()
    np.testing.assert_array_equal(t(old, psi), emb)
  # κ_new is a frozen input: φ_new's stage is untouched.
  jax.tree.map(np.testing.assert_array_equal, _model(os.path.join(wd, "v2")), new_before)
  # A plain h has no uncertainty.
  assert artifacts.load_transformation(ctx, "h2", "test").with_uncertainty(old, psi)[1] is None


def test_fastfill_psi_old_and_refusals(seq_run):
  """side_info.kind="old" feeds φ_old as ψ (the official code's "no side-info"); FastFill of a g is refused."""
  wd, _ = seq_run
  cfg = _stage_cfg("h2_none", name="h2_ff_old", method="fastfill", feature_mode="cached",
                   **{"side_info.kind": "old", "side_info.dim": 8})
  finished, d = _run_stage(cfg, wd, "h2_ff_old")
  assert finished
  feats = {k: np.load(os.path.join(d, "features", f"{k}.npy")) for k in ("old", "psi")}
  np.testing.assert_array_equal(feats["psi"], feats["old"])  # ψ := φ_old
  with pytest.raises(FCTError, match="side_info.dim=8"):
    _run_stage(_stage_cfg("h2_none", name="h2_ff_old4", **{"side_info.kind": "old", "side_info.dim": 4}), wd,
               "h2_ff_old4")
  with pytest.raises(FCTError, match="use method='fct'"):
    _run_stage(_stage_cfg("g2", name="g2_ff", method="fastfill"), wd, "g2_ff")
  with pytest.raises(config_schema.ConfigError, match="unknown method 'fast'"):
    config_schema.resolve(_stage_cfg("h2", method="fast"))
