"""The README's PyTorch figures: ml-fct's own networks imported into fct_jax (and exported back) give its outputs.

Needs PyTorch (CPU is enough) and a checkout of apple/ml-fct, whose modules are imported from ``--mlfct`` (none of
its code is in this project); neither is a dependency of fct_jax, so CI does not run this:

  pip install torch==2.13.0 && git clone https://github.com/apple/ml-fct /tmp/ml-fct
  python benchmarks/torch_parity.py --mlfct /tmp/ml-fct --out benchmarks/results/torch_parity_cpu.json

For ResNet18-128, ResNet50-128 (random weights, randomised BatchNorm statistics) and MLP_BN_SIDE_PROJECTION
(128, 128, 128, 2048): saved as ml-fct saves them (``backbone_to_torchscript`` / ``torch.jit.save``), read with
``torch_import.read_state_dict`` (NumPy only), mapped with ``to_flax``, and run in eval mode beside ml-fct in
PyTorch: max |Δ| of embeddings and logits (with the largest |output| for scale). Then the Flax variables go back
through ``from_flax`` into a fresh ml-fct module (``load_state_dict(strict=True)``), whose outputs are compared
with the original's.
"""

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_io import write_json  # noqa: E402

from fct_jax import models, torch_import  # noqa: E402


def _randomise_bn(torch, module):
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.running_mean.uniform_(-0.5, 0.5)
      m.running_var.uniform_(0.5, 1.5)
      m.weight.data.uniform_(0.5, 1.5)
      m.bias.data.uniform_(-0.2, 0.2)
  return module.eval()


def _diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mlfct", required=True, help="a checkout of github.com/apple/ml-fct")
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, args.mlfct)
  mlfct_models = __import__("models")
  net_utils = __import__("utils.net_utils", fromlist=["backbone_to_torchscript"])
  torch.manual_seed(0)
  x = torch.randn(2, 3, args.image_size, args.image_size)
  results, tmp = {}, tempfile.mkdtemp()
  for arch, name in (("ResNet18", "resnet18"), ("ResNet50", "resnet50")):
    ref = _randomise_bn(torch, mlfct_models.__dict__[arch](num_classes=10, embedding_dim=128))
    path = os.path.join(tmp, f"{arch}.pt")
    net_utils.backbone_to_torchscript(ref, path)
    t0 = time.perf_counter()
    state = torch_import.read_state_dict(path)
    read_s = time.perf_counter() - t0
    model = models.get_model(name, num_classes=10, embedding_dim=128)
    image = x.numpy().transpose(0, 2, 3, 1)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + image.shape[1:])))
    variables, _ = torch_import.to_flax(state, template, "resnet")
    out = model.apply(variables, image, train=False)
    back = _randomise_bn(torch, mlfct_models.__dict__[arch](num_classes=10, embedding_dim=128))
    back.load_state_dict({k: torch.from_numpy(v) for k, v in torch_import.from_flax(variables, "resnet").items()},
                         strict=True)
    with torch.no_grad():
      logits, feature = ref(x)
      logits_back, feature_back = back(x)
    results[f"{arch}-128"] = {
        "embedding_max_abs_diff": _diff(out["embedding"], feature[:, :, 0, 0]),
        "logits_max_abs_diff": _diff(out["logits"], logits), "embedding_max_abs": float(feature.abs().max()),
        "exported_back_max_abs_diff": max(_diff(feature_back, feature), _diff(logits_back, logits)),
        "file_mb": os.path.getsize(path) / 2**20, "read_s": read_s}
  ref = _randomise_bn(torch, mlfct_models.MLP_BN_SIDE_PROJECTION(old_embedding_dim=128, new_embedding_dim=128,
                                                                 side_info_dim=128, inner_dim=2048))
  path = os.path.join(tmp, "mlp.pt")
  torch.jit.save(torch.jit.script(ref), path)
  old, side = torch.randn(4, 128, 1, 1), torch.randn(4, 128, 1, 1)
  h = models.get_model("fct_mlp", old_dim=128, side_dim=128, new_dim=128)
  template = jax.eval_shape(lambda: h.init(jax.random.key(0), jnp.zeros((1, 128)), jnp.zeros((1, 128))))
  variables, _ = torch_import.to_flax(torch_import.read_state_dict(path), template, "fct_mlp")
  back = _randomise_bn(torch, mlfct_models.MLP_BN_SIDE_PROJECTION(old_embedding_dim=128, new_embedding_dim=128,
                                                                  side_info_dim=128, inner_dim=2048))
  back.load_state_dict({k: torch.from_numpy(v) for k, v in torch_import.from_flax(variables, "fct_mlp").items()},
                       strict=True)
  with torch.no_grad():
    want, want_back = ref(old, side), back(old, side)
  got = h.apply(variables, old.numpy()[:, :, 0, 0], side.numpy()[:, :, 0, 0])["embedding"]
  results["MLP_BN_SIDE_PROJECTION(128,128,128,2048)"] = {
      "embedding_max_abs_diff": _diff(got, want[:, :, 0, 0]), "embedding_max_abs": float(want.abs().max()),
      "exported_back_max_abs_diff": _diff(want_back, want)}
  print(f"{'network':42s} {'emb |Δ|':>10s} {'logits |Δ|':>10s} {'|emb| max':>9s} {'back |Δ|':>9s}")
  for k, r in results.items():
    print(f"{k:42s} {r['embedding_max_abs_diff']:10.2e} {r.get('logits_max_abs_diff', float('nan')):10.2e} "
          f"{r['embedding_max_abs']:9.3f} {r['exported_back_max_abs_diff']:9.2e}")
  if args.out:
    write_json(args.out, {"torch": torch.__version__, "jax": jax.__version__, "image_size": args.image_size,
                          "results": results})


if __name__ == "__main__":
  main()
