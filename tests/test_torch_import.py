"""PyTorch checkpoints into fct_jax (fct_jax/torch_import.py): the reader, the name/layout mapping, the stage import.

The fixtures in tests/data were written by PyTorch (tests/data/make_torch_fixtures.py; PyTorch is not needed here):
tiny networks with ml-fct's structure and names and their eval-mode outputs, which the imported Flax models must
reproduce.
"""

import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common as cfg_common
from configs import demo
from fct_jax import artifacts, checkpoint, experiment, models, torch_import, torch_stages
from fct_jax.errors import FCTError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
IO = dict(np.load(os.path.join(DATA, "torch_fixtures_io.npz")))
IMAGE = IO["image"].transpose(0, 2, 3, 1)  # NCHW → NHWC
R18 = dict(num_classes=4, embedding_dim=8, width=2)
R50 = dict(num_classes=20, embedding_dim=8, width=2, stage_sizes=(2, 2, 2, 1), classifier_bias=True)
SIDE = dict(num_classes=0, embedding_dim=4, width=2)
MLP = dict(old_dim=8, side_dim=4, new_dim=8, inner_dim=16)


def _state(name):
  return torch_import.read_state_dict(os.path.join(DATA, name))


def _template(module, *inputs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))


def _resnet(name, kw, state, **to_flax_kw):
  model = models.get_model(name, **kw)
  variables, unused = torch_import.to_flax(state, _template(model, IMAGE[:1]), "resnet", **to_flax_kw)
  return model, variables, unused


# ------------------------------------------------------------------------------------------- the reader


def test_reader_reads_each_format():
  r18, r50, side, mlp = (_state(f) for f in ("torch_resnet18_tiny.pt", "torch_resnet50_tiny.pth",
                                              "torch_side_tiny.npz", "torch_fct_mlp_tiny.pt"))
  # TorchScript of ml-fct's FeatureExtractor-style wrapper: the ResNet's tensors under "model."
  assert r18["model.conv1.weight"].shape == (2, 3, 7, 7) and r18["model.fc.weight"].shape == (4, 8, 1, 1)
  assert r18["model.bn1.num_batches_tracked"].dtype == np.int64
  assert all(k.startswith("model.") for k in r18)
  # torch.save of a state dict; torchvision's Linear classifier
  assert r50["fc.weight"].shape == (20, 8) and r50["fc.bias"].shape == (20,)
  assert r50["layer4.0.downsample.0.weight"].shape == (8, 32, 1, 1)
  assert side["model.layer4.1.conv2.weight"].shape == (4, 4, 3, 3)
  assert mlp["mixer.2.conv.bias"].shape == (8,) and "mixer.2.normalizer.weight" not in mlp
  for state in (r18, r50, mlp):
    assert all(np.all(np.isfinite(v)) for v in state.values())


def test_reader_parameters_half_precisions_strided_and_nested():
  """torch.save of a Parameter, float16 and bfloat16 tensors, a transpose (strided view) in a nested dict, and a
  plain number (dropped)."""
  got = _state("torch_misc.pt")
  six = np.arange(6.0, dtype=np.float32).reshape(2, 3)
  assert sorted(got) == ["bf16", "half", "nested.t", "w"]
  np.testing.assert_array_equal(got["w"], six)
  np.testing.assert_array_equal(got["nested.t"], six.T)
  assert got["half"].dtype == np.float16 and got["half"].tolist() == [0, 1, 2, 3]
  assert got["bf16"].dtype == jnp.bfloat16 and got["bf16"].astype(np.float32).tolist() == [0, 1, 2]


def test_reader_refuses_code_in_a_pickle(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.system, ("echo pwned",))

  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("evil/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
  with pytest.raises(FCTError, match=r"cannot read checkpoint .*unsupported object (posix|nt)\.system"):
    torch_import.read_state_dict(str(path))


@pytest.mark.parametrize("content, match", [(b"not a zip", "not a zip archive"), (None, "not found")])
def test_reader_bad_files(tmp_path, content, match):
  path = tmp_path / "model.pt"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(FCTError, match=match):
    torch_import.read_state_dict(str(path))


def _unicode(text: str) -> bytes:
  return b"X" + len(text).to_bytes(4, "little") + text.encode()


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def test_reader_big_endian_and_strided_tensors(tmp_path):
  """A storage written big-endian, and a tensor that is a strided view into it (offset 2, a transpose's strides):
  the pickle torch writes for {"t": tensor}, spelled out opcode by opcode."""
  body = b"".join([
      b"\x80\x02}", _unicode("t"), _global("torch._utils", "_rebuild_tensor_v2"), b"(",
      b"(", _unicode("storage"), _global("torch", "FloatStorage"), _unicode("0"), _unicode("cpu"), b"K\x0ct",
      b"Q",  # BINPERSID: the storage tuple above
      b"K\x02", b"K\x03K\x02\x86", b"K\x01K\x03\x86", b"\x89}",  # offset, size (3, 2), stride (1, 3), False, {}
      b"tRs."])
  path = tmp_path / "be.pt"
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("be/data.pkl", body)
    z.writestr("be/byteorder", "big")
    z.writestr("be/data/0", np.arange(12, dtype=">f4").tobytes())
  got = torch_import.read_state_dict(str(path))["t"]
  want = np.asarray([[2 + i + 3 * j for j in range(2)] for i in range(3)], np.float32)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)
  # The same tensor at offset 7 would end at index 7 + 2·1 + 1·3 = 12, one past its 12-value storage: refused,
  # not read from whatever memory follows.
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("be/data.pkl", body.replace(b"K\x02K\x03K\x02\x86", b"K\x07K\x03K\x02\x86"))
    z.writestr("be/data/0", np.arange(12, dtype="<f4").tobytes())
  with pytest.raises(FCTError, match=r"a tensor of shape \(3, 2\) reaches outside its storage of 12 values"):
    torch_import.read_state_dict(str(path))


# ------------------------------------------------------------------------------- the mapping: same outputs


def test_resnet18_from_mlfct_torchscript_gives_torchs_outputs():
  model, variables, unused = _resnet("resnet18", R18, _state("torch_resnet18_tiny.pt"))
  assert unused == []
  out = model.apply(variables, IMAGE, train=False)
  np.testing.assert_allclose(out["embedding"], IO["resnet18_feature"][:, :, 0, 0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["logits"], IO["resnet18_logits"], atol=1e-5, rtol=1e-5)


def test_resnet50_from_torch_state_dict_gives_torchs_outputs():
  """Bottleneck blocks, a single-block layer4 and torchvision's Linear classifier with bias."""
  model, variables, _ = _resnet("resnet50", R50, _state("torch_resnet50_tiny.pth"))
  out = model.apply(variables, IMAGE, train=False)
  np.testing.assert_allclose(out["embedding"], IO["resnet50_feature"][:, :, 0, 0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out["logits"], IO["resnet50_logits"], atol=1e-5, rtol=1e-5)
  # Same variables with the space-to-depth stem: it reads the same 7×7 kernel
  s2d = models.get_model("resnet50", stem_conv="space_to_depth", **R50)
  np.testing.assert_allclose(s2d.apply(variables, IMAGE, train=False)["logits"], IO["resnet50_logits"],
                             atol=1e-5, rtol=1e-5)


def test_fct_mlp_from_mlfct_torchscript_gives_torchs_outputs():
  h = models.get_model("fct_mlp", **MLP)
  old, side = IO["old"][:, :, 0, 0], IO["side"][:, :, 0, 0]
  variables, unused = torch_import.to_flax(_state("torch_fct_mlp_tiny.pt"), _template(h, old, side), "fct_mlp")
  assert unused == []
  np.testing.assert_allclose(h.apply(variables, old, side)["embedding"], IO["fct_mlp_out"][:, :, 0, 0],
                             atol=1e-5, rtol=1e-5)


def test_mapping_errors_name_the_tensor():
  r18 = _state("torch_resnet18_tiny.pt")
  with pytest.raises(FCTError, match=r"model.layer4.1.bn1.running_mean has shape \(8,\).*batch_stats/layer4_1/bn1/"
                                     r"mean needs \(12,\)"):
    _resnet("resnet18", dict(R18, embedding_dim=12), r18)
  with pytest.raises(FCTError, match=r"no model.fc.bias"):
    _resnet("resnet18", dict(R18, classifier_bias=True), r18)
  with pytest.raises(FCTError, match=r"2 tensor\(s\) of the checkpoint have no place.*model.extra.weight"):
    _resnet("resnet18", R18, {**r18, "model.extra.weight": np.zeros(3), "model.extra.bias": np.zeros(3)})
  _, _, unused = _resnet("resnet18", R18, {**r18, "model.extra.weight": np.zeros(3)}, allow_unused=True)
  assert unused == ["model.extra.weight"]
  with pytest.raises(FCTError, match="holds no fct_mlp model"):
    torch_import.to_flax(r18, {}, "fct_mlp")


def test_prefix_choice_when_a_file_holds_two_models():
  r18 = _state("torch_resnet18_tiny.pt")
  two = {**{"old_model." + k: v for k, v in r18.items()},
         **{"side_model." + k: np.zeros_like(v) for k, v in r18.items()}}
  with pytest.raises(FCTError, match=r"holds 2 resnet models \(prefixes 'old_model.model.', "
                                     r"'side_model.model.'\); choose one with --import_prefix"):
    _resnet("resnet18", R18, two)
  with pytest.raises(FCTError, match="no nope.layer1.0.conv1.weight"):
    _resnet("resnet18", R18, two, prefix="nope")
  model, variables, _ = _resnet("resnet18", R18, two, prefix="old_model.model")
  np.testing.assert_allclose(model.apply(variables, IMAGE)["logits"], IO["resnet18_logits"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------- stage import


def _experiment(stage=""):
  """The demo's runlocal data with the fixtures' architectures: every model stage can be imported."""
  data = ml_collections.ConfigDict({"name": "shapes", "num_old_train": 64, "num_new_train": 64, "num_eval": 40,
                                    "image_size": 16, "num_old_shapes": 3, "seed": 0})
  tr = cfg_common.train(batch_size=16, epochs=1, steps=2, optimizer_cfg=cfg_common.optimizer("sgd", 0.1))
  resnet = lambda name, kw: ml_collections.ConfigDict({"name": name, **{k: v for k, v in kw.items()
                                                                       if k != "num_classes"}})
  stages = [
      cfg_common.backbone_stage("old", data=data, split="old_train", model=resnet("resnet18", R18), train_cfg=tr,
                                seed=1),
      cfg_common.side_info_stage("side_info", data=data, split="old_train", model=resnet("resnet18", SIDE),
                                 train_cfg=tr, seed=4, projection_hidden_dim=8, projection_dim=4),
      cfg_common.backbone_stage("new", data=data, split="new_train", model=resnet("resnet50", R50), train_cfg=tr,
                                seed=2),
      cfg_common.transformation_stage("transformation", data=data, split="new_train", train_cfg=tr, seed=3,
                                      model=ml_collections.ConfigDict({"name": "fct_mlp", "inner_dim": 16}),
                                      side_info_kind="simclr", side_info_dim=4, side_info_stage="side_info"),
      cfg_common.evaluation_stage("eval", data=data, split="eval", eval_batch_size=40),
  ]
  return cfg_common.experiment("torch_import", stages, stage)


FILES = {"old": "torch_resnet18_tiny.pt", "side_info": "torch_side_tiny.npz", "new": "torch_resnet50_tiny.pth",
         "transformation": "torch_fct_mlp_tiny.pt"}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """Every model stage imported, then the plan run: only the evaluation trains or computes anything."""
  wd = str(tmp_path_factory.mktemp("imported"))
  records = {s: torch_stages.import_stage(_experiment(s), wd, os.path.join(DATA, f)) for s, f in FILES.items()}
  ran = experiment.run(_experiment(), wd)
  return wd, records, ran


def test_imported_stages_are_read_like_trained_ones(imported):
  wd, records, ran = imported
  assert ran == ["eval"]  # every imported stage was skipped as finished
  assert records["old"]["prefix"] == "model." and records["new"]["prefix"] == ""
  assert records["side_info"]["unused"] == ["model.fc.weight"]  # ψ has no classifier: left out, and said so
  saved = checkpoint.read_json(os.path.join(wd, "old", checkpoint.IMPORTED))
  assert saved["sha256"] == records["old"]["sha256"] and len(saved["sha256"]) == 64
  # The saved models are the torch networks: the old stage's embedding of the fixture's images is torch's
  ctx = artifacts.Context(workdir=wd)
  module, variables, _ = artifacts.load_backbone(ctx, "old", "test")
  np.testing.assert_allclose(module.apply(variables, IMAGE)["embedding"], IO["resnet18_feature"][:, :, 0, 0],
                             atol=1e-5, rtol=1e-5)
  psi = artifacts.load_side_info(ctx, "side_info", "test")
  np.testing.assert_allclose(psi.apply(psi.variables, jnp.asarray(IMAGE)), IO["side_feature"][:, :, 0, 0],
                             atol=1e-5, rtol=1e-5)
  transform, _, _ = artifacts.load_h(ctx, "transformation", "test")
  np.testing.assert_allclose(transform(IO["old"][:, :, 0, 0], IO["side"][:, :, 0, 0]), IO["fct_mlp_out"][:, :, 0, 0],
                             atol=1e-5, rtol=1e-5)
  results = checkpoint.read_json(os.path.join(wd, "eval", "results.json"))
  assert {"old/old", "new/new", "new/h", "h/h"} <= set(results["cases"])
  plan = experiment.dry_run(_experiment(), wd)
  assert plan[0]["state"].startswith("finished: imported from ") and plan[-1]["state"] == "finished (skipped)"


@pytest.mark.parametrize("stage, linear", [("old", False), ("side_info", False), ("new", True),
                                           ("transformation", False)])
def test_export_gives_back_the_torch_state_dict(imported, tmp_path, stage, linear):
  """Exported stages are the tensors PyTorch wrote, bit for bit (ψ without its classifier), in PyTorch's names."""
  wd, _, _ = imported
  out = tmp_path / f"{stage}.npz"
  n = torch_stages.export_stage(_experiment(stage), wd, str(out), linear_as_conv=not linear)
  got = dict(np.load(out))
  want = {k.removeprefix("model."): v for k, v in _state(FILES[stage]).items()}
  if stage == "side_info":
    want = {k: v for k, v in want.items() if not k.startswith("fc.")}
  assert n == len(got) and sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  with pytest.raises(FCTError, match="exists; choose another path"):
    torch_stages.export_stage(_experiment(stage), wd, str(out))


def test_export_refusals(imported, tmp_path):
  wd, _, _ = imported
  with pytest.raises(FCTError, match="is not finished"):
    torch_stages.export_stage(_experiment("old"), str(tmp_path), str(tmp_path / "a.npz"))
  with pytest.raises(FCTError, match="export to a .npz file"):
    torch_stages.export_stage(_experiment("old"), wd, str(tmp_path / "a.pt"))
  with pytest.raises(FCTError, match="has no weights to import or export"):
    torch_stages.export_stage(_experiment("eval"), wd, str(tmp_path / "a.npz"))
  with pytest.raises(FCTError, match="only ResNets have a PyTorch counterpart here, and its model is SmallCNN"):
    torch_stages.stage_model("old", demo.get_config("runlocal").stages.old)  # checked before any file is read
  assert not list(tmp_path.iterdir())


def test_import_refuses_without_writing(imported, tmp_path):
  wd, _, _ = imported
  with pytest.raises(FCTError, match="stage 'old' in .* is finished already"):
    torch_stages.import_stage(_experiment("old"), wd, os.path.join(DATA, FILES["old"]))
  with pytest.raises(FCTError, match="an import fills one stage"):
    torch_stages.import_stage(_experiment(), str(tmp_path / "a"), os.path.join(DATA, FILES["old"]))
  with pytest.raises(FCTError, match="needs stage 'old'"):  # h's widths come from its upstream stages
    torch_stages.import_stage(_experiment("transformation"), str(tmp_path / "b"),
                            os.path.join(DATA, FILES["transformation"]))
  with pytest.raises(FCTError, match="has no weights to import"):
    torch_stages.import_stage(_experiment("eval"), str(tmp_path / "c"), os.path.join(DATA, FILES["old"]))
  with pytest.raises(FCTError, match=r"model.layer4.1.bn1.running_mean has shape \(4,\)"):  # ψ's file, old stage
    torch_stages.import_stage(_experiment("old"), str(tmp_path / "d"), os.path.join(DATA, FILES["side_info"]))
  assert not any((tmp_path / d).exists() for d in "abcd")  # nothing written by a refused import


def test_wider_classifier_gives_its_first_rows(tmp_path):
  """ml-fct's old models have one logit per new class; the old stage keeps the rows of its own (first) classes."""
  r18 = _state(FILES["old"])
  wide = dict(r18, **{"model.fc.weight": np.concatenate([r18["model.fc.weight"], np.ones((3, 8, 1, 1), np.float32)])})
  np.savez(tmp_path / "wide.npz", **wide)
  record = torch_stages.import_stage(_experiment("old"), str(tmp_path / "wd"), str(tmp_path / "wide.npz"))
  assert record["note"] == "classifier: the first 4 of the checkpoint's 7 classes"
  module, variables, _ = artifacts.load_backbone(artifacts.Context(workdir=str(tmp_path / "wd")), "old", "test")
  np.testing.assert_allclose(module.apply(variables, IMAGE)["logits"], IO["resnet18_logits"], atol=1e-5, rtol=1e-5)
  narrow = dict(r18, **{"model.fc.weight": r18["model.fc.weight"][:3]})
  np.savez(tmp_path / "narrow.npz", **narrow)
  with pytest.raises(FCTError, match=r"model.fc.weight has shape \(3, 8, 1, 1\).*needs \(8, 4\)"):
    torch_stages.import_stage(_experiment("old"), str(tmp_path / "wd2"), str(tmp_path / "narrow.npz"))


def test_cli_imports_a_stage(tmp_path):
  config = tmp_path / "cfg.py"
  config.write_text(f"import sys\nsys.path.insert(0, {os.path.join(REPO, 'tests')!r})\n"
                    "from test_torch_import import _experiment\n\n"
                    "def get_config(arg=None):\n  return _experiment(arg.split('=')[1] if arg else '')\n")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "fct_jax.main", f"--workdir={tmp_path / 'wd'}", *a],
                                  cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  p = run(f"--config={config}:stage=new", f"--import_torch={os.path.join(DATA, FILES['old'])}")
  assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
  assert "error: the checkpoint has no model.layer1.0.bn3.running_mean" in p.stderr  # a ResNet18 is no ResNet50
  assert not (tmp_path / "wd").exists()
  p = run(f"--config={config}:stage=old", "--import_prefix=model.")
  assert p.returncode == 2
  assert p.stderr.strip() == "error: --import_prefix and --import_allow_unused go with --import_torch"
  p = run(f"--config={config}:stage=new", f"--import_torch={os.path.join(DATA, FILES['new'])}")
  assert p.returncode == 0, p.stderr
  every = [k for k in _state(FILES["new"]) if not k.endswith("num_batches_tracked")]
  assert f"imported {len(every)} tensors (prefix '') from" in p.stdout  # all of them
  assert checkpoint.is_done(str(tmp_path / "wd" / "new"))
  p = run(f"--config={config}:stage=new", f"--export_torch={tmp_path / 'new.npz'}", "--export_torch_linear")
  assert p.returncode == 0 and f"wrote {len(_state(FILES['new']))} tensors to" in p.stdout, p.stderr
  assert np.load(tmp_path / "new.npz")["fc.weight"].shape == (20, 8)
  p = run(f"--config={config}:stage=new", f"--export_torch={tmp_path / 'b.npz'}", "--import_torch=x.pt")
  assert p.returncode == 2 and p.stderr.strip() == "error: --import_torch and --export_torch do not go together"
