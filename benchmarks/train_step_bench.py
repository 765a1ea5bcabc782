"""ResNet-50 training-step throughput (images/s): fct_jax's Flax model, and with --torch the same network in PyTorch.

Both sides run the same step on the same synthetic batch: forward in bfloat16 (JAX: compute dtype bf16 with float32
parameters; torch: eager, ``autocast(bfloat16)``, ``channels_last``), softmax cross-entropy with label smoothing 0.1,
backward, SGD with momentum 0.875 and weight decay 3.0517578125e-5 (ml-fct's backbone recipe). BatchNorm runs in
training mode. Only the timed steps count; JAX's compile and torch's cuDNN autotuning happen in the warm-up.

Run on a GPU machine (peers side by side, one process, ratio printed and written to JSON)::

  python benchmarks/train_step_bench.py --torch --out resnet50_step.json
  python benchmarks/train_step_bench.py --batch_norm flax --profile 5   # Flax's BatchNorm; device time per kernel
  python benchmarks/train_step_bench.py --stem_conv space_to_depth      # the stem conv as a space-to-depth 4×4 conv
  python benchmarks/train_step_bench.py --xla_flags="--xla_gpu_triton_gemm_any=true"   # a compiler option (note the =)

Smoke test on a CPU::

  python benchmarks/train_step_bench.py --batch 8 --image_size 64 --steps 2 --warmup 1

Imports only jax/flax/optax/numpy and ``fct_jax.models`` (plus torch with --torch), so it runs on machines without
tensorflow, grain or ml_collections.
"""

import argparse
import os
import platform
import sys
import time

# Both frameworks share the GPU in one process: stop JAX from preallocating 75% of it so torch has room.
if "--torch" in sys.argv:
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks.bench_io import write_json  # noqa: E402

from fct_jax.models import get_model  # noqa: E402
from fct_jax.models.batch_norm import BATCH_NORMS  # noqa: E402
from fct_jax.models.resnet import STEM_CONVS  # noqa: E402

# Model fields the command line can set, and which models have them.
MODEL_OPTIONS = {"batch_norm": "ResNets, MobileNetV2", "stem_conv": "ResNets"}

# ml-fct's momentum, weight decay and label smoothing; a small fixed learning rate keeps hundreds of steps on one
# synthetic batch finite (the value does not change the work done).
LR, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.01, 0.875, 3.0517578125e-5, 0.1


def _parse():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnet50")
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--image_size", type=int, default=224)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--embedding_dim", type=int, default=0, help="0: torchvision's 2048 (the plain ResNet-50)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  p.add_argument("--steps", type=int, default=50, help="timed steps")
  p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, autotuning)")
  p.add_argument("--repeats", type=int, default=3, help="timed windows; the best is reported")
  p.add_argument("--batch_norm", default="", choices=("",) + BATCH_NORMS,
                 help="BatchNorm of the ResNets and MobileNetV2: fct or flax (default: the model's, fct)")
  p.add_argument("--stem_conv", default="", choices=("",) + STEM_CONVS,
                 help="how the ResNets compute the 7×7 stem conv (default: the model's, direct)")
  p.add_argument("--profile", type=int, default=0,
                 help="trace this many more JAX steps with jax.profiler and print the device time per op")
  p.add_argument("--xla_flags", default="",
                 help="XLA flags added to $XLA_FLAGS for this run, space-separated; write --xla_flags=\"--a=1 --b=2\"")
  p.add_argument("--torch", action="store_true", help="also time the same step in PyTorch (eager, autocast)")
  p.add_argument("--out", default="", help="write the results as JSON here")
  args = p.parse_args()
  for option, models in MODEL_OPTIONS.items():
    if getattr(args, option) and not hasattr(get_model(args.model, num_classes=args.num_classes), option):
      p.error(f"--{option} applies to the models with a {option} choice ({models}), not {args.model}")
  if args.torch and args.model != "resnet50":
    p.error(f"--torch times ResNet-50 only (its torch network is built here), not {args.model}")
  return args


# --- JAX ------------------------------------------------------------------------------------------------------------

def bench_jax(args):
  dtype = jnp.dtype(args.dtype)
  extra = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k)}
  model = get_model(args.model, num_classes=args.num_classes, embedding_dim=args.embedding_dim or None, dtype=dtype,
                    **extra)
  tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))

  @jax.jit
  def init(key):
    variables = model.init(key, jnp.zeros((2, args.image_size, args.image_size, 3), jnp.float32))
    return {"params": variables["params"], "batch_stats": variables["batch_stats"],
            "opt_state": tx.init(variables["params"])}

  def _step(state, images, labels):
    def loss_fn(params):
      out, new_vars = model.apply({"params": params, "batch_stats": state["batch_stats"]}, images, train=True,
                                  mutable=["batch_stats"])
      targets = optax.smooth_labels(jax.nn.one_hot(labels, args.num_classes), LABEL_SMOOTHING)
      return jnp.mean(optax.softmax_cross_entropy(out["logits"], targets)), new_vars["batch_stats"]
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "batch_stats": batch_stats,
            "opt_state": opt_state}, loss

  # Donating the state lets XLA update parameters and optimizer state in place, as torch does.
  step = jax.jit(_step, donate_argnums=(0,))
  state = init(jax.random.key(0))
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(state["params"]))
  k1, k2 = jax.random.split(jax.random.key(1))
  images = jax.random.normal(k1, (args.batch, args.image_size, args.image_size, 3), jnp.float32)
  labels = jax.random.randint(k2, (args.batch,), 0, args.num_classes)

  t0 = time.perf_counter()
  for _ in range(args.warmup):
    state, loss = step(state, images, labels)
  jax.block_until_ready(loss)
  warmup_s = time.perf_counter() - t0
  best = float("inf")
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, loss = step(state, images, labels)
    jax.block_until_ready((state, loss))
    best = min(best, time.perf_counter() - t0)
  if not np.isfinite(float(loss)):
    print(f"WARNING: JAX loss is {float(loss)} (timings are still valid)")
  dev = jax.devices()[0]
  profile = {}
  if args.profile:
    def steps():
      nonlocal state, loss
      for _ in range(args.profile):
        state, loss = step(state, images, labels)
      jax.block_until_ready((state, loss))
    profile = device_profile(steps, args.profile)
  return {"profile": profile, "images_per_s": args.batch * args.steps / best, "step_ms": 1e3 * best / args.steps,
          "warmup_s": warmup_s, "final_loss": float(loss), "num_params": int(num_params),
          "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "jax": jax.__version__}


def device_profile(run, steps, top=25):
  """Traces run() with jax.profiler and sums the device events per name, per line of each device plane (on an H100
  with jax 0.11 one stream line holding the cuDNN/cuBLAS kernels and XLA's fusions by name). Prints the top ones;
  returns {line: {name: ms/step}}."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  path = tempfile.mkdtemp(prefix="fct_profile_")
  with jax.profiler.trace(path):
    run()
  result = {}
  files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
  try:
    profiles = [ProfileData.from_file(f) for f in files]
  except Exception as e:  # pylint: disable=broad-except
    print(f"profile: could not read the trace in {path} ({type(e).__name__}: {e})")
    return {"error": str(e)}
  for plane in (plane for p in profiles for plane in p.planes):
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      tot = collections.Counter()
      for ev in line.events:
        tot[ev.name] += ev.duration_ns / 1e6 / steps
      if not tot:
        continue
      key = f"{plane.name} | {line.name}"
      result[key] = dict(tot.most_common())
      print(f"-- {key}: {sum(tot.values()):.2f} ms/step over {len(tot)} names; top {top}:")
      for name, ms in tot.most_common(top):
        print(f"   {ms:8.3f} ms  {name[:110]}")
  return result


# --- torch ----------------------------------------------------------------------------------------------------------

def _torch_resnet(torch, num_classes, embedding_dim, stage_sizes=(3, 4, 6, 3)):
  """The same network as fct_jax's ResNet (v1.5 bottlenecks, embedding built into layer4's last block)."""
  nn = torch.nn

  class Block(nn.Module):

    def __init__(self, cin, planes, cout, stride, relu_out=True):
      super().__init__()
      self.body = nn.Sequential(
          nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
          nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
          nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout))
      self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                    if stride != 1 or cin != cout else nn.Identity())
      self.relu_out = relu_out

    def forward(self, x):
      y = self.body(x) + self.short(x)
      return torch.relu(y) if self.relu_out else y

  layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
  cin = 64
  for i, n in enumerate(stage_sizes):
    planes = 64 * 2 ** i
    for j in range(n):
      last = i == len(stage_sizes) - 1 and j == n - 1
      cout = embedding_dim if last else 4 * planes
      layers.append(Block(cin, planes, cout, 2 if (i > 0 and j == 0) else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(embedding_dim, num_classes, bias=False)]
  return nn.Sequential(*layers)


def bench_torch(args):
  import torch  # pylint: disable=g-import-not-at-top
  if not torch.cuda.is_available():
    raise RuntimeError("--torch needs a CUDA GPU")
  torch.backends.cudnn.benchmark = True
  dev = torch.device("cuda")
  model = _torch_resnet(torch, args.num_classes, args.embedding_dim or 2048).to(dev)
  model = model.to(memory_format=torch.channels_last)
  num_params = sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  crit = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
  gen = torch.Generator(device=dev).manual_seed(1)
  images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=dev, generator=gen)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, args.num_classes, (args.batch,), device=dev, generator=gen)
  autocast_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32

  def step():
    with torch.autocast("cuda", dtype=autocast_dtype, enabled=args.dtype == "bfloat16"):
      loss = crit(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  model.train()
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    loss = step()
  torch.cuda.synchronize()
  warmup_s = time.perf_counter() - t0
  best = float("inf")
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      loss = step()
    torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t0)
  return {"images_per_s": args.batch * args.steps / best, "step_ms": 1e3 * best / args.steps,
          "warmup_s": warmup_s, "final_loss": float(loss), "num_params": int(num_params),
          "device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def main():
  args = _parse()
  if args.xla_flags:  # read when the backend starts, i.e. at the first device query below, not at `import jax`
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  result = {"config": vars(args), "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
  result["jax"] = bench_jax(args)
  j = result["jax"]
  print(f"jax   {args.model} bf16={args.dtype == 'bfloat16'} batch {args.batch} @ {args.image_size}px on "
        f"{j['device']}: {j['images_per_s']:,.0f} img/s ({j['step_ms']:.1f} ms/step, warm-up {j['warmup_s']:.1f} s, "
        f"{j['num_params']:,} params)", flush=True)
  if args.torch:
    result["torch"] = bench_torch(args)
    t = result["torch"]
    print(f"torch eager autocast channels_last on {t['device']}: {t['images_per_s']:,.0f} img/s "
          f"({t['step_ms']:.1f} ms/step, {t['num_params']:,} params)")
    if t["num_params"] != j["num_params"]:
      print(f"WARNING: parameter counts differ (jax {j['num_params']:,} vs torch {t['num_params']:,})")
    result["ratio_jax_over_torch"] = j["images_per_s"] / t["images_per_s"]
    print(f"ratio jax/torch: {result['ratio_jax_over_torch']:.2f}x")
  if args.out:
    write_json(args.out, result)


if __name__ == "__main__":
  main()
