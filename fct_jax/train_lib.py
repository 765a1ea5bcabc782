"""THE training loop, shared by every stage.

A stage describes itself as a :class:`Task` (how to initialise its trainable variables, its loss, its frozen
inputs, an optional periodic evaluation) and calls :func:`train`. The loop owns everything else: the device mesh,
sharded initialisation, the jitted train step (explicit shardings, donated state), the optimiser and schedule,
logging with steps/s and ETA, periodic evaluation and checkpointing, resume from the workdir, and the NaN/Inf
guard.

Train state is a plain pytree ``{"step", "params", "model_state", "opt_state"}``; ``model_state`` holds non-trained
collections such as ``batch_stats``. Frozen models (old, new, side-info) live in ``Task.frozen`` and are passed to
the step as a separate, replicated, never-differentiated argument.
"""

import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
import warnings
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fct_jax import checkpoint, optim, sharding, writers
from fct_jax.data import pipeline
from fct_jax.errors import FCTError, NonFiniteError, Preempted

# On CPU, XLA cannot reuse donated buffers; the warning is noise there.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


@dataclasses.dataclass
class Task:
  """What a stage plugs into the loop.

  Attributes:
    name: stage name, used in logs and errors.
    init: ``init(rng, batch) -> {"params": ..., **model_state}`` on one (global) example batch.
    loss: ``loss(params, model_state, frozen, batch, rng, step) -> (loss, (metrics, new_model_state))``; metrics is
      a dict of scalars (the loss is logged as ``loss`` automatically).
    frozen: pytree of frozen variables passed to ``loss`` (replicated, not trained, not checkpointed).
    evaluate: optional ``evaluate(state) -> dict of floats``, run every ``eval_every_steps`` and at the end.
    transform: per-example training transform ``fn(example, rng) -> example``.
    keys: example fields that go into a batch.
    batches: optional ``batches(start_step, num_steps) -> iterator`` of this process's numpy slice of each global
      batch, replacing the per-example grain pipeline for data that is already batched arrays (the
      transformation's cached features: a fancy-index gather per step instead of one Python call per example).
      It must be a pure function of the step, like the grain pipeline, so that resume stays exact.
  """
  name: str
  init: Callable
  loss: Callable
  transform: Callable
  frozen: Any = None
  evaluate: Optional[Callable] = None
  keys: tuple = ("image", "label")
  batches: Optional[Callable] = None


def steps_for(train_cfg, num_examples: int):
  """(steps_per_epoch, total_steps) from epochs (or explicit ``steps``), dropping the last partial batch."""
  steps_per_epoch = num_examples // train_cfg.batch_size
  if steps_per_epoch == 0:
    raise FCTError(f"training set has {num_examples} examples, fewer than one batch of {train_cfg.batch_size}")
  steps = int(train_cfg.get("steps", 0) or 0)
  total = steps if steps > 0 else int(math.ceil(train_cfg.epochs * steps_per_epoch))
  if total <= 0:
    raise FCTError(f"training would run {total} steps; set train.epochs or train.steps > 0")
  return steps_per_epoch, total


def prng_key(seed: int, impl: str = "rbg"):
  """A typed PRNG key. Default ``rbg``: XLA:CPU compiles threefry-based initialisers ~7× slower (16 s vs 2 s for
  the tiny test CNN), and ``rbg`` is the usual choice for large accelerator runs. Results are deterministic for a
  given seed and device set with either; set ``prng_impl: threefry2x32`` in a stage config for JAX's default."""
  return jax.random.key(seed, impl=impl)


def _make_train_step(task: Task, tx, seed: int, impl: str):
  base_key = prng_key(seed, impl)

  def train_step(state, frozen, batch):
    rng = jax.random.fold_in(base_key, state["step"])  # a pure function of the step: resume-exact

    def loss_fn(params):
      return task.loss(params, state["model_state"], frozen, batch, rng, state["step"])

    (loss, (metrics, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = jax.tree.map(lambda p, u: p + u, state["params"], updates)
    metrics = {"loss": loss, **metrics, "grad_norm": _global_norm(grads)}
    new_state = {"step": state["step"] + 1, "params": params, "model_state": new_model_state,
                 "opt_state": opt_state}
    return new_state, metrics

  return train_step


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _check_finite(metrics: Dict[str, float], step: int, name: str):
  bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(v))}
  if bad:
    k = "loss" if "loss" in bad else next(iter(bad))
    v = bad[k]
    raise NonFiniteError(f"stage {name!r}: {k} is {v} at step {step}; stopped before checkpointing "
                         f"(lower the learning rate or check the input data)")


class PreemptionWatcher:
  """Notices a request to stop at the next step boundary.

  One process: a SIGTERM handler sets a flag (installed only while training, from the main thread; the previous
  handler is restored afterwards). Several processes: JAX's preemption service (started by
  ``jax.distributed.initialize``) catches the signal and makes every host agree on the same step, which orbax's
  ``reached_preemption`` reports — a per-host flag could stop hosts at different steps and deadlock collectives.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  @contextlib.contextmanager
  def installed(self):
    single = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
    if single:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    try:
      yield self
    finally:
      if single:
        signal.signal(signal.SIGTERM, self._previous)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int, mngr) -> bool:
    if jax.process_count() > 1:
      return mngr.reached_preemption(step)
    return self.requested


def train(*, cfg, workdir: str, task: Task, source, mesh=None, stop_at_step: Optional[int] = None):
  """Trains ``task`` on ``source`` with the stage config ``cfg``; checkpoints into ``workdir``.

  Resumes from the latest checkpoint in ``workdir/checkpoints`` when there is one.

  Args:
    cfg: stage config; uses ``cfg.seed`` and ``cfg.train`` (batch_size, epochs|steps, optimizer,
      log_every_steps, eval_every_steps, checkpoint_every_steps, keep_checkpoints, num_data_threads).
    workdir: the stage's directory.
    task: the stage's :class:`Task`.
    source: random-access training source.
    mesh: device mesh (default: all devices on a ``data`` axis).
    stop_at_step: stop (after checkpointing) once this step is reached, as if preempted; for tests and
      time-sliced jobs.
  Returns:
    ``(state, history)``: the final train state (replicated global arrays) and the logged metric records.
  """
  tc = cfg.train
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(tc.batch_size, mesh, "train.batch_size")
  steps_per_epoch, total = steps_for(tc, len(source))
  tx, schedule = optim.make_optimizer(tc.optimizer, total, steps_per_epoch)
  repl, data_sh = sharding.replicated(mesh), sharding.data_sharded(mesh)
  seed = int(cfg.seed)
  prefix = f"[{task.name}] "

  def batches(start):
    if task.batches is not None:
      return (pipeline.to_global(b, mesh) for b in task.batches(start, total))
    it = pipeline.train_batches(source, global_batch_size=tc.batch_size, seed=seed, start_step=start,
                                num_steps=total, transform=task.transform, keys=task.keys,
                                num_threads=tc.get("num_data_threads", 2))
    return (pipeline.to_global(b, mesh) for b in it)

  # Initialise from the first batch's shapes (no data-dependent init).
  if task.batches is not None:
    first = next(iter(task.batches(0, 1)))
  else:
    first = next(pipeline.train_batches(source, global_batch_size=tc.batch_size, seed=seed, start_step=0,
                                        num_steps=1, transform=task.transform, keys=task.keys, num_threads=1))
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((tc.batch_size,) + x.shape[1:], x.dtype), first)

  def init_state(rng):
    variables = task.init(rng, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example))
    variables = dict(variables)
    params = variables.pop("params")
    return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": variables,
            "opt_state": tx.init(params)}

  impl = cfg.get("prng_impl", "rbg")
  init_rng = prng_key(seed + 7, impl)
  abstract = jax.eval_shape(init_state, init_rng)
  state_sh = jax.tree.map(lambda _: repl, abstract)
  frozen = jax.device_put(task.frozen, repl) if task.frozen is not None else None

  ckpt_dir = os.path.join(workdir, "checkpoints")
  mngr = checkpoint.manager(ckpt_dir, max_to_keep=int(tc.get("keep_checkpoints", 2)))
  if mngr.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    state = checkpoint.restore_state(mngr, target)
    print(f"{prefix}resumed from step {int(state['step'])} in {ckpt_dir}", flush=True)
  else:
    state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
  start = int(state["step"])

  step_fn = jax.jit(_make_train_step(task, tx, seed, impl),
                    in_shardings=(state_sh, repl if frozen is not None else None, data_sh),
                    out_shardings=(state_sh, repl), donate_argnums=(0,))

  writer = writers.create_writer(workdir, prefix=prefix, console=False)
  if start == 0:
    writer.write_hparams({"total_steps": total, "steps_per_epoch": steps_per_epoch,
                          "devices": mesh.size, "processes": jax.process_count()})
  log_every = max(1, int(tc.get("log_every_steps", 50)))
  eval_every = int(tc.get("eval_every_steps", 0) or 0)
  ckpt_every = int(tc.get("checkpoint_every_steps", 0) or 0)
  end = total if stop_at_step is None else min(total, stop_at_step)
  progress = writers.Progress(total, start=start, prefix=prefix)
  history = []
  acc, acc_n = None, 0

  def flush_metrics(step):
    nonlocal acc, acc_n
    if acc is None:
      return
    m = {k: float(v) / acc_n for k, v in jax.device_get(acc).items()}
    acc, acc_n = None, 0
    _check_finite(m, step, task.name)
    m["lr"] = float(schedule(step - 1))
    m["steps_per_sec"] = progress.rate(step)
    writer.write_scalars(step, m)
    history.append({"step": step, **m})
    progress.update(step, f"loss {m['loss']:.4f} lr {m['lr']:.3g}")

  def run_eval(step, st):
    if task.evaluate is None:
      return
    t0 = time.perf_counter()
    m = task.evaluate(st)
    _check_finite(m, step, task.name)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in m.items()})
    history.append({"step": step, **{f"eval/{k}": v for k, v in m.items()}})
    shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
    print(f"{prefix}eval at step {step}: {shown} ({time.perf_counter() - t0:.1f}s)", flush=True)

  if start < end:
    print(f"{prefix}training steps {start}..{total} ({steps_per_epoch} steps/epoch, batch {tc.batch_size}, "
          f"{mesh.size} devices)", flush=True)
  data = batches(start) if start < end else iter(())
  watcher = PreemptionWatcher()
  with watcher.installed():
    for step in range(start + 1, end + 1):
      batch = next(data)
      state, metrics = step_fn(state, frozen, batch)
      acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
      acc_n += 1
      preempted = watcher.should_stop(step, mngr) and step < end
      last = step == end or preempted
      if step % log_every == 0 or last:
        flush_metrics(step)
      if (ckpt_every and step % ckpt_every == 0) or last:
        flush_metrics(step)  # never checkpoint a non-finite state
        checkpoint.save_state(mngr, step, state, force=last)
      if preempted:
        mngr.wait_until_finished()
        writer.close()
        raise Preempted(f"stage {task.name!r} stopped at step {step}/{total} on request; checkpoint saved, "
                        "rerun the same command to resume")
      if eval_every and step % eval_every == 0 and not last:
        run_eval(step, state)
  mngr.wait_until_finished()
  if end == total:
    run_eval(total, state)
  writer.flush()
  writer.close()
  return state, history


def predict(apply_fn: Callable, variables: Any, source, *, batch_size: int, transform: Callable, mesh=None,
            keys=("image",)) -> Dict[str, np.ndarray]:
  """Runs ``apply_fn(variables, batch) -> dict of [B, ...] arrays`` over ``source`` in order; returns numpy arrays.

  Batches are sharded over the mesh; the padded tail of the last batch is dropped. Outputs are gathered to every
  process (replicated), so the result is the whole data set's on each host.
  """
  mesh = mesh or sharding.make_mesh()
  sharding.check_batch_size(batch_size, mesh, "eval batch_size")
  repl, data_sh = sharding.replicated(mesh), sharding.data_sharded(mesh)
  variables = jax.device_put(variables, repl)
  fn = jax.jit(lambda v, b: apply_fn(v, b), in_shardings=(repl, data_sh), out_shardings=repl)
  outs = []
  for local in pipeline.eval_batches(source, global_batch_size=batch_size, transform=transform, keys=keys):
    local.pop("mask")
    outs.append(jax.device_get(fn(variables, pipeline.to_global(local, mesh))))
  n = len(source)
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
