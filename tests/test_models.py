"""Models: parameter counts against the reference architectures, output contract, BatchNorm modes, sharded steps.

Parameter counts use ``jax.eval_shape`` on ``init`` (tracing only, no compile), so full-size networks are cheap.
Everything that runs uses tiny widths and 16×16 images.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fct_jax import losses
from fct_jax.models import HEADS, MODELS, get_head, get_model
from fct_jax.models.heads import ArcFaceHead, SimCLRProjection, torch_default_init
from fct_jax.models.resnet import SpaceToDepthStem

B, HW = 8, 16  # one image per simulated device

# Tiny variants of the backbones: the same code paths (embedding block with a projection shortcut after other
# blocks, single-block layers, expansion and depthwise convs) with a few channels. The wide and deeper ResNets
# differ only in constructor numbers and are covered by the parameter-count tests.
TINY = {
    "resnet18": dict(width=4, stage_sizes=(1, 1, 1, 2), cifar_stem=True),
    "resnet50": dict(width=4, stage_sizes=(1, 1, 1, 1), cifar_stem=True),  # single-block layers
    "mobilenet_v2": dict(width_mult=0.25, settings=((1, 8, 1, 1), (6, 8, 2, 2), (6, 16, 1, 2)), cifar_stem=True),
    "small_cnn": dict(widths=(4, 8)),
}
EMB, NUM_CLASSES = 12, 5


def _count(model, *inputs):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


def _images(b=B, hw=HW, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, hw, hw, 3), jnp.float32)


def _materialize(model, *inputs, seed=0, **kwargs):
  """Variables for ``model`` without compiling its ``init``.

  ``jit(model.init)`` costs tens of seconds per network on a CPU (every parameter's threefry RNG is compiled), so
  runtime tests trace ``init`` with ``eval_shape`` (which checks the same code) and fill the shapes with NumPy:
  He-scaled normal kernels, BN γ = 1 and running variance 1, zero biases, β and running means.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, **kwargs))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in), leaf.dtype)
    return jnp.full(leaf.shape, 1.0 if name in ("scale", "var") else 0.0, leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _init(name, dtype_name="float32"):
  """Tiny model of the given compute dtype and its variables (cached; variables are float32 for every dtype)."""
  model = get_model(name, num_classes=NUM_CLASSES, embedding_dim=EMB, dtype=jnp.dtype(dtype_name), **TINY[name])
  return model, (_init(name)[1] if dtype_name != "float32" else _materialize(model, _images()))


@functools.lru_cache(maxsize=None)
def _apply_fn(name, dtype_name="float32", train=False):
  """Compiled apply shared by the tests (train mode returns (outputs, {"batch_stats"}))."""
  model = _init(name, dtype_name)[0]
  if train:
    return jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


# --- parameter counts -----------------------------------------------------------------------------------------------

# torchvision's published parameter counts (torchvision.models.<name>(num_classes=1000), e.g. the "num_params" field
# of its weight metadata). Built as plain classifiers: default embedding width and a biased classifier.
TORCHVISION = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "wide_resnet50_2": 68_883_240,
    "mobilenet_v2": 3_504_872,
}


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_param_count_matches_torchvision(name):
  model = get_model(name, num_classes=1000, classifier_bias=True)
  assert _count(model, jnp.zeros((1, 32, 32, 3))) == TORCHVISION[name]


# ml-fct's own networks (models/resnet.py, models/transformations.py), derived from torchvision's counts by hand and
# confirmed by instantiating ml-fct's classes with PyTorch 2.13 (CPU) and summing ``p.numel()`` over
# ``parameters()`` (torch counts weights and BN γ/β; running statistics are buffers, as batch_stats are here):
#   ResNet50-128, 1000 classes: torchvision 25,557,032 − fc (2048·1000 + 1000) = 23,508,032 backbone; layer4's last
#   block: conv3 512→128 instead of 512→2048 (−983,040), bn3 256 instead of 4,096 (−3,840), plus a 1×1 shortcut
#   2048→128 with BN (+262,144 + 256) → 22,783,552; bias-free classifier 128·1000 → 22,911,552.
#   ResNet18-128, 1000 classes: 11,689,512 − (512·1000 + 1000) = 11,176,512; layer4's last block: both 3×3 convs
#   take width 128 (512·128·9 + 128·128·9 = 737,280 instead of 2·512·512·9 = 4,718,592), BNs 2·256 instead of
#   2·1,024, plus shortcut 512·128 + 256 → 7,259,456; classifier 128·1000 → 7,387,456.
#   MLP_BN_SIDE_PROJECTION(128, 128, 128, 2048): p1 = 128·256 + 512 + 256·256 + 512 = 99,328, p2 the same,
#   mixer 512·2048 + 4,096 + 2048·2048 + 4,096 + 2048·128 + 128 = 5,513,344 (no bias before BN) → 5,712,000.
def test_param_count_matches_ml_fct():
  x = jnp.zeros((1, 32, 32, 3))
  assert _count(get_model("resnet50", num_classes=1000, embedding_dim=128), x) == 22_911_552
  assert _count(get_model("resnet18", num_classes=1000, embedding_dim=128), x) == 7_387_456
  assert _count(get_model("wide_resnet50_2", num_classes=1000, embedding_dim=128), x) == 65_254_720  # by torch only
  fct = get_model("fct_mlp", old_dim=128, side_dim=128, new_dim=128, inner_dim=2048)
  assert _count(fct, jnp.zeros((2, 128)), jnp.zeros((2, 128))) == 5_712_000


def test_resnet50_structure_and_resolution():
  shapes = jax.eval_shape(
      lambda: get_model("resnet50", num_classes=10, embedding_dim=128).init_with_output(
          jax.random.key(0), jnp.zeros((2, 224, 224, 3))))
  out, variables = shapes
  assert out["stem"].shape == (2, 56, 56, 64)
  assert out["layer3"].shape == (2, 14, 14, 1024)
  assert out["layer4"].shape == (2, 7, 7, 128)
  params = variables["params"]
  # The embedding lives in layer4's last block: conv3 and a 1×1 projection shortcut output 128 channels.
  assert params["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 512, 128)
  assert params["layer4_2"]["downsample_conv"]["kernel"].shape == (1, 1, 2048, 128)
  assert "downsample_conv" not in params["layer4_1"]
  assert params["classifier"]["kernel"].shape == (128, 10) and "bias" not in params["classifier"]
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))


def test_registry():
  for name in ("resnet18", "resnet50", "resnet101", "wide_resnet50_2", "mobilenet_v2", "fct_mlp", "autoencoder"):
    assert name in MODELS
  with pytest.raises(ValueError, match="valid names: .*resnet50"):
    get_model("resnet5O", num_classes=3)
  with pytest.raises(ValueError, match="arcface"):
    get_head("cosface", num_classes=3)
  assert set(HEADS) == {"linear", "arcface", "simclr_projection"}


# --- output contract ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_backbone_outputs(name, dtype_name):
  _, variables = _init(name, dtype_name)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))  # params f32 whatever dtype
  out = _apply_fn(name, dtype_name)(variables, _images(seed=1))
  assert out["embedding"].shape == (B, EMB) and out["embedding"].dtype == jnp.float32
  assert out["logits"].shape == (B, NUM_CLASSES) and out["logits"].dtype == jnp.float32
  assert np.all(np.asarray(out["embedding"]) >= 0)  # last_nonlin=True: ReLU before pooling
  assert np.all(np.isfinite(np.asarray(out["logits"])))
  stages = set(out) - {"embedding", "logits"}
  assert stages, "backbones also return named intermediate stages"
  for k in stages:
    assert out[k].dtype == jnp.dtype(dtype_name), k


def test_imagenet_stem_norm_feature_and_no_classifier():
  model = get_model("resnet18", num_classes=0, embedding_dim=EMB, width=4, stage_sizes=(1, 1, 1, 1),
                    last_nonlin=False, norm_feature=True)
  x = _images(2, 32)
  out = jax.jit(model.apply)(_materialize(model, x), x)
  assert "logits" not in out
  assert out["stem"].shape == (2, 8, 8, 4) and out["layer4"].shape == (2, 1, 1, EMB)
  np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=-1), 1.0, rtol=1e-5)
  assert np.any(np.asarray(out["layer4"]) < 0)  # last_nonlin=False: no ReLU on the embedding block


@pytest.mark.parametrize("hw,channels", [(16, 3), (17, 5)])
def test_space_to_depth_stem_is_the_direct_stem(hw, channels):
  """SpaceToDepthStem is nn.Conv's 7×7 stride-2 conv with PyTorch's padding: the same initial kernel, outputs and
  gradients (kernel and input) to float32 rounding, for odd image sizes and channels that are not a multiple of 4."""
  direct = nn.Conv(6, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False, kernel_init=torch_default_init)
  s2d = SpaceToDepthStem(6, torch_default_init)
  x = _images(2, hw)[..., :1].repeat(channels, -1) + jnp.arange(channels) / 7.0
  variables = direct.init(jax.random.key(0), x)
  np.testing.assert_array_equal(s2d.init(jax.random.key(0), x)["params"]["kernel"], variables["params"]["kernel"])
  cotangent = jax.random.normal(jax.random.key(2), (2, (hw + 1) // 2, (hw + 1) // 2, 6))

  @jax.jit
  def value_and_vjp(variables, x):
    return [(lambda out, f: (out, f(cotangent)))(*jax.vjp(m.apply, variables, x)) for m in (direct, s2d)]
  ours, reference = value_and_vjp(variables, x)
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_resnet_stem_conv_choice():
  """stem_conv="space_to_depth" gives the same network (variables and outputs) as the default "direct"; an unknown
  choice is refused."""
  kw = dict(num_classes=NUM_CLASSES, embedding_dim=EMB, width=4, stage_sizes=(1, 1, 1, 1))
  direct, s2d = get_model("resnet18", **kw), get_model("resnet18", stem_conv="space_to_depth", **kw)
  assert direct.stem_conv == "direct"
  x = _images(2, 32)
  variables = _materialize(direct, x)
  assert (jax.tree_util.tree_structure(jax.eval_shape(lambda: s2d.init(jax.random.key(0), x)))
          == jax.tree_util.tree_structure(variables))
  np.testing.assert_allclose(s2d.apply(variables, x)["logits"], direct.apply(variables, x)["logits"],
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unknown stem_conv 's2d'; valid: direct, space_to_depth"):
    jax.eval_shape(lambda: get_model("resnet18", stem_conv="s2d", **kw).init(jax.random.key(0), x))


def test_arcface_head():
  head = ArcFaceHead(num_classes=3)
  x = jax.random.normal(jax.random.key(1), (4, 6))
  variables = head.init(jax.random.key(0), x)
  cos = head.apply(variables, x)
  w = np.asarray(variables["params"]["kernel"])
  want = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (w / np.linalg.norm(w, axis=0, keepdims=True))
  np.testing.assert_allclose(cos, want, rtol=1e-5, atol=1e-6)
  model = get_model("resnet18", num_classes=3, embedding_dim=EMB, head="arcface", **TINY["resnet18"])
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), _images(2)))
  assert shapes[1]["params"]["classifier"]["kernel"].shape == (EMB, 3)
  assert shapes[0]["logits"].shape == (2, 3)
  small = get_model("small_cnn", num_classes=3, embedding_dim=EMB, widths=(4,), head="arcface")
  out, v = small.init_with_output(jax.random.key(0), _images(2))
  assert v["params"]["classifier"]["kernel"].shape == (EMB, 3) and float(jnp.max(jnp.abs(out["logits"]))) <= 1.0
  with pytest.raises(ValueError, match="valid heads"):
    jax.eval_shape(lambda: get_model("resnet18", num_classes=3, head="cosface", **TINY["resnet18"]).init(
        jax.random.key(0), _images(2)))


def test_transformation_side_info_modes():
  old, side = jnp.ones((4, 6)), jnp.zeros((4, 5))
  with_side = get_model("fct_mlp", old_dim=6, side_dim=5, new_dim=3, inner_dim=16)
  out, _ = jax.jit(lambda v, o, s: with_side.apply(v, o, s, train=True, mutable=["batch_stats"]))(
      _materialize(with_side, old, side), old, side)
  assert out["embedding"].shape == (4, 3) and np.all(np.isfinite(out["embedding"]))  # all-zero side-info
  no_side = get_model("fct_mlp", old_dim=6, side_dim=0, new_dim=3, inner_dim=16)
  out, variables = jax.eval_shape(lambda: no_side.init_with_output(jax.random.key(0), old, None))
  assert out["embedding"].shape == (4, 3) and out["embedding"].dtype == jnp.float32
  assert not any(k.startswith("side_") for k in variables["params"])
  assert variables["params"]["mix0_dense"]["kernel"].shape == (12, 16)  # 4·new_dim input either way
  # ml-fct: only the last layer has a bias; the others are followed by BatchNorm.
  assert "bias" not in variables["params"]["mix0_dense"] and "bias" in variables["params"]["mix_out"]
  with pytest.raises(ValueError, match="side-information width"):
    jax.eval_shape(lambda: with_side.init(jax.random.key(0), old, None))
  with pytest.raises(ValueError, match="old embedding width"):
    jax.eval_shape(lambda: with_side.init(jax.random.key(0), side, side))


def test_autoencoder_shapes_and_size_check():
  model = get_model("autoencoder", embedding_dim=EMB, width_mult=0.25, settings=((1, 8, 1, 1), (6, 8, 1, 2)))
  out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), _images(2, 8)))
  assert out["embedding"].shape == (2, EMB) and out["embedding"].dtype == jnp.float32
  assert out["reconstruction"].shape == (2, 8, 8, 3) and out["reconstruction"].dtype == jnp.float32
  assert variables["params"]["enc_proj"]["kernel"].shape == (2 * 2 * 8, EMB)  # flattened 2×2×8 bottleneck map
  with pytest.raises(ValueError, match="divisible"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), _images(2, 6)))
  with pytest.raises(ValueError, match="no classifier"):
    jax.eval_shape(lambda: get_model("autoencoder", num_classes=3).init(jax.random.key(0), _images(2, 32)))


# --- BatchNorm modes ------------------------------------------------------------------------------------------------

def test_batchnorm_train_and_eval_modes():
  _, variables = _init("resnet18")
  x = _images(seed=2)
  apply_eval, apply_train = _apply_fn("resnet18"), _apply_fn("resnet18", train=True)
  x_dup = jnp.concatenate([x[:4], x[:4]])
  # Eval: running averages, so a sample's output does not depend on its batch companions.
  np.testing.assert_allclose(apply_eval(variables, x)["embedding"][:4], apply_eval(variables, x_dup)["embedding"][:4],
                             rtol=1e-5, atol=1e-6)
  # Train: batch statistics (output depends on the batch) and updated running averages.
  out_full, new_state = apply_train(variables, x)
  out_dup, _ = apply_train(variables, x_dup)
  assert not np.allclose(out_full["embedding"][:4], out_dup["embedding"][:4], atol=1e-4)
  # Flax momentum 0.9 = PyTorch momentum 0.1: new = 0.9·old + 0.1·batch statistic. The stem conv is 3×3, stride 1,
  # padding 1 (cifar_stem), so its output is recomputed directly.
  conv1 = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  old = variables["batch_stats"]["bn1"]
  new = new_state["batch_stats"]["bn1"]
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv1.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv1.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_fct_batchnorm_is_flax_batchnorm_with_a_closed_form_gradient(training):
  """Same variables, outputs, running statistics and (float32) gradients as flax.linen.BatchNorm."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fct_jax.models.batch_norm import BatchNorm  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(0), (4, 6, 5, 7)) * 3 + 1
  w = jax.random.normal(jax.random.key(1), x.shape)
  variables = {"params": {"scale": jnp.linspace(0.5, 2, 7), "bias": jnp.linspace(-1, 1, 7)},
               "batch_stats": {"mean": jnp.linspace(-0.2, 0.2, 7), "var": jnp.linspace(0.5, 1.5, 7)}}

  def run(module):
    assert jax.tree_util.tree_structure(module.init(jax.random.key(2), x)) == jax.tree_util.tree_structure(variables)

    def loss(params, x):
      y, new = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
      return (y * w).sum(), (y, new["batch_stats"])
    (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    return y, stats, grads

  kw = dict(use_running_average=not training, momentum=0.9, epsilon=1e-5)
  ours, ref = run(BatchNorm(**kw)), run(nn.BatchNorm(**kw))
  for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  if training:  # the statistics moved, and the input gradient is not the trivial dy·scale·rstd of eval mode
    assert not np.allclose(ours[1]["mean"], variables["batch_stats"]["mean"])


def test_fct_batchnorm_bfloat16_gradient_is_rounded_once():
  """In bf16 the closed-form gradient (float32, one rounding) is at least as close to a float32 reference as
  Flax's autodiff gradient, which rounds its mean and variance paths to bf16 separately."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from fct_jax.models.batch_norm import BatchNorm  # pylint: disable=g-import-not-at-top
  x = (jax.random.normal(jax.random.key(0), (4, 8, 16, 32)) * 3 + 1).astype(jnp.bfloat16)
  w = jnp.sin(jnp.arange(x.size, dtype=jnp.float32).reshape(x.shape))

  def grad(module, x):
    v = module.init(jax.random.key(1), x)
    return jax.grad(lambda x: (module.apply(v, x, mutable=["batch_stats"])[0].astype(jnp.float32) * w).sum())(x)

  ref = grad(nn.BatchNorm(use_running_average=False, dtype=jnp.float32), x.astype(jnp.float32))
  err = {name: float(jnp.linalg.norm(grad(m, x).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
         for name, m in (("fct", BatchNorm(use_running_average=False, dtype=jnp.bfloat16)),
                         ("flax", nn.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)))}
  assert err["fct"] <= err["flax"] < 1e-2, err


BN_CHOICE_MODELS = {
    "resnet18": dict(num_classes=NUM_CLASSES, embedding_dim=EMB, **TINY["resnet18"]),
    "mobilenet_v2": dict(num_classes=NUM_CLASSES, embedding_dim=EMB, **TINY["mobilenet_v2"]),
    "autoencoder": dict(embedding_dim=EMB, width_mult=0.25, settings=((1, 8, 1, 1), (6, 8, 1, 2))),
}


@pytest.mark.parametrize("name", sorted(BN_CHOICE_MODELS))
def test_batch_norm_choice(name):
  """batch_norm="fct" (default) and "flax" are the same network: same variables, same train-mode outputs and
  running statistics; an unknown choice is refused."""
  x = _images(seed=5)
  models = {bn: get_model(name, batch_norm=bn, **BN_CHOICE_MODELS[name]) for bn in ("fct", "flax")}
  assert get_model(name, **BN_CHOICE_MODELS[name]).batch_norm == "fct"
  variables = _materialize(models["flax"], x)
  assert (jax.tree_util.tree_structure(jax.eval_shape(lambda: models["fct"].init(jax.random.key(0), x)))
          == jax.tree_util.tree_structure(variables))
  train = {bn: (lambda v, x, m=m: m.apply(v, x, train=True, mutable=["batch_stats"])) for bn, m in models.items()}
  # Every BatchNorm layer of the "fct" network is ours (one custom-gradient call each), none of the "flax" one's.
  num_bn = len(jax.tree_util.tree_leaves(variables["batch_stats"])) // 2
  assert [str(jax.make_jaxpr(train[bn])(variables, x)).count("custom_vjp_call") for bn in ("fct", "flax")] == [num_bn, 0]
  runs = {bn: jax.jit(f)(variables, x) for bn, f in train.items()}
  for a, b in zip(jax.tree_util.tree_leaves(runs["fct"]), jax.tree_util.tree_leaves(runs["flax"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="unknown batch_norm 'sync'; valid: fct, flax"):
    jax.eval_shape(lambda: get_model(name, batch_norm="sync", **BN_CHOICE_MODELS[name]).init(jax.random.key(0), x))


def test_batchnorm_statistics_are_global_when_sharded():
  """Train-mode outputs on a batch sharded over 8 devices equal the single-device ones: BN reduces globally."""
  _, variables = _init("resnet18")
  x = _images(seed=4)
  fn = _apply_fn("resnet18", train=True)
  ref_out, ref_state = fn(variables, x)
  mesh = _mesh()
  out, state = fn(jax.device_put(variables, NamedSharding(mesh, P())),
                  jax.device_put(x, NamedSharding(mesh, P("data"))))
  assert len(out["embedding"].sharding.device_set) == 8
  np.testing.assert_allclose(out["embedding"], ref_out["embedding"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["bn1"]["var"], ref_state["batch_stats"]["bn1"]["var"], rtol=1e-4)


# --- sharded jit train steps ----------------------------------------------------------------------------------------

def _mesh():
  devices = np.array(jax.devices())
  assert devices.size == 8, "conftest sets 8 simulated CPU devices"
  return Mesh(devices, ("data",))


def _sgd_step(apply_loss, variables, batch, mesh):
  """One jit SGD step with replicated variables and a batch sharded on 'data'; returns (loss, new variables)."""
  tx = optax.sgd(0.1, momentum=0.9)
  params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, state, opt_state, batch):
    (loss, new_state), grads = jax.value_and_grad(
        lambda p: apply_loss({"params": p, **state}, batch), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), {**state, **new_state}, opt_state, loss

  replicated = NamedSharding(mesh, P())
  params, state = jax.device_put((params, state), replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  new_params, new_state, _, loss = step(params, state, opt_state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
  return loss, {"params": new_params, **new_state}


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_backbone_train_step_sharded(name):
  model, variables = _init(name)
  before = jax.tree_util.tree_map(np.array, variables)  # the step donates its inputs

  def apply_loss(v, batch):
    out, new_state = model.apply(v, batch["images"], train=True, mutable=["batch_stats"])
    return losses.softmax_cross_entropy(logits=out["logits"], labels=batch["labels"], label_smoothing=0.1), new_state

  batch = {"images": _images(seed=3), "labels": jnp.arange(B) % NUM_CLASSES}
  loss, new = _sgd_step(apply_loss, jax.tree_util.tree_map(jnp.array, variables), batch, _mesh())
  assert np.isfinite(float(loss))
  assert new["params"]["classifier"]["kernel"].sharding.is_fully_replicated
  # Every conv/dense kernel learns. (Not every BN β: in MobileNetV2 a linear bottleneck's β that only feeds a 1×1
  # conv + train-mode BN is a constant shift that BN removes, so its gradient is exactly zero.)
  changed = jax.tree_util.tree_map_with_path(
      lambda path, a, b: path[-1].key != "kernel" or not np.allclose(a, b), before["params"], new["params"])
  assert all(jax.tree_util.tree_leaves(changed)), "every kernel receives a gradient"
  stem_bn = (lambda v: v["stem"]["bn"]) if name == "mobilenet_v2" else (lambda v: v["bn1"])
  assert not np.allclose(stem_bn(before["batch_stats"])["mean"], stem_bn(new["batch_stats"])["mean"])


def test_side_info_models_train_step_sharded():
  """SimCLR (backbone + projection head + NT-Xent), the autoencoder and the FCT transformation, one step each."""
  mesh = _mesh()
  # SimCLR: both views through one backbone in one batch, so BN statistics span both views (as in SimCLR).
  backbone, bvars = _init("small_cnn")
  proj = SimCLRProjection(hidden_dim=16, out_dim=8)
  pvars = _materialize(proj, jnp.zeros((2, EMB)))
  variables = {"params": {"backbone": bvars["params"], "proj": pvars["params"]},
               "batch_stats": {"backbone": bvars["batch_stats"], "proj": pvars["batch_stats"]}}

  def simclr_loss(v, batch):
    views = jnp.concatenate([batch["v1"], batch["v2"]])
    out, bstate = backbone.apply({"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]},
                                 views, train=True, mutable=["batch_stats"])
    z, pstate = proj.apply({"params": v["params"]["proj"], "batch_stats": v["batch_stats"]["proj"]},
                           out["embedding"], train=True, mutable=["batch_stats"])
    loss = losses.nt_xent_loss(z1=z[:B], z2=z[B:], temperature=0.5)
    return loss, {"batch_stats": {"backbone": bstate["batch_stats"], "proj": pstate["batch_stats"]}}

  loss, _ = _sgd_step(simclr_loss, variables, {"v1": _images(seed=5), "v2": _images(seed=6)}, mesh)
  assert np.isfinite(float(loss))

  ae = get_model("autoencoder", embedding_dim=EMB, width_mult=0.25, settings=((1, 8, 1, 1), (6, 8, 1, 2)))
  images = _images(hw=8, seed=7)

  def ae_loss(v, batch):
    out, new_state = ae.apply(v, batch, train=True, mutable=["batch_stats"])
    return losses.mse_loss(pred=out["reconstruction"], target=batch), new_state

  loss, _ = _sgd_step(ae_loss, _materialize(ae, images), images, mesh)
  assert np.isfinite(float(loss))

  fct = get_model("fct_mlp", old_dim=6, side_dim=4, new_dim=5, inner_dim=16)

  def fct_loss(v, batch):
    out, new_state = fct.apply(v, batch["old"], batch["side"], train=True, mutable=["batch_stats"])
    return losses.l2_transformation_loss(pred=out["embedding"], target=batch["new"]), new_state

  r = np.random.default_rng(0)
  batch = {k: jnp.asarray(r.normal(size=(B, d)), jnp.float32) for k, d in (("old", 6), ("side", 4), ("new", 5))}
  loss, _ = _sgd_step(fct_loss, _materialize(fct, batch["old"], batch["side"]), batch, mesh)
  assert np.isfinite(float(loss))
