"""THE training loop, shared by every stage.

A stage describes itself as a :class:`Task` (how to initialise its trainable variables, its loss, its frozen
inputs, an optional periodic evaluation) and calls :func:`train`. The loop owns everything else: the device mesh,
sharded initialisation, the jitted train step (explicit shardings, donated state), the optimiser and schedule,
logging with steps/s and ETA, periodic evaluation and checkpointing, resume from the workdir, and the NaN/Inf
guard.

Train state is a plain pytree ``{"step", "params", "model_state", "opt_state"}``; ``model_state`` holds non-trained
collections such as ``batch_stats``. Frozen models (old, new, side-info) live in ``Task.frozen`` and are passed to
the step as a separate, replicated, never-differentiated argument.

Two data paths:

* examples (the default): a random-access source, the per-example transform and the grain pipeline assemble each
  global batch on the hosts; one jitted call per optimizer step.
* arrays (``Task.arrays`` + ``Task.indices``, for data that is already vectors, e.g. the transformation's cached
  features): the arrays are placed on the devices once, their rows sharded over the mesh's ``data`` axis; the
  hosts only compute each step's global row indices, and one jitted call runs up to ``train.steps_per_call``
  optimizer steps (an on-device ``fori_loop`` that gathers each step's batch by index). Calls end early at every
  step where something happens on the host (logging, evaluation, checkpointing, the end), so those cadences land
  on exactly the configured steps, and preemption is noticed at the end of a call. The loop's trip count is a
  traced value, so every call runs the same compiled body whatever its length: the result does not depend on
  ``steps_per_call`` or on where a run was interrupted and resumed (bit-identical on a given device set).
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
from jax.sharding import PartitionSpec as P

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
    arrays: optional pytree of numeric numpy arrays with a common number of rows (leading dimension), the same on
      every process; replaces the per-example source and pipeline (``source`` only gives the epoch length). A batch is
      the pytree of the rows ``indices`` picks. Held on the devices (rows sharded over ``data``) unless
      ``train.arrays_on_device`` is false, then gathered on the hosts each step like a pipeline batch.
    indices: with ``arrays``: ``indices(start_step, num_steps) -> int array [num_steps, global_batch]``, the rows
      of each global batch of steps ``start_step .. start_step + num_steps - 1``. It must be a pure function of the
      step, like the grain pipeline, so that resume stays exact.
  """
  name: str
  init: Callable
  loss: Callable
  transform: Callable
  frozen: Any = None
  evaluate: Optional[Callable] = None
  keys: tuple = ("image", "label")
  arrays: Any = None
  indices: Optional[Callable] = None

# ``train.steps_per_call`` when unset: optimizer steps per jitted call on the device-resident arrays path (calls still
# end at every log/eval/checkpoint step); the example path always runs one step per call.
DEFAULT_STEPS_PER_CALL = 100


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


def make_state_init(task: Task, tx, example):
  """``init_state(rng)``: the training state (step 0, params, model state, optimizer state) of ``task`` initialised
  on zeros shaped like ``example`` (a pytree of ``jax.ShapeDtypeStruct``, one global batch)."""

  def init_state(rng):
    variables = dict(task.init(rng, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)))
    params = variables.pop("params")
    return {"step": jnp.zeros((), jnp.int32), "params": params, "model_state": variables,
            "opt_state": tx.init(params)}

  return init_state


def make_train_step(task: Task, tx, seed: int, impl: str):
  """``train_step(state, frozen, batch) -> (state, metrics)``: one optimizer step of ``task`` (loss, backward,
  update), its randomness a pure function of (seed, step). What :func:`train` jits (alone, or inside
  :func:`make_multi_step` on the device-resident arrays path)."""
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


def make_multi_step(train_step, gather):
  """``multi_step(state, frozen, arrays, idx [S, B], n) -> (state, summed metrics)``: ``n ≤ S`` train steps in one
  call (an on-device loop with a traced trip count: one compiled body whatever ``n``), step i on the batch
  ``gather(arrays, idx[i])``; metrics are summed over the n steps (a NaN/Inf in any step stays in the sum)."""

  def multi_step(state, frozen, arrays, idx, n):
    def one(st, i):
      return train_step(st, frozen, gather(arrays, idx[i]))

    zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), jax.eval_shape(one, state, 0)[1])

    def body(i, carry):
      st, acc = carry
      st, metrics = one(st, i)
      return st, jax.tree.map(jnp.add, acc, metrics)

    return jax.lax.fori_loop(0, n, body, (state, zeros))

  return multi_step


def shard_rows(arrays, mesh):
  """Places every array of ``arrays`` on ``mesh`` with its rows sharded over ``data`` (zero-padded to a multiple of
  the device count; the padding is never indexed). Each process passes the whole arrays (the same everywhere)."""
  n, sh = mesh.size, sharding.data_sharded(mesh)

  def place(x):
    x = np.asarray(x)
    rows = -(-len(x) // n) * n
    shape = (rows,) + x.shape[1:]

    def shard(index):
      a, b, _ = index[0].indices(rows)
      out = np.zeros((b - a,) + x.shape[1:], x.dtype)
      out[:max(0, min(b, len(x)) - a)] = x[a:min(b, len(x))]
      return out

    return jax.make_array_from_callback(shape, sh, shard)

  return jax.tree.map(place, arrays)


def gather_rows(mesh):
  """``gather(arrays, idx [B]) -> batch``: rows ``idx`` (global) of row-sharded ``arrays``, the batch sharded over
  ``data`` like a pipeline batch. Each device picks the requested rows it holds (zeros elsewhere) and a
  reduce-scatter over ``data`` adds the contributions and leaves each device its slice of the batch: exact (one
  non-zero term per element) and independent of the device count."""
  axis = sharding.DATA_AXIS

  def local(arrays, idx):
    def one(x):
      rows = x.shape[0]
      j = idx - jax.lax.axis_index(axis) * rows
      mine = (j >= 0) & (j < rows)
      picked = jnp.take(x, jnp.clip(j, 0, rows - 1), axis=0)
      picked = jnp.where(mine.reshape((-1,) + (1,) * (x.ndim - 1)), picked, jnp.zeros((), x.dtype))
      return jax.lax.psum_scatter(picked, axis, scatter_dimension=0, tiled=True)
    return jax.tree.map(one, arrays)

  def gather(arrays, idx):
    specs = jax.tree.map(lambda _: P(axis), arrays)
    return jax.shard_map(local, mesh=mesh, in_specs=(specs, P()), out_specs=specs)(arrays, idx)

  return gather


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


def check_steps_per_call(stage: str, tc, device_arrays: bool) -> int:
  """``train.steps_per_call`` (0 when unset); more than 1 needs the device-resident arrays path (the
  transformation's cached features with ``train.arrays_on_device``), else a one-line FCTError."""
  per_call = int(tc.get("steps_per_call", 0) or 0)
  if per_call > 1 and not device_arrays:
    raise FCTError(f"stage {stage!r}: train.steps_per_call={per_call} needs the device-resident arrays path "
                   "(the transformation's cached features with train.arrays_on_device); set it to 1")
  return per_call


def train(*, cfg, workdir: str, task: Task, source, mesh=None, stop_at_step: Optional[int] = None):
  """Trains ``task`` on ``source`` with the stage config ``cfg``; checkpoints into ``workdir``.

  Resumes from the latest checkpoint in ``workdir/checkpoints`` when there is one.

  Args:
    cfg: stage config; uses ``cfg.seed`` and ``cfg.train`` (batch_size, epochs|steps, optimizer,
      log_every_steps, eval_every_steps, checkpoint_every_steps, keep_checkpoints, num_data_threads; with
      ``Task.arrays`` also steps_per_call and arrays_on_device).
    workdir: the stage's directory.
    task: the stage's :class:`Task`.
    source: random-access training source (with ``Task.arrays``: only its length, the examples per epoch).
    mesh: device mesh (default: all devices on a ``data`` axis).
    stop_at_step: stop (after checkpointing) once this step is reached, as if preempted; for tests and
      time-sliced jobs.
  Returns:
    ``(state, history)``: the final train state (replicated global arrays) and the logged metric records.
  """
  tc = cfg.train
  mesh = mesh or sharding.make_mesh()
  per_process_batch = sharding.check_batch_size(tc.batch_size, mesh, "train.batch_size")
  steps_per_epoch, total = steps_for(tc, len(source))
  tx, schedule = optim.make_optimizer(tc.optimizer, total, steps_per_epoch)
  repl, data_sh = sharding.replicated(mesh), sharding.data_sharded(mesh)
  seed = int(cfg.seed)
  prefix = f"[{task.name}] "
  use_arrays = task.arrays is not None
  on_device = use_arrays and bool(tc.get("arrays_on_device", True))
  per_call = check_steps_per_call(task.name, tc, on_device)
  per_call = min(per_call or DEFAULT_STEPS_PER_CALL, total) if on_device else 1

  def host_arrays_batches(start):
    p, b = jax.process_index(), per_process_batch
    for step in range(start, total):
      idx = np.asarray(task.indices(step, 1))[0, p * b:(p + 1) * b]
      yield jax.tree.map(lambda x: x[idx], task.arrays)

  def batches(start):
    if use_arrays:
      it = host_arrays_batches(start)
    else:
      it = pipeline.train_batches(source, global_batch_size=tc.batch_size, seed=seed, start_step=start,
                                  num_steps=total, transform=task.transform, keys=task.keys,
                                  num_threads=tc.get("num_data_threads", 2))
    return (pipeline.to_global(b, mesh) for b in it)

  # Initialise from the first batch's shapes (no data-dependent init).
  if use_arrays:
    first = jax.tree.map(lambda x: x[:1], task.arrays)
  else:
    first = next(pipeline.train_batches(source, global_batch_size=tc.batch_size, seed=seed, start_step=0,
                                        num_steps=1, transform=task.transform, keys=task.keys, num_threads=1))
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct((tc.batch_size,) + x.shape[1:], x.dtype), first)

  init_state = make_state_init(task, tx, example)
  impl = cfg.get("prng_impl", "rbg")
  init_rng = prng_key(seed + 7, impl)
  abstract = jax.eval_shape(init_state, init_rng)
  state_sh = jax.tree.map(lambda _: repl, abstract)
  frozen = jax.device_put(task.frozen, repl) if task.frozen is not None else None

  ckpt_dir = os.path.join(workdir, "checkpoints")
  # close() waits for the asynchronous saves (the last one, the one before a preemption stop, an earlier finite
  # step's before a NaN/Inf stop or any error) and ends the manager's threads and event loops, however train ends.
  with contextlib.closing(checkpoint.manager(ckpt_dir, max_to_keep=int(tc.get("keep_checkpoints", 2)))) as mngr:
    if mngr.latest_step() is not None:
      target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
      state = checkpoint.restore_state(mngr, target)
      print(f"{prefix}resumed from step {int(state['step'])} in {ckpt_dir}", flush=True)
    else:
      state = jax.jit(init_state, out_shardings=state_sh)(init_rng)
    start = int(state["step"])

    train_step = make_train_step(task, tx, seed, impl)
    frozen_sh = repl if frozen is not None else None
    if on_device:
      arrays = shard_rows(task.arrays, mesh)
      rows_sh = jax.tree.map(lambda _: data_sh, arrays)
      multi_fn = jax.jit(make_multi_step(train_step, gather_rows(mesh)),
                         in_shardings=(state_sh, frozen_sh, rows_sh, repl, repl),
                         out_shardings=(state_sh, repl), donate_argnums=(0,))

      def run_steps(st, step, n):  # steps step+1 .. step+n; the index block keeps one shape [per_call, B]
        host = np.zeros((per_call, tc.batch_size), np.int32)  # fresh: a CPU device array may alias it
        host[:n] = np.asarray(task.indices(step, n))
        idx = jax.make_array_from_callback(host.shape, repl, lambda i: host[i])
        n_dev = jax.make_array_from_callback((), repl, lambda i: np.asarray(n, np.int32))
        return multi_fn(st, frozen, arrays, idx, n_dev)
    else:
      step_fn = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, data_sh),
                        out_shardings=(state_sh, repl), donate_argnums=(0,))

      def run_steps(st, step, n):
        del step, n  # always 1
        return step_fn(st, frozen, next(data))

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

    def next_stop(step):
      """The last step of the call starting after ``step``: at most ``per_call`` steps, ending at the next step
      where the host logs, evaluates or checkpoints (so those land on the configured steps) or at the end."""
      stop = min(step + per_call, end)
      for every in (log_every, eval_every, ckpt_every):
        if every:
          stop = min(stop, (step // every + 1) * every)
      return stop

    if start < end:
      calls = f", up to {per_call} steps per call on device-resident data" if on_device else ""
      print(f"{prefix}training steps {start}..{total} ({steps_per_epoch} steps/epoch, batch {tc.batch_size}, "
            f"{mesh.size} devices{calls})", flush=True)
    data = batches(start) if start < end and not on_device else iter(())
    watcher = PreemptionWatcher()
    with watcher.installed():
      step = start
      while step < end:
        n = next_stop(step) - step
        state, metrics = run_steps(state, step, n)
        step += n
        acc = metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)
        acc_n += n
        preempted = watcher.should_stop(step, mngr) and step < end
        last = step == end or preempted
        if step % log_every == 0 or last:
          flush_metrics(step)
        if (ckpt_every and step % ckpt_every == 0) or last:
          flush_metrics(step)  # never checkpoint a non-finite state
          checkpoint.save_state(mngr, step, state, force=last)
        if preempted:
          writer.close()
          raise Preempted(f"stage {task.name!r} stopped at step {step}/{total} on request; checkpoint saved, "
                          "rerun the same command to resume")
        if eval_every and step % eval_every == 0 and not last:
          run_eval(step, state)
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
