"""Cached vs online feature mode of the transformation stage: epoch cost and final compatibility, one run.

Takes a finished demo workdir (``python -m fct_jax.main --config=configs/demo.py --workdir=W``), trains the same
transformation stage (``--stage``, default ``transformation``: h with SimCLR ψ) again in both modes with the same
recipe and augmentation — ``online`` (ml-fct: old, side and new models run on augmented images every step) and
``cached`` (K augmented views per image embedded once) — and reports, side by side:

* seconds per training step at steady state (first logged interval excluded: compilation) and per epoch, so the
  per-epoch cost ratio online / cached (both modes take the same steps per epoch), and the one-off caching pass;
* the compiled FLOPs of one step's work (XLA's cost analysis): the frozen models' forward on a batch of images
  (online only) and h's forward + backward (both), whose ratio bounds what caching can save when both run at the
  same efficiency;
* new/h CMC top-1, top-5 and mAP on the eval split for both.

  python benchmarks/transformation_cached.py --workdir=/tmp/fct_demo --out=benchmarks/results/transformation_cached.json

The two extra stage directories (``<stage>_bench_online``, ``<stage>_bench_cached``) are written into the workdir.

``--paper-scale`` (no workdir): the cost side of the same comparison at the paper's ImageNet scale, with random
weights (timing only; compatibility is the demo's). The models are the ImageNet plan's (``configs/imagenet.py``:
φ_old, φ_new = ResNet50-128, ψ = the SimCLR side_info stage's ResNet50-128 encoder, h = fct_mlp inner 2048, Adam,
augmentation ``inception_crop_flip`` at 224²), built through the project's model registry, randomly initialised and
saved as finished ``old`` / ``side_info`` / ``new`` stages in a scratch workdir whose data is a registered synthetic
source (random uint8 images at the input size: no JPEG decode, which would only add to the online side). Then:

1. the real ``transformation.run`` trains the plan's ``transformation`` stage config in both feature modes at a
   small batch (``load_frozen`` from the stage dirs, ``make_loss``, ``train_lib.train``; online: the example path,
   one jitted step per call; cached: the caching pass ``train_lib.predict`` over K views, then the device-resident
   arrays path, ``steps_per_call`` steps per call); steady seconds per step from each stage's metrics log;
2. the same jitted functions (``train_lib.make_train_step`` of each stage's captured task, inside
   ``make_multi_step`` / ``gather_rows`` for cached, with the loop's shardings), plus the frozen forward the
   caching pass runs and a cached call at the plan's batch (1024, on random feature rows), are timed back to back
   in rounds, so that each round's ratio sees the same load on a shared machine (the headline ratio: the median).

Reported: seconds per step, images/s, the per-epoch (= per-image) cost ratio, XLA cost-analysis FLOPs of each
step, the caching cost per image and view, the break-even epoch count of K cached views and the speed-up over the
plan's whole schedule (80 epochs, caching pass included).

  python benchmarks/transformation_cached.py --paper-scale --out=benchmarks/results/transformation_cached_paper_scale_cpu.json

``--runlocal`` swaps in the plan's tiny runlocal models at 32² (exercises the mode in about a minute on a CPU).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.bench_io import write_json  # noqa: E402

from configs import imagenet  # noqa: E402
from fct_jax import artifacts, checkpoint, optim, sharding, train_lib, train_steps  # noqa: E402
from fct_jax.gallery import cost  # noqa: E402
from fct_jax.data import pipeline, sources  # noqa: E402
from fct_jax.retrieval import cases as cases_lib  # noqa: E402
from fct_jax.stages import common, transformation  # noqa: E402


def steady_seconds_per_step(stage_dir):
  """Seconds per step between the second and the last logged point (the first interval holds compilation)."""
  recs = [json.loads(l) for l in open(os.path.join(stage_dir, "metrics.jsonl"))]
  recs = [r for r in recs if "steps_per_sec" in r]
  a, b = recs[1], recs[-1]
  ta, tb = a["step"] / a["steps_per_sec"], b["step"] / b["steps_per_sec"]  # the loop's clock since its start
  return (tb - ta) / (b["step"] - a["step"])


def step_flops(cfg, ctx):
  """(frozen models' forward, h's forward + backward) FLOPs on one training batch, from XLA's cost analysis."""
  frozen = transformation.load_frozen(cfg, ctx)
  h = artifacts.build_h(cfg, frozen.dims["old"], frozen.dims["new"])
  source, _ = sources.get_source(cfg.data, cfg.split)
  b = int(cfg.train.batch_size)
  images = jax.ShapeDtypeStruct((b,) + np.shape(source[0]["image"]), jnp.float32)
  vec = lambda d: jax.ShapeDtypeStruct((b, d), jnp.float32)
  old, psi, new = vec(frozen.dims["old"]), vec(int(cfg.side_info.dim)), vec(frozen.dims["new"])
  variables = jax.eval_shape(lambda: h.init({"params": jax.random.key(0)}, jnp.zeros(old.shape),
                                            jnp.zeros(psi.shape), train=False))

  def h_grads(v, old, psi, new):
    def loss(p):
      out, _ = h.apply({**v, "params": p}, old, psi, train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.sum(jnp.square(out["embedding"] - new), -1))
    return jax.grad(loss)(v["params"])

  return cost.xla_flops(frozen.apply, frozen.variables, images), cost.xla_flops(h_grads, variables, old, psi, new)


# ------------------------------------------------------------------------------------------------ paper scale

SYNTHETIC = "fct_bench_synthetic"


def _synthetic_source(cfg, split):
  """Random uint8 images [N, S, S, 3] (timing only); ``old_train`` has ``old_classes`` classes, others
  ``num_classes`` (only the backbones' classifier widths depend on it)."""
  n, size = int(cfg.num_images), int(cfg.image_size)
  k = int(cfg.old_classes) if split == "old_train" else int(cfg.num_classes)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return (sources.ArraySource({"image": images, "label": (np.arange(n) % k).astype(np.int32)}),
          sources.SplitInfo(n, k, size))


def _random_stage(workdir, scfg, module, image_size, seed):
  """Saves ``module`` with random (initialiser) weights as the finished stage ``scfg.name``."""
  d = os.path.join(workdir, scfg.name)
  os.makedirs(d, exist_ok=True)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(lambda r: module.init({"params": r}, x, train=False))(train_lib.prng_key(seed))
  checkpoint.write_json(os.path.join(d, "config.json"), scfg.to_dict())
  checkpoint.save_model(d, variables)
  checkpoint.mark_done(d)
  return sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(variables["params"]))


def _paper_workdir(workdir, args):
  """The ImageNet plan's old, side_info (SimCLR) and new stages with random weights, on the synthetic data;
  returns ``(transformation stage config, {stage: parameter count})``."""
  plan = imagenet.get_config("runlocal" if args.runlocal else "")
  size = 32 if args.runlocal else 224
  data = ml_collections.ConfigDict({"name": SYNTHETIC, "num_images": args.num_images, "image_size": size,
                                    "old_classes": 500, "num_classes": 1000})
  stages = {k: ml_collections.ConfigDict(dict(v, data=data.to_dict())) for k, v in plan.stages.to_dict().items()}
  params = {}
  for name, seed in (("old", 1), ("side_info", 4), ("new", 2)):
    scfg = stages[name]
    if scfg.kind == "backbone":
      module = artifacts.build_backbone(scfg, sources.get_source(scfg.data, scfg.split)[1].num_classes)
    else:
      module = artifacts.build_side_model(scfg)
    t0 = time.perf_counter()
    params[name] = _random_stage(workdir, scfg, module, size, seed)
    print(f"[paper-scale] random {scfg.model.name} stage {name!r} ({params[name] / 1e6:.2f} M params) in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
  return stages["transformation"], params


@contextlib.contextmanager
def _capture_tasks(into):
  """Records the :class:`train_lib.Task` each ``transformation.run`` hands to the training loop (then runs it)."""
  orig = common.train_and_save

  def spy(cfg, stage_dir, ctx, task, source):
    into[cfg.name] = (task, len(source))
    return orig(cfg, stage_dir, ctx, task, source)

  common.train_and_save = spy
  try:
    yield
  finally:
    common.train_and_save = orig


def _real_step(cfg, task, num_examples, batch):
  """``(train_step, init_state, impl)``: the training loop's own step (``train_lib.make_train_step``: loss,
  backward, optimizer update) for ``task`` with ``cfg``'s optimizer and schedule, and its state initialiser
  (``train_lib.make_state_init``) on a batch shaped like ``batch``, as ``train_lib.train`` builds them."""
  steps_per_epoch, total = train_lib.resolve_steps(cfg.train, num_examples)
  tx, _ = optim.make_optimizer(cfg.train.optimizer, total, steps_per_epoch)
  impl = cfg.get("prng_impl", "rbg")
  step = train_lib.make_train_step(task, tx, int(cfg.seed), impl)
  init_state = train_lib.make_state_init(task, tx, batch)
  repl = sharding.replicated(sharding.make_mesh())
  return step, lambda: jax.jit(init_state, out_shardings=repl)(train_lib.prng_key(int(cfg.seed) + 7, impl)), impl


def _flops(lowered):
  """FLOPs from XLA's cost analysis of the lowered (unoptimised) HLO, as the paper-scale results record them
  (`cost.xla_flops`, used for the demo-workdir mode, counts the compiled HLO)."""
  return cost.flops_of(lowered.cost_analysis())


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _step_times(stage_dir, steps_per_interval):
  """Seconds per step of every logged interval after the first (which holds compilation), from the stage's
  metrics log (the loop's ``steps_per_sec`` is the rate since its start)."""
  recs = [json.loads(l) for l in open(os.path.join(stage_dir, "metrics.jsonl"))]
  t = [r["step"] / r["steps_per_sec"] for r in recs if "steps_per_sec" in r]
  return [float(x) / steps_per_interval for x in np.diff(t)]


def _timing(times, batch):
  med = float(np.median(times))
  return {"seconds_per_step": med, "seconds_per_step_all": times, "images_per_second": batch / med,
          "seconds_per_image": med / batch}


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def _interleaved(cfgs, tasks, base, ctx, b, views, per_call, paper_batch, paper_per_call, rounds):
  """Rounds of, back to back: one online step, the frozen forward on one batch (what the caching pass computes per
  batch of views), one cached call of ``per_call`` steps, and (``paper_batch`` > 0) one cached call at that batch.

  The jitted functions are the ones ``train_lib.train`` runs: ``make_train_step`` of each stage's captured task
  (online: the example path's step, one per call; cached: inside ``make_multi_step`` with ``gather_rows`` over
  the device-resident rows from ``shard_rows``). Only the driver is ours (no host pipeline: the online batch is
  random augmented-image-shaped data). A shared machine's load drifts over minutes; ratios taken within a round
  see the same load. Also returns each step's XLA FLOPs.
  """
  mesh = sharding.make_mesh()
  repl, data_sh = sharding.replicated(mesh), sharding.data_sharded(mesh)  # the loop's shardings
  on_task, on_n = tasks["transformation_bench_online"]
  ca_task, ca_n = tasks["transformation_bench_cached"]
  size = int(sources.get_source(base.data, base.split)[1].image_size)
  rng = np.random.default_rng(1)
  images = {"image": jax.device_put(rng.normal(size=(b, size, size, 3)).astype(np.float32), data_sh)}
  on_step, on_init, _ = _real_step(cfgs["online"], on_task, on_n, _abstract(images))
  frozen_vars = jax.device_put(on_task.frozen, repl)
  online = jax.jit(on_step, in_shardings=(repl, repl, data_sh), out_shardings=(repl, repl), donate_argnums=(0,))
  fwd_model = transformation.load_frozen(base, ctx)  # what the caching pass runs, batch after batch
  forward = jax.jit(fwd_model.apply, in_shardings=(repl, data_sh), out_shardings=repl)  # as train_lib.predict

  def cached_setup(batch, rows_task):
    vec = {k: jax.ShapeDtypeStruct((batch,) + np.shape(v)[1:], jnp.float32) for k, v in rows_task.arrays.items()}
    step, init, _ = _real_step(cfgs["cached"], rows_task, ca_n, vec)
    arrays = train_steps.shard_rows(rows_task.arrays, mesh)
    call = jax.jit(train_steps.make_multi_step(step, train_steps.gather_rows(mesh)),
                   in_shardings=(repl, None, jax.tree.map(lambda _: data_sh, arrays), repl, repl),
                   out_shardings=(repl, repl), donate_argnums=(0,))
    return step, init, call, arrays, vec

  ca_step, ca_init, cached, ca_arrays, ca_vec = cached_setup(b, ca_task)
  flops = {"online_step": _flops(jax.jit(on_step).lower(jax.eval_shape(on_init), _abstract(on_task.frozen),
                                                          _abstract(images))),
           "frozen_forward_batch": _flops(forward.lower(_abstract(fwd_model.variables), _abstract(images["image"]))),
           "cached_step": _flops(jax.jit(ca_step).lower(jax.eval_shape(ca_init), None, ca_vec))}
  n_b = jax.device_put(np.asarray(per_call, np.int32), repl)
  idx_b = jax.device_put(np.asarray(ca_task.indices(0, per_call), np.int32), repl)
  work = [("online_step", online, b, 1), ("frozen_forward", forward, b, 1), ("cached_step", cached, b, per_call)]
  states = {"online_step": on_init(), "cached_step": ca_init()}
  args = {"online_step": lambda st: (st, frozen_vars, images),
          "frozen_forward": lambda st: (frozen_vars, images["image"]),  # the same (device-resident) variables
          "cached_step": lambda st: (st, None, ca_arrays, idx_b, n_b)}
  if paper_batch > 0:
    rows = views * paper_batch
    feats = {k: rng.normal(size=(rows,) + np.shape(v)[1:]).astype(np.float32) for k, v in ca_task.arrays.items()}
    big_task = dataclasses.replace(ca_task, arrays=feats,
                                   indices=pipeline.row_indices(rows, batch_size=paper_batch, seed=0))
    big_step, big_init, big_call, big_arrays, big_vec = cached_setup(paper_batch, big_task)
    flops["cached_step_paper_batch"] = _flops(jax.jit(big_step).lower(jax.eval_shape(big_init), None, big_vec))
    idx_p = jax.device_put(np.asarray(big_task.indices(0, paper_per_call), np.int32), repl)
    n_p = jax.device_put(np.asarray(paper_per_call, np.int32), repl)
    work.append(("cached_step_paper_batch", big_call, paper_batch, paper_per_call))
    states["cached_step_paper_batch"] = big_init()
    args["cached_step_paper_batch"] = lambda st: (st, None, big_arrays, idx_p, n_p)
  compile_s, times = {}, {name: [] for name, *_ in work}
  for r in range(rounds + 1):  # round 0 compiles and warms up
    for name, fn, _, steps in work:
      out, dt = _timed(fn, *args[name](states.get(name)))
      if name in states:
        states[name] = out[0]
      if r == 0:
        compile_s[name] = dt
      else:
        times[name].append(dt / steps)
    if r:
      print(f"[paper-scale] round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()),
            flush=True)
  res = {name: dict(_timing(times[name], batch), batch_size=batch, steps_per_call=steps,
                    first_call_seconds=compile_s[name])
         for name, _, batch, steps in work}
  for name in res:
    res[name]["flops"] = flops[name if name != "frozen_forward" else "frozen_forward_batch"]
  res["per_round_ratio_online_over_cached"] = [o / c for o, c in zip(times["online_step"], times["cached_step"])]
  if paper_batch > 0:
    res["per_round_ratio_online_over_cached_paper_batch"] = [
        (o / b) / (c / paper_batch) for o, c in zip(times["online_step"], times["cached_step_paper_batch"])]
  return res


def paper_scale(args):
  """Cached vs online epoch cost of the ImageNet transformation stage, random weights, one process."""
  if SYNTHETIC not in sources.DATASETS:
    sources.DATASETS[SYNTHETIC] = _synthetic_source
  b, K, P = int(args.batch), int(args.cache_views), int(args.steps_per_call)
  if args.num_images < b:
    raise SystemExit(f"--num-images ({args.num_images}) must be at least --batch ({b})")
  own = not args.workdir
  wd = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fct_paper_scale_"))
  ctx = artifacts.Context(workdir=wd)
  load0 = os.getloadavg()
  t_all = time.perf_counter()
  try:
    base, params = _paper_workdir(wd, args)
    out = {"mode": "paper_scale" + ("_runlocal" if args.runlocal else ""), "random_weights": True,
           "command": " ".join(["python"] + [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
           "config": "configs/imagenet.py" + (":runlocal" if args.runlocal else ""),
           "models": {"old": base.old, "side_info": base.side_info.to_dict(), "new": base.new,
                      "h": base.model.to_dict()},
           "augment": base.augment, "batch_size": b, "cache_views": K, "num_images": int(args.num_images),
           "params": params, "flops_method": "XLA cost analysis of the lowered (unoptimised) HLO"}
    # 1. Both feature modes through the real stage and training loop.
    tasks, cfgs, loop = {}, {}, {}
    modes = {
        "online": dict(steps=1 + int(args.online_steps), log_every_steps=1, steps_per_call=0),
        "cached": dict(steps=P * (1 + int(args.cached_calls)), log_every_steps=P, steps_per_call=P),
    }
    for mode, tr in modes.items():
      name = f"transformation_bench_{mode}"
      d = os.path.join(wd, name)
      shutil.rmtree(d, ignore_errors=True)
      os.makedirs(d)
      train = dict(base.train.to_dict(), batch_size=b, checkpoint_every_steps=0, eval_every_steps=0, **tr)
      cfg = cfgs[mode] = ml_collections.ConfigDict(dict(base.to_dict(), name=name, feature_mode=mode, train=train,
                                                        cache_views=K, eval_batch_size=b))
      checkpoint.write_json(os.path.join(d, "config.json"), cfg.to_dict())
      t0 = time.perf_counter()
      with _capture_tasks(tasks):
        assert transformation.run(cfg, d, ctx)
      total = time.perf_counter() - t0
      loop[mode] = dict(_timing(_step_times(d, max(1, tr["steps_per_call"])), b), stage_seconds=total,
                        steps=int(tr["steps"]), steps_per_call=max(1, tr["steps_per_call"]))
      if mode == "online":
        loop[mode]["code_path"] = ("transformation.run → train_lib.train, example path (grain pipeline with "
                                   f"{base.augment} on the host; one jitted step per call: φ_old, ψ, φ_new forward "
                                   "in eval mode + h forward/backward + Adam)")
      else:
        loop[mode]["code_path"] = ("transformation.run → cached_features (train_lib.predict over K views) → "
                                   f"train_lib.train, device-resident arrays path ({P} steps per jitted call: "
                                   "on-device gather + h forward/backward + Adam)")
        loop[mode]["caching_pass_seconds_with_compile"] = checkpoint.read_json(
            os.path.join(d, "features", "meta.json"))["seconds"]
        params["h"] = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(checkpoint.load_model(d)["params"]))
      print(f"[paper-scale] {mode} through the stage: {loop[mode]['seconds_per_step'] * 1e3:.1f} ms/step (median) "
            f"at batch {b} ({loop[mode]['images_per_second']:.1f} images/s), stage {total:.1f}s", flush=True)
    loop["epoch_cost_ratio_online_over_cached"] = (loop["online"]["seconds_per_step"] /
                                                   loop["cached"]["seconds_per_step"])
    out["through_the_stage"] = loop
    # 2. The same jitted steps back to back, in rounds (drift-robust ratios), and the caching forward.
    pb = int(args.paper_batch if args.paper_batch >= 0 else base.train.batch_size)
    il = out["interleaved"] = _interleaved(cfgs, tasks, ml_collections.ConfigDict(base), ctx, b, K, P, pb,
                                           int(args.paper_batch_steps_per_call), int(args.rounds))
    epochs = float(base.train.epochs)
    view = il["frozen_forward"]["seconds_per_image"]  # one cached view of one image: the three frozen forwards
    on = il["online_step"]
    out["caching_seconds_per_image_per_view"] = view
    out["caching_seconds_per_image"] = K * view
    out["schedule_epochs"] = epochs

    def compare(cached, ratios):
      """Per-epoch cost ratio (median over rounds), FLOPs ratio per image, break-even epochs of K cached views and
      the whole schedule's speed-up (caching pass included)."""
      return {"epoch_cost_ratio_online_over_cached": float(np.median(ratios)),
              "epoch_cost_ratio_range": [float(np.min(ratios)), float(np.max(ratios))],
              "flops_per_image_ratio_online_over_cached": (on["flops"] / b) / (cached["flops"] / cached["batch_size"]),
              "break_even_epochs": K * view / (on["seconds_per_image"] - cached["seconds_per_image"]),
              "schedule_speedup": epochs * on["seconds_per_image"] /
                                  (K * view + epochs * cached["seconds_per_image"])}

    out["same_batch"] = compare(il["cached_step"], il["per_round_ratio_online_over_cached"])
    if pb > 0:
      out["paper_batch"] = dict(compare(il["cached_step_paper_batch"],
                                        il["per_round_ratio_online_over_cached_paper_batch"]), note=(
          f"cached at batch {pb} against online at batch {b}: the online cost per image (convolutions, "
          "compute-bound) is taken as batch-independent; online at that batch is out of reach on a CPU"))
    out["devices"] = [str(d.device_kind) for d in jax.devices()]
    out["cpu_count"] = os.cpu_count()
    out["loadavg_start_end"] = [load0[0], os.getloadavg()[0]]
    out["total_seconds"] = time.perf_counter() - t_all
  finally:
    if own:
      shutil.rmtree(wd, ignore_errors=True)
  ca, sb = il["cached_step"], out["same_batch"]
  print(f"through the stage (batch {b}): online {loop['online']['seconds_per_step'] * 1e3:.0f} ms/step, cached "
        f"{loop['cached']['seconds_per_step'] * 1e3:.1f} ms/step → {loop['epoch_cost_ratio_online_over_cached']:.0f}×")
  print(f"interleaved (median of {len(il['per_round_ratio_online_over_cached'])} rounds, batch {b}): online "
        f"{on['seconds_per_step'] * 1e3:.0f} ms/step ({on['images_per_second']:.2f} images/s, "
        f"{on['flops'] / 1e9:.1f} GFLOP), cached {ca['seconds_per_step'] * 1e3:.1f} ms/step "
        f"({ca['images_per_second']:.0f} images/s, {ca['flops'] / 1e9:.3f} GFLOP)")
  print(f"→ an epoch is {sb['epoch_cost_ratio_online_over_cached']:.0f}× cheaper cached at batch {b} (rounds "
        f"{sb['epoch_cost_ratio_range'][0]:.0f}–{sb['epoch_cost_ratio_range'][1]:.0f}×; FLOPs per image "
        f"{sb['flops_per_image_ratio_online_over_cached']:.0f}×); caching costs {view * 1e3:.0f} ms per image per "
        f"view, {K} views pay off after {sb['break_even_epochs']:.2f} epochs; over the {epochs:g}-epoch schedule "
        f"cached is {sb['schedule_speedup']:.1f}× cheaper in total")
  if "paper_batch" in out:
    c, pbr = il["cached_step_paper_batch"], out["paper_batch"]
    print(f"cached at batch {c['batch_size']}: {c['seconds_per_step'] * 1e3:.0f} ms/step "
          f"({c['images_per_second']:.0f} images/s) → {pbr['epoch_cost_ratio_online_over_cached']:.0f}× cheaper per "
          f"epoch than online (FLOPs per image {pbr['flops_per_image_ratio_online_over_cached']:.0f}×); break-even "
          f"{pbr['break_even_epochs']:.2f} epochs, {epochs:g}-epoch schedule {pbr['schedule_speedup']:.1f}× cheaper")
  if args.out:
    write_json(args.out, out)
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--workdir", default="", help="a finished demo workdir (demo mode); with --paper-scale: where to "
                 "write the scratch stages (default: a temporary directory, removed afterwards)")
  p.add_argument("--stage", default="transformation")
  p.add_argument("--eval_stage", default="eval")
  p.add_argument("--out", default="")
  p.add_argument("--paper-scale", action="store_true", help="ImageNet-scale models with random weights (timing)")
  p.add_argument("--runlocal", action="store_true", help="with --paper-scale: the plan's tiny runlocal models, 32²")
  p.add_argument("--batch", type=int, default=8, help="--paper-scale: batch size of both modes")
  p.add_argument("--num-images", type=int, default=8, help="--paper-scale: synthetic training images")
  p.add_argument("--cache-views", type=int, default=4, help="--paper-scale: K, cached views per image")
  p.add_argument("--online-steps", type=int, default=4, help="--paper-scale: timed online steps (after 1)")
  p.add_argument("--steps-per-call", type=int, default=100, help="--paper-scale: cached steps per jitted call")
  p.add_argument("--cached-calls", type=int, default=3, help="--paper-scale: timed cached calls (after 1)")
  p.add_argument("--rounds", type=int, default=4, help="--paper-scale: timed interleaved rounds (after 1)")
  p.add_argument("--paper-batch", type=int, default=-1, help="--paper-scale: also time cached steps at this batch "
                 "(-1: the plan's train.batch_size, 1024; 0: skip)")
  p.add_argument("--paper-batch-steps-per-call", type=int, default=2, help="--paper-scale: per round")
  args = p.parse_args()
  if args.paper_scale:
    paper_scale(args)
    return
  if not args.workdir:
    p.error("--workdir is required (or --paper-scale)")
  wd = os.path.abspath(args.workdir)
  base = checkpoint.read_json(os.path.join(wd, args.stage, "config.json"))
  ctx = artifacts.Context(workdir=wd)
  out = {"stage": args.stage, "augment": base["augment"], "cache_views": base.get("cache_views", 1)}
  for mode in ("online", "cached"):
    name = f"{args.stage}_bench_{mode}"
    d = os.path.join(wd, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    cfg = ml_collections.ConfigDict(dict(base, name=name, feature_mode=mode))
    checkpoint.write_json(os.path.join(d, "config.json"), cfg.to_dict())
    t0 = time.perf_counter()
    assert transformation.run(cfg, d, ctx)
    total = time.perf_counter() - t0
    checkpoint.mark_done(d)
    sps = steady_seconds_per_step(d)
    steps_per_epoch = len(sources.get_source(cfg.data, cfg.split)[0]) // int(cfg.train.batch_size)
    out[mode] = {"stage_seconds": total, "seconds_per_step": sps, "steps_per_epoch": steps_per_epoch,
                 "seconds_per_epoch": sps * steps_per_epoch}
    if mode == "cached":
      out[mode]["cache_seconds"] = checkpoint.read_json(os.path.join(d, "features", "meta.json"))["seconds"]
  ecfg = ml_collections.ConfigDict(checkpoint.read_json(os.path.join(wd, args.eval_stage, "config.json")))
  source, _ = sources.get_source(ecfg.data, ecfg.split)
  labels = artifacts.source_labels(source)
  emb = {}
  for role in ("old", "new"):
    module, variables, _ = artifacts.load_backbone(ctx, ecfg[role], "benchmark")
    emb[role] = artifacts.embed(module, variables, source, batch_size=500, transform=artifacts.eval_transform(ecfg))
  for mode in ("online", "cached"):
    h, _, side = artifacts.load_h(ctx, f"{args.stage}_bench_{mode}", "benchmark")
    emb[f"h_{mode}"] = h(emb["old"], side.embed(source, batch_size=500, transform=artifacts.eval_transform(ecfg)))
  res = cases_lib.evaluate_cases(emb, labels, [("new", "h_online"), ("new", "h_cached"), ("old", "old"),
                                               ("new", "old")])
  out["results"] = cases_lib.to_jsonable(res)
  ratio = out["online"]["seconds_per_step"] / out["cached"]["seconds_per_step"]
  out["epoch_cost_ratio_online_over_cached"] = ratio
  frozen_flops, h_flops = step_flops(ml_collections.ConfigDict(base), ctx)
  out["flops_per_step"] = {"frozen_forward": frozen_flops, "h_forward_backward": h_flops,
                           "ratio_online_over_cached": (frozen_flops + h_flops) / h_flops}
  out["devices"] = [str(d.device_kind) for d in jax.devices()]
  print(f"seconds/step: online {out['online']['seconds_per_step'] * 1e3:.1f} ms, cached "
        f"{out['cached']['seconds_per_step'] * 1e3:.1f} ms → an epoch is {ratio:.1f}× cheaper cached "
        f"(one-off caching pass {out['cached']['cache_seconds']:.1f}s for {out['cache_views']} views)")
  print(f"seconds/epoch: online {out['online']['seconds_per_epoch']:.2f} s, cached "
        f"{out['cached']['seconds_per_epoch']:.3f} s; FLOPs per step: frozen forward {frozen_flops / 1e9:.3f} G, "
        f"h forward+backward {h_flops / 1e9:.3f} G (online/cached {out['flops_per_step']['ratio_online_over_cached']:.1f}×)")
  for k in ("new/h_online", "new/h_cached"):
    r = res[k]
    print(f"{k}: CMC top-1 {r['cmc_top1']:.1f}  top-5 {r['cmc_top5']:.1f}  mAP {r['mAP']:.1f}")
  if args.out:
    write_json(args.out, out)


if __name__ == "__main__":
  main()
