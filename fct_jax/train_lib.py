"""THE training loop, shared by every stage.

A stage describes itself as a :class:`Task` (how to initialise its trainable variables, its loss, its frozen
inputs, an optional periodic evaluation) and calls :func:`train`. The loop owns everything else: the device mesh,
sharded initialisation, the jitted train step (explicit shardings, donated state), the optimiser and schedule,
logging with steps/s and ETA, periodic evaluation and checkpointing, resume from the workdir, and the NaN/Inf
guard.

Train state is a plain pytree ``{"step", "params", "model_state", "opt_state"}``; ``model_state`` holds non-trained
collections such as ``batch_stats``. Frozen models (old, new, side-info) live in ``Task.frozen`` and are passed to
the step as a separate, replicated, never-differentiated argument.

Two data paths, each run by a step runner of :mod:`fct_jax.train_steps`:

* examples (the default): a random-access source, the per-example transform and the grain pipeline assemble each
  global batch on the hosts; one jitted call per optimizer step.
* arrays (``Task.arrays`` + ``Task.indices``, for data that is already vectors, e.g. the transformation's cached
  features): the arrays are placed on the devices once, their rows sharded over the mesh's ``data`` axis; the
  hosts only compute each step's global row indices, and one jitted call runs up to ``train.steps_per_call``
  optimizer steps (an on-device ``fori_loop`` that gathers each step's batch by index). Calls end early at every
  step where something happens on the host (logging, evaluation, checkpointing, the end; see
  :mod:`fct_jax.train_bookkeeping`), so those cadences land on exactly the configured steps, and preemption is
  noticed at the end of a call. The loop's trip count is a traced value, so every call runs the same compiled body
  whatever its length: the result does not depend on ``steps_per_call`` or on where a run was interrupted and
  resumed (bit-identical on a given device set). With ``train.arrays_on_device`` false the rows stay on the hosts
  and are gathered there each step like a pipeline batch.
"""

import contextlib
import dataclasses
import math
import os
import warnings
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fct_jax import checkpoint, optim, sharding, train_steps, writers
from fct_jax import train_bookkeeping as bookkeeping
from fct_jax.data import pipeline
from fct_jax.errors import FCTError, Preempted

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


class Steps(NamedTuple):
  """How long a training run is: optimizer steps per epoch (None when the size is unknown) and in all."""
  steps_per_epoch: Optional[int]
  total: Optional[int]


def resolve_steps(train_cfg, num_examples: Optional[int]) -> Steps:
  """The run length of a ``train`` block: ``total`` is ``train.steps`` when set (> 0), else ``train.epochs``
  epochs rounded up; an epoch drops the last partial batch. The one place the training loop, the stages and the
  dry run derive it from.

  Args:
    train_cfg: the stage's ``train`` block (batch_size, epochs, steps).
    num_examples: the training split's size; None when it is not known without reading the data (the dry run):
      then ``steps_per_epoch`` is None and ``total`` is known only when ``train.steps`` fixes it.
  Raises:
    FCTError: the split holds fewer examples than one batch, or the run would have no steps.
  """
  steps = int(train_cfg.steps or 0)
  if num_examples is None:
    return Steps(None, steps if steps > 0 else None)
  steps_per_epoch = num_examples // train_cfg.batch_size
  if steps_per_epoch == 0:
    raise FCTError(f"training set has {num_examples} examples, fewer than one batch of {train_cfg.batch_size}")
  total = steps if steps > 0 else int(math.ceil(train_cfg.epochs * steps_per_epoch))
  if total <= 0:
    raise FCTError(f"training would run {total} steps; set train.epochs or train.steps > 0")
  return Steps(steps_per_epoch, total)


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


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def check_steps_per_call(stage: str, tc, device_arrays: bool) -> int:
  """``train.steps_per_call`` (0: the default); more than 1 needs the device-resident arrays path (the
  transformation's cached features with ``train.arrays_on_device``), else a one-line FCTError."""
  per_call = int(tc.steps_per_call or 0)
  if per_call > 1 and not device_arrays:
    raise FCTError(f"stage {stage!r}: train.steps_per_call={per_call} needs the device-resident arrays path "
                   "(the transformation's cached features with train.arrays_on_device); set it to 1")
  return per_call


def steps_per_call(task: Task, tc, total: int) -> int:
  """Optimizer steps per jitted call: on the device-resident arrays path ``train.steps_per_call`` (checked by
  :func:`check_steps_per_call`; 0 means :data:`DEFAULT_STEPS_PER_CALL`) capped at ``total``, else 1."""
  on_device = task.arrays is not None and bool(tc.arrays_on_device)
  per_call = check_steps_per_call(task.name, tc, on_device)
  return min(per_call or DEFAULT_STEPS_PER_CALL, total) if on_device else 1


def example_batch(task: Task, source, batch_size: int, seed: int):
  """One global batch of ``task`` as ``jax.ShapeDtypeStruct`` leaves, from its first example or row: the shapes
  initialisation needs (no data-dependent init)."""
  if task.arrays is not None:
    first = jax.tree.map(lambda x: x[:1], task.arrays)
  else:
    first = next(pipeline.train_batches(source, global_batch_size=batch_size, seed=seed, start_step=0, num_steps=1,
                                        transform=task.transform, keys=task.keys, num_threads=1))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch_size,) + x.shape[1:], x.dtype), first)


def init_or_restore(mngr, init_state: Callable, rng, mesh, *, ckpt_dir: str, prefix: str):
  """``(state, shardings)``: the train state to start from, replicated over ``mesh``: the latest checkpoint in
  ``mngr`` (``ckpt_dir``) when there is one, else ``init_state(rng)``; and its shardings, for the jitted steps."""
  abstract = jax.eval_shape(init_state, rng)
  state_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  if mngr.latest_step() is None:
    return jax.jit(init_state, out_shardings=state_sh)(rng), state_sh
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
  state = checkpoint.restore_state(mngr, target)
  print(f"{prefix}resumed from step {int(state['step'])} in {ckpt_dir}", flush=True)
  return state, state_sh


def train(*, cfg, workdir: str, task: Task, source, mesh=None, stop_at_step: Optional[int] = None):
  """Trains ``task`` on ``source`` with the stage config ``cfg``; checkpoints into ``workdir``.

  Resumes from the latest checkpoint in ``workdir/checkpoints`` when there is one. Each turn of the loop runs one
  call of the data path's step runner, ending where the host logs, checkpoints (after the NaN/Inf guard), stops
  on request (:class:`~fct_jax.errors.Preempted`) or evaluates.

  Args:
    cfg: stage config: ``seed``, ``prng_impl`` and the ``train`` block.
    workdir: the stage's directory.
    task: the stage's :class:`Task`.
    source: random-access training source (with ``Task.arrays``: only its length, the examples per epoch).
    mesh: device mesh (default: all devices on a ``data`` axis).
    stop_at_step: stop (after checkpointing) once this step is reached, as if preempted; for tests and
      time-sliced jobs.
  Returns:
    ``(state, history)``: the final train state (replicated global arrays) and the logged metric records.
  """
  tc, mesh, prefix = cfg.train, mesh or sharding.make_mesh(), f"[{task.name}] "
  sharding.check_batch_size(tc.batch_size, mesh, "train.batch_size")
  steps = resolve_steps(tc, len(source))
  tx, schedule = optim.make_optimizer(tc.optimizer, steps.total, steps.steps_per_epoch)
  per_call = steps_per_call(task, tc, steps.total)
  init_state = make_state_init(task, tx, example_batch(task, source, tc.batch_size, int(cfg.seed)))
  cadence, watcher = bookkeeping.Cadence.from_config(tc), bookkeeping.PreemptionWatcher()
  # close() waits for the asynchronous saves (the last one, the one before a preemption stop, an earlier finite
  # step's before a NaN/Inf stop or any error) and ends the manager's threads and event loops, however train ends.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with contextlib.closing(checkpoint.manager(ckpt_dir, max_to_keep=int(tc.keep_checkpoints))) as mngr:
    state, state_sh = init_or_restore(mngr, init_state, prng_key(int(cfg.seed) + 7, cfg.prng_impl), mesh,
                                      ckpt_dir=ckpt_dir, prefix=prefix)
    runner = train_steps.make_runner(task, cfg, source, mesh, make_train_step(task, tx, int(cfg.seed), cfg.prng_impl),
                                     state_sh, per_call, steps.total)
    step = int(state["step"])
    end = steps.total if stop_at_step is None else min(steps.total, stop_at_step)
    writer = writers.create_writer(workdir, prefix=prefix, console=False)
    if step == 0:
      writer.write_hparams({"total_steps": steps.total, "steps_per_epoch": steps.steps_per_epoch,
                            "devices": mesh.size, "processes": jax.process_count()})
    log = bookkeeping.MetricLog(task.name, writer, schedule, writers.Progress(steps.total, start=step, prefix=prefix))
    if step < end:
      print(f"{prefix}training steps {step}..{steps.total} ({steps.steps_per_epoch} steps/epoch, batch "
            f"{tc.batch_size}, {mesh.size} devices{runner.description})", flush=True)
    with watcher.installed():
      while step < end:
        n = bookkeeping.next_stop(step, end, runner.max_steps_per_call, cadence) - step
        state, metrics = runner.run(state, step, n)
        step += n
        log.add(metrics, n)
        preempted = watcher.should_stop(step, mngr) and step < end
        last = step == end or preempted
        if bookkeeping.itstime(step, cadence.log, last):
          log.flush(step)
        if bookkeeping.itstime(step, cadence.checkpoint, last):
          log.flush(step)  # never checkpoint a non-finite state
          checkpoint.save_state(mngr, step, state, force=last)
        if preempted:
          writer.close()
          raise Preempted(f"stage {task.name!r} stopped at step {step}/{steps.total} on request; checkpoint "
                          "saved, rerun the same command to resume")
        if bookkeeping.itstime(step, cadence.eval) and not last:
          log.evaluate(step, state, task.evaluate)
    if end == steps.total:
      log.evaluate(steps.total, state, task.evaluate)
    writer.flush()
    writer.close()
    return state, log.history


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
