"""Side-information stage: SimCLR views and loss, every alternative for a step, loading by the transformation."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common as cfg_common
from configs import demo
from fct_jax import artifacts, checkpoint, config_schema, experiment, sharding, train_lib
from fct_jax.data import augment, image_spec, resizing, shapes, simclr_views, sources
from fct_jax.errors import FCTError
from fct_jax.stages import side_info

VIEWS = {"crop_scale": (0.5, 1.0), "jitter_strength": 1.0, "max_hue": 0.5, "rotation": 180.0}
SMALL = image_spec.SMALL_ARRAYS  # the shapes demo's input convention


def _example(i=0, size=16):
  d = shapes.make_split("old_train", num_examples=8, image_size=size)
  return {"image": d["image"][i], "label": d["label"][i]}


# ------------------------------------------------------------------------------------------------ views


@pytest.mark.parametrize("kw", [{}, VIEWS, {"blur_prob": 1.0, "out_size": 12}])
def test_two_views_differ_and_are_deterministic(kw):
  ex = _example()
  views = augment.two_view_transform("simclr", SMALL, **kw)  # kw over the stage config's default views
  a, b, c = (views(ex, np.random.default_rng(seed)) for seed in (3, 3, 4))
  size = kw.get("out_size") or 16
  assert set(a) == {"view1", "view2", "label"}  # the raw image is dropped, labels pass through
  for v in ("view1", "view2"):
    assert a[v].shape == (size, size, 3) and a[v].dtype == np.float32 and np.all(np.isfinite(a[v]))
    np.testing.assert_array_equal(a[v], b[v])
  assert not np.allclose(a["view1"], a["view2"])
  assert not np.allclose(a["view1"], c["view1"])


def test_crop_resize_and_rotation_geometry():
  img = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(resizing.resize_bilinear(img, (0, 0, 8, 8), 8, 8), img, atol=1e-6)  # identity
  np.testing.assert_allclose(resizing.resize_bilinear(img, (2, 1, 4, 4), 4, 4), img[2:6, 1:5], atol=1e-6)
  np.testing.assert_allclose(resizing.rotated_crop_bilinear(img, (0, 0, 8, 8), np.pi / 2, 8, 8), np.rot90(img),
                             atol=1e-5)
  for seed in range(20):  # boxes always lie inside the image, within the area bounds (or the fallback)
    top, left, h, w = resizing.random_resized_crop_box(np.random.default_rng(seed), 16, 12, scale=(0.3, 1.0))
    assert 0 <= top and top + h <= 16 and 0 <= left and left + w <= 12 and h * w >= 0.25 * 16 * 12


def test_gamma_view_is_a_per_channel_power():
  """``gamma``: each channel raised to its own power in [1/gamma, gamma]; gamma=1 leaves the view unchanged."""
  ex = _example()
  plain = dict(crop_scale=(1.0, 1.0), flip=False, jitter_strength=0.0, grayscale_prob=0.0)
  x = ex["image"].astype(np.float32) / 255.0

  def view(seed, gamma):  # the view in [0, 1]: normalisation undone
    views = dict(config_schema.SIMCLR_VIEWS, spec=SMALL, gamma=gamma, **plain)
    v = simclr_views.simclr_view(ex["image"], np.random.default_rng(seed), **views)
    return v * np.float32(SMALL.std) + np.float32(SMALL.mean)

  # gamma=1 (the default) and no other change: the view is the image itself, normalised.
  np.testing.assert_allclose(view(0, 1.0), x, atol=1e-6)
  for seed in range(5):
    y = view(seed, 2.0)
    for c in range(3):
      inside = (x[..., c] > 0.05) & (x[..., c] < 0.95)
      g = np.log(np.maximum(y[..., c][inside], 1e-6)) / np.log(x[..., c][inside])
      assert 0.5 - 1e-3 <= g.min() and g.max() <= 2.0 + 1e-3 and np.ptp(g) < 1e-2  # one exponent per channel


# ----------------------------------------------------------------------------------------- NT-Xent


def _simclr_cfg():
  c = demo.get_config("runlocal").stages.side_info
  c.train.batch_size = 8
  return c


def test_nt_xent_gradients_finite_and_loss_decreases():
  cfg = _simclr_cfg()
  model = artifacts.build_side_model(cfg)
  task = side_info.make_task(cfg, model)
  source, _ = sources.get_source(cfg.data, cfg.split)
  rng = np.random.default_rng(0)
  exs = [task.transform(source[i], rng) for i in range(8)]
  batch = {k: jnp.asarray(np.stack([e[k] for e in exs])) for k in task.keys}
  variables = dict(task.init(jax.random.key(0, impl="rbg"), batch))
  params = variables.pop("params")
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, state, opt):
    (l, (m, new_state)), g = jax.value_and_grad(task.loss, has_aux=True)(params, state, None, batch, None, 0)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), new_state, opt, l, g, m

  losses = []
  for _ in range(6):
    params, variables, opt, l, g, m = step(params, variables, opt)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g))
    assert 0.0 <= float(m["contrastive_accuracy"]) <= 1.0
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.05, losses


def test_simclr_loss_is_global_over_devices(tmp_path):
  """NT-Xent uses the whole global batch as negatives: the same loss on 1 and on 8 devices."""
  cfg = _simclr_cfg()
  cfg.train.steps = 1
  source, _ = sources.get_source(cfg.data, cfg.split)
  out = {}
  for n in (1, 8):
    task = side_info.make_task(cfg, artifacts.build_side_model(cfg))
    _, hist = train_lib.train(cfg=cfg, workdir=str(tmp_path / f"d{n}"), task=task, source=source,
                              mesh=sharding.make_mesh(jax.devices()[:n]))
    out[n] = hist[0]["loss"]
  np.testing.assert_allclose(out[1], out[8], rtol=1e-5)


# ------------------------------------------------------------------------------- alternatives, loading


def _side_cfg(method: str, name: str):
  d = demo.get_config("runlocal").stages
  c = ml_collections.ConfigDict(d.side_info.to_dict())
  c.name, c.method = name, method
  c.train.steps = 1
  if method == "autoencoder":
    # One stride-2 block (total stride 4): fits 16×16 runlocal images and compiles quickly.
    c.model = ml_collections.ConfigDict({"name": "autoencoder", "embedding_dim": 8, "settings": ((1, 8, 1, 2),)})
  return c


def _h_cfg(name: str, kind: str, dim: int, stage: str = "", cache: bool = True):
  d = demo.get_config("runlocal").stages
  c = ml_collections.ConfigDict(d.transformation.to_dict())
  c.name = name
  c.train.steps = 1
  c.feature_mode = "cached" if cache else "online"
  c.augment, c.cache_views = "none", 1
  c.side_info = {"kind": kind, "dim": dim, "stage": stage}
  return c


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
  """A workdir with the runlocal old and new stages (one step each)."""
  wd = str(tmp_path_factory.mktemp("side"))
  for s in ("old", "new"):
    c = demo.get_config(f"stage={s},runlocal")
    c.stages[s].train.steps = 1
    experiment.run(c, wd)
  return wd


@pytest.mark.parametrize("method", artifacts.SIDE_INFO_METHODS)
def test_each_alternative_trains_and_feeds_h(upstream, method):
  stages = [_side_cfg(method, f"si_{method}"), _h_cfg(f"h_{method}", method, 8, f"si_{method}", cache=False)]
  assert experiment.run(cfg_common.experiment("demo", stages), upstream) == [s.name for s in stages]
  ctx = artifacts.Context(workdir=upstream)
  psi = artifacts.load_side_info(ctx, f"si_{method}", "test")
  assert psi.method == method and psi.dim == 8
  images = np.zeros((2, 16, 16, 3), np.float32)
  assert psi.apply(psi.variables, images).shape == (2, 8)
  h, hcfg, side = artifacts.load_h(ctx, f"h_{method}", "test")
  assert side.method == method and h(np.zeros((3, 8), np.float32), np.zeros((3, 8), np.float32)).shape == (3, 8)
  if method == "simclr":  # the saved model keeps the projection head; ψ is the encoder alone
    saved = checkpoint.load_model(os.path.join(upstream, "si_simclr"))
    assert set(saved["params"]) == {"encoder", "projection"}
    assert "projection" not in psi.variables["params"]


@pytest.mark.parametrize("dim", [0, 8])
def test_no_side_info_feeds_zeros(upstream, dim):
  cfg = _h_cfg(f"h_none{dim}", "none", dim)
  assert experiment.run(cfg_common.experiment("demo", [cfg]), upstream) == [cfg.name]
  _, _, side = artifacts.load_h(artifacts.Context(workdir=upstream), cfg.name, "test")
  source, _ = sources.get_source(cfg.data, "eval")
  psi = side.embed(source, batch_size=8, transform=artifacts.eval_transform(cfg))
  assert psi.shape == (len(source), dim) and not psi.any()


def test_width_and_kind_mismatch_stop_with_one_line_errors(upstream):
  experiment.run(cfg_common.experiment("demo", [_side_cfg("simclr", "si_w")]), upstream)
  cases = [(_h_cfg("h_w5", "simclr", 5, "si_w"), "side-info width mismatch: stage 'si_w' gives 8-d ψ but "
                                                  "side_info.dim=5"),
           (_h_cfg("h_k", "autoencoder", 8, "si_w"), "side_info.kind is 'autoencoder' but stage 'si_w' trained "
                                                     "'simclr'"),
           (_h_cfg("h_s", "simclr", 8, ""), "needs side_info.stage"),
           (_h_cfg("h_m", "simclr", 8, "nope"), "needs stage 'nope'"),
           (_h_cfg("h_o", "simclr", 8, "old"), "expects 'old' to be a side_info stage")]
  for cfg, msg in cases:
    with pytest.raises(FCTError, match=msg.replace("(", r"\(")) as e:
      experiment.run(cfg_common.experiment("demo", [cfg]), upstream)
    assert "\n" not in str(e.value)
    assert not checkpoint.is_done(os.path.join(upstream, cfg.name))


def test_input_norm_makes_psi_invariant_to_affine_intensity(upstream):
  """``input_norm="image"``: ψ standardises each image inside the model, so the loaded ψ ignores a x + b."""
  cfg = _side_cfg("simclr", "si_norm")
  cfg.input_norm = "image"
  experiment.run(cfg_common.experiment("demo", [cfg]), upstream)
  psi = artifacts.load_side_info(artifacts.Context(workdir=upstream), "si_norm", "test")
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  a = np.asarray(psi.apply(psi.variables, x))
  b = np.asarray(psi.apply(psi.variables, 2.5 * x + 0.7))
  assert np.ptp(a) > 0
  np.testing.assert_allclose(a, b, rtol=3e-3, atol=1e-4)  # up to eps in the std
  cfg.input_norm = "none"  # without it the same network is not invariant
  plain = artifacts.side_encoder(cfg)[0]
  v = plain.init(jax.random.key(0), x)
  assert not np.allclose(plain.apply(v, x)["embedding"], plain.apply(v, 2.5 * x + 0.7)["embedding"], atol=1e-3)
  cfg.input_norm = "channel"
  with pytest.raises(FCTError, match="unknown input_norm 'channel'"):  # refused when the config is resolved
    config_schema.resolve(cfg)


def test_side_info_stage_input_norm_argument():
  """``common.side_info_stage(input_norm=...)``: "none" by default, the stage's own values only."""
  kw = dict(data={"name": "digits"}, split="old_train", model={"name": "small_cnn"}, seed=0,
            train_cfg=cfg_common.train(batch_size=8, epochs=1, optimizer_cfg=cfg_common.optimizer("sgd", 0.1)))
  assert cfg_common.side_info_stage("s", **kw).input_norm == "none"
  assert cfg_common.side_info_stage("s", input_norm="image", **kw).input_norm == "image"
  with pytest.raises(ValueError, match="unknown input_norm 'channel'; valid: none, image"):
    cfg_common.side_info_stage("s", input_norm="channel", **kw)


def test_stage_saved_before_input_norm_still_matches(tmp_path):
  """A side_info stage whose config.json predates ``input_norm`` (raw input: "none") is not refused."""
  cfg = _side_cfg("simclr", "si_before")
  cfg.input_norm = "none"
  saved = cfg.to_dict()
  del saved["input_norm"]
  d = tmp_path / "si_before"
  d.mkdir()
  checkpoint.write_json(str(tmp_path / "experiment.json"), {"experiment": "demo"})
  checkpoint.write_json(str(d / "config.json"), saved)
  checkpoint.mark_done(str(d))
  assert experiment.run(cfg_common.experiment("demo", [cfg]), str(tmp_path)) == []  # finished: skipped
  cfg.input_norm = "image"
  with pytest.raises(FCTError, match="was run with a different config: input_norm='none' there, 'image' now"):
    experiment.run(cfg_common.experiment("demo", [cfg]), str(tmp_path))


def test_unknown_method():
  bad = _side_cfg("simclr", "x")
  bad.method = "byol"
  with pytest.raises(FCTError, match="unknown side-info method 'byol'"):
    artifacts.build_side_model(bad)


def test_side_info_ablation_plan_end_to_end(tmp_path):
  """Table 6's plan (runlocal): every side-information kind gets its own h and its own new/h[kind] row."""
  from fct_jax import experiment  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config("ablation,runlocal")
  ran = experiment.run(cfg, str(tmp_path))
  assert ran == list(cfg.plan)
  res = json.load(open(tmp_path / "results.json"))
  for kind in ("none", "simclr", "autoencoder", "alt_old", "alt_old_mixup"):
    m = res["cases"][f"new/h[{kind}]"]
    assert 0.0 <= m["cmc_top1"] <= 100.0
