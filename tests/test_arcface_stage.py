"""ArcFace in the backbone stage: loss.kind / model.head, BCT through an ArcFace old model, the VGGFace2 plan."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo, vggface2
from fct_jax import artifacts, checkpoint, experiment, losses
from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.stages import backbone, side_info
import stage_logs  # tests/stage_logs.py  pylint: disable=g-bad-import-order


def _arcface(cfg, steps=None):
  cfg.model.head = "arcface"
  cfg.loss.kind = "arcface"
  if steps:
    cfg.train.steps = steps
  return cfg


@pytest.fixture(scope="module")
def arc_old(tmp_path_factory):
  """The runlocal demo's old stage with an ArcFace head and loss, 12 steps, periodic retrieval eval."""
  wd = str(tmp_path_factory.mktemp("arc"))
  plan = demo.get_config("stage=old,runlocal")
  cfg = _arcface(plan.stages.old, steps=12)
  cfg.eval_split, cfg.train.eval_every_steps = "eval", 6
  assert experiment.run(plan, wd) == ["old"]
  return wd, cfg


def test_arcface_backbone_trains(arc_old):
  wd, cfg = arc_old
  hist = [r for r in stage_logs.records(os.path.join(wd, "old")) if "loss" in r]
  loss = [r["loss"] for r in hist]
  assert len(loss) == 12 and np.all(np.isfinite(loss))
  # s = 64, m = 0.5: the margin makes the initial loss large (s·sin m ≈ 31 above log C); it must come down.
  assert loss[0] > 20 and np.mean(loss[-3:]) < loss[0] - 5, loss
  assert all(0.0 <= r["train_accuracy"] <= 1.0 for r in hist)
  evals = [r for r in stage_logs.records(os.path.join(wd, "old")) if "eval/mAP" in r]
  assert [r["step"] for r in evals] == [6, 12] and all(np.isfinite(r["eval/retrieval_top1"]) for r in evals)
  saved = checkpoint.load_model(os.path.join(wd, "old"))
  assert saved["params"]["classifier"]["kernel"].shape == (8, 4)  # ArcFaceHead keeps the shared kernel name
  saved_cfg = checkpoint.read_json(os.path.join(wd, "old", "config.json"))
  assert saved_cfg["loss"]["kind"] == "arcface" and saved_cfg["loss"]["arcface_scale"] == 64.0


def test_arcface_loss_is_the_step_loss():
  """The task's loss is losses.arcface_loss on the model's cosines, with the configured s, m and smoothing."""
  cfg = _arcface(demo.get_config("runlocal").stages.old)
  cfg.loss.arcface_scale, cfg.loss.arcface_margin, cfg.loss.label_smoothing = 30.0, 0.3, 0.1
  source, info = sources.get_source(cfg.data, cfg.split)
  model = artifacts.build_backbone(cfg, info.num_classes)
  task = backbone.make_task(cfg, model, info.num_classes)
  batch = {"image": jnp.asarray(np.stack([source[i]["image"] for i in range(8)]), jnp.float32) / 255.0,
           "label": jnp.asarray(artifacts.source_labels(source)[:8])}
  variables = dict(task.init(jax.random.key(0, impl="rbg"), batch))
  params = variables.pop("params")
  l, (metrics, _) = task.loss(params, variables, None, batch, None, 0)
  out, _ = model.apply({"params": params, **variables}, batch["image"], train=True, mutable=["batch_stats"])
  assert float(jnp.max(jnp.abs(out["logits"]))) <= 1.0  # cosines
  want = losses.arcface_loss(cosine=out["logits"], labels=batch["label"], scale=30.0, margin=0.3,
                             label_smoothing=0.1)
  np.testing.assert_allclose(l, want, rtol=1e-6)
  np.testing.assert_allclose(metrics["train_accuracy"], np.mean(np.argmax(out["logits"], -1) == batch["label"]))


@pytest.mark.parametrize("head,kind,fix", [("linear", "arcface", "set model.head='arcface'"),
                                           ("arcface", "softmax", "set loss.kind='arcface'")])
def test_head_loss_mismatch_is_one_line(head, kind, fix, tmp_path):
  plan = demo.get_config("stage=old,runlocal")
  cfg = plan.stages.old
  cfg.model.head, cfg.loss.kind = head, kind
  with pytest.raises(FCTError, match=fix) as e:
    backbone.make_task(cfg, artifacts.build_backbone(cfg, 5), 5)
  assert "\n" not in str(e.value) and "'old'" in str(e.value)
  with pytest.raises(FCTError, match=fix):  # the stage refuses before training
    experiment.run(plan, str(tmp_path / "wd"))
  cfg.loss.kind = "cosface"  # refused when the plan's configs are resolved, before any stage code runs
  with pytest.raises(FCTError, match="unknown loss.kind 'cosface'; valid: softmax, arcface"):
    experiment.run(plan, str(tmp_path / "wd"))


def test_whole_plan_refuses_a_mismatch_before_any_stage(tmp_path):
  plan = vggface2.get_config("runlocal")
  plan.stages.bct_new.loss.kind = "softmax"  # the last backbone of the plan
  with pytest.raises(FCTError, match="stage 'bct_new': model.head='arcface' outputs cosines"):
    experiment.run(plan, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()
  plan = vggface2.get_config("runlocal,ablation")
  plan.stages.side_altmix.loss.kind = "softmax"
  with pytest.raises(FCTError, match="stage 'side_altmix': model.head='arcface' outputs cosines"):
    experiment.dry_run(plan, str(tmp_path / "wd"))
  assert not (tmp_path / "wd").exists()


def test_stage_saved_before_the_loss_fields_still_matches(tmp_path):
  """A workdir stage whose config.json predates loss.kind / model.head (softmax, linear) is not refused."""
  plan = demo.get_config("stage=old,runlocal")
  cfg = plan.stages.old
  saved = cfg.to_dict()
  saved["loss"] = {"label_smoothing": saved["loss"]["label_smoothing"]}
  del saved["model"]["head"]
  d = tmp_path / "old"
  d.mkdir()
  checkpoint.write_json(str(tmp_path / "experiment.json"), {"experiment": plan.experiment})
  checkpoint.write_json(str(d / "config.json"), saved)
  checkpoint.mark_done(str(d))
  assert experiment.run(plan, str(tmp_path)) == []  # finished: skipped, not refused
  cfg.loss.kind, cfg.model.head = "arcface", "arcface"
  with pytest.raises(FCTError, match="was run with a different config: loss.kind='softmax' there, 'arcface' now"):
    experiment.run(plan, str(tmp_path))


@pytest.mark.parametrize("method", ["alt_old", "alt_old_mixup"])
def test_alt_old_side_info_with_arcface(arc_old, method):
  """The alternate old models (mixup or not) train with an ArcFace head and loss; ψ = the embedding."""
  wd, _ = arc_old
  s = demo.get_config("runlocal").stages.side_info
  c = ml_collections.ConfigDict(s.to_dict())
  c.name, c.method, c.augment = f"side_arc_{method}", method, "none"
  c.model.head, c.loss.kind, c.train.steps = "arcface", "arcface", 2
  c.train.batch_size = 16
  d = os.path.join(wd, c.name)
  os.makedirs(d, exist_ok=True)
  checkpoint.write_json(os.path.join(d, "config.json"), c.to_dict())
  assert side_info.run(c, d, artifacts.Context(workdir=wd))
  checkpoint.mark_done(d)
  loss = [r["loss"] for r in stage_logs.records(d) if "loss" in r]
  # ArcFace's margin puts the first loss far above softmax cross-entropy's log C ≈ 1.4 (4 classes).
  assert loss and all(np.isfinite(loss)) and loss[0] > 10, loss
  psi = artifacts.load_side_info(artifacts.Context(workdir=wd), c.name, "test")
  assert psi.method == method and psi.dim == 8
  c.model.head = "linear"
  with pytest.raises(FCTError, match="set model.head='arcface'"):
    side_info.make_task(c, artifacts.build_side_model(c))


def test_bct_through_arcface_old_model(arc_old):
  """BCT with an ArcFace old model: normalised class-mean columns and the old model's ArcFace influence loss."""
  wd, old_cfg = arc_old
  ctx = artifacts.Context(workdir=wd)
  cfg = demo.get_config("runlocal").stages.bct_new  # a softmax new model: the influence loss is still ArcFace's
  cfg.name = "bct_arc"
  d = os.path.join(wd, "bct_arc")
  os.makedirs(d, exist_ok=True)
  assert backbone.run(cfg, d, ctx)
  hist = [r for r in stage_logs.records(d) if "loss" in r]
  assert all(np.isfinite(r["influence_loss"]) for r in hist) and hist[0]["influence_loss"] > 20  # s·sin m

  source, info = sources.get_source(cfg.data, cfg.split)
  w, old_loss = backbone.bct_old_head(cfg, ctx, source, info.num_classes, 8)
  assert old_loss == {"kind": "arcface", "scale": 64.0, "margin": 0.5}
  old_kernel = np.asarray(checkpoint.load_model(os.path.join(wd, "old"))["params"]["classifier"]["kernel"])
  np.testing.assert_allclose(w[:, :old_kernel.shape[1]], old_kernel)
  module, old_vars, _ = artifacts.load_backbone(ctx, "old", "test")
  emb = artifacts.embed(module, old_vars, source, batch_size=16, transform=artifacts.eval_transform(cfg))
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  labels = artifacts.source_labels(source)
  c = info.num_classes - 1
  np.testing.assert_allclose(w[:, c], emb[labels == c].mean(0), rtol=1e-4, atol=1e-5)

  # The step's influence term is the ArcFace loss on cosines with the normalised frozen classifier.
  model = artifacts.build_backbone(cfg, info.num_classes)
  task = backbone.make_task(cfg, model, info.num_classes, old_classifier=w, old_loss=old_loss)
  batch = {"image": jnp.asarray(np.stack([source[i]["image"] for i in range(8)]), jnp.float32) / 255.0,
           "label": jnp.asarray(labels[:8])}
  variables = dict(task.init(jax.random.key(0, impl="rbg"), batch))
  params = variables.pop("params")
  frozen = {"old_classifier": jnp.asarray(w)}
  _, (metrics, _) = task.loss(params, variables, frozen, batch, None, 0)
  out, _ = model.apply({"params": params, **variables}, batch["image"], train=True, mutable=["batch_stats"])
  e = np.asarray(out["embedding"])
  cos = (e / np.linalg.norm(e, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
  want = losses.arcface_loss(cosine=jnp.asarray(cos), labels=batch["label"], scale=64.0, margin=0.5,
                             label_smoothing=float(cfg.loss.label_smoothing))
  np.testing.assert_allclose(metrics["influence_loss"], want, rtol=1e-4)
  g = jax.grad(lambda f: task.loss(params, variables, f, batch, None, 0)[0])(frozen)
  assert float(jnp.abs(g["old_classifier"]).max()) == 0.0


def test_bct_influence_loss_kinds():
  emb = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  labels = jnp.asarray([0, 1, 4, 2])
  soft = losses.bct_influence_loss(new_embedding=emb, old_classifier=w, labels=labels)
  np.testing.assert_allclose(soft, losses.softmax_cross_entropy(logits=emb @ w, labels=labels), rtol=1e-6)
  # Scale-invariant in both the embedding and the classifier columns under the ArcFace kind.
  arc = losses.bct_influence_loss(new_embedding=emb, old_classifier=w, labels=labels, kind="arcface", scale=10.0,
                                  margin=0.2)
  arc2 = losses.bct_influence_loss(new_embedding=3 * emb, old_classifier=w * jnp.arange(1.0, 6.0), labels=labels,
                                   kind="arcface", scale=10.0, margin=0.2)
  np.testing.assert_allclose(arc, arc2, rtol=1e-5)
  with pytest.raises(ValueError, match="valid: softmax, arcface"):
    losses.bct_influence_loss(new_embedding=emb, old_classifier=w, labels=labels, kind="cosface")


def test_vggface2_plan_is_arcface_with_alt_old_side_info():
  """VGGFace2's forms: ArcFace (with its scale and margin) everywhere, the alternate old model as ψ. That the other
  paper configs keep linear heads, softmax and SimCLR is `test_data_tfds.test_config_forms`."""
  for arg in ("data_dir=/d", "runlocal", "ablation"):
    st = vggface2.get_config(arg).stages
    for name in ("old", "new", "bct_new", "side_info"):
      assert st[name]["model"]["head"] == "arcface", (arg, name)
      assert st[name]["loss"]["kind"] == "arcface", (arg, name)
      assert (st[name]["loss"]["arcface_scale"], st[name]["loss"]["arcface_margin"]) == (64.0, 0.5)
    assert st.side_info.method == "alt_old" and st.side_info.split == "old_train"
    assert st.side_info.model.name == st.old.model.name and st.side_info.seed != st.old.seed
    assert st.transformation.side_info.kind == "alt_old" and st.transformation.side_info.stage == "side_info"
    assert st.bct_new.bct.old == "old"
    if arg == "ablation":  # both alternate old models train like the old model
      for name in ("side_alt", "side_altmix"):
        assert st[name].model.head == "arcface" and st[name].loss.kind == "arcface", name


def test_vggface2_runlocal_old_stage_on_mock_data(tmp_path):
  """ArcFace on the TFDS path (mock VGGFace2): the runlocal old stage trains with finite losses."""
  cfg = vggface2.get_config("stage=old,runlocal")
  assert experiment.run(cfg, str(tmp_path)) == ["old"]
  hist = [r for r in stage_logs.records(str(tmp_path / "old")) if "loss" in r]
  assert len(hist) == 2 and all(np.isfinite(r["loss"]) and r["loss"] > 20 for r in hist)
