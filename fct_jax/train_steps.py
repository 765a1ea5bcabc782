"""The training loop's step runners: how one call of :func:`fct_jax.train_lib.train` advances the train state.

One runner per data path, each with ``max_steps_per_call``, ``description`` (for the loop's start line) and
``run(state, step, n) -> (state, metrics)`` (steps ``step + 1 .. step + n``; ``metrics`` summed over them), the
jitted call taking explicit shardings and donating the state:

* :class:`ExampleSteps`: the grain pipeline assembles each global batch on the hosts; one step per call.
* :class:`HostArraySteps`: rows of ``Task.arrays`` held on the hosts (``train.arrays_on_device`` false), gathered
  there each step like a pipeline batch; one step per call.
* :class:`DeviceArraySteps`: the arrays placed on the devices once (rows sharded over ``data``, :func:`shard_rows`);
  the hosts only compute the row indices and one call runs up to ``train.steps_per_call`` steps in an on-device
  loop (:func:`make_multi_step`, batches by :func:`gather_rows`).

Every runner's step ``s`` sees the same batch, so the paths agree and a run resumed at any step is exact.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fct_jax import sharding
from fct_jax.data import pipeline


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


def _frozen_placed(frozen, mesh):
  """``(frozen on the devices, its sharding)``: replicated, or ``(None, None)`` for a task without frozen inputs."""
  if frozen is None:
    return None, None
  repl = sharding.replicated(mesh)
  return jax.device_put(frozen, repl), repl


class HostBatchSteps:
  """One jitted optimizer step per call on a global batch this process's hosts assemble (:meth:`local_batches`).

  The batch iterator opens at the first step run, from that step on (a finished run opens none).
  """

  max_steps_per_call = 1
  description = ""  # for the loop's start line

  def __init__(self, train_step: Callable, state_sh, frozen, mesh):
    self._frozen, frozen_sh = _frozen_placed(frozen, mesh)
    self._mesh, self._batches = mesh, None
    self._fn = jax.jit(train_step, in_shardings=(state_sh, frozen_sh, sharding.data_sharded(mesh)),
                       out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))

  def local_batches(self, start: int):
    """This process's slice of the global batch of every step from ``start`` on."""
    raise NotImplementedError

  def run(self, state, step: int, n: int):
    """Runs step ``step + 1`` (``n`` is always 1)."""
    del n
    if self._batches is None:
      self._batches = self.local_batches(step)
    return self._fn(state, self._frozen, pipeline.to_global(next(self._batches), self._mesh))


class ExampleSteps(HostBatchSteps):
  """The example path: the grain pipeline (source, per-example transform, ``Task.keys``) makes each batch."""

  def __init__(self, train_step: Callable, state_sh, frozen, mesh, *, task, source, tc, seed: int, total: int):
    super().__init__(train_step, state_sh, frozen, mesh)
    self._task, self._source, self._tc, self._seed, self._total = task, source, tc, seed, total

  def local_batches(self, start: int):
    return pipeline.train_batches(self._source, global_batch_size=self._tc.batch_size, seed=self._seed,
                                  start_step=start, num_steps=self._total, transform=self._task.transform,
                                  keys=self._task.keys, num_threads=self._tc.num_data_threads)


class HostArraySteps(HostBatchSteps):
  """The arrays path with the arrays on the hosts: each step's rows (``Task.indices``) gathered there."""

  def __init__(self, train_step: Callable, state_sh, frozen, mesh, *, task, batch_size: int, total: int):
    super().__init__(train_step, state_sh, frozen, mesh)
    self._task, self._total = task, total
    self._per_process = batch_size // jax.process_count()

  def local_batches(self, start: int):
    p, b = jax.process_index(), self._per_process
    for step in range(start, self._total):
      idx = np.asarray(self._task.indices(step, 1))[0, p * b:(p + 1) * b]
      yield jax.tree.map(lambda x, i=idx: x[i], self._task.arrays)


class DeviceArraySteps:
  """The arrays path with the arrays on the devices: up to ``max_steps_per_call`` steps per call.

  Each call's index block keeps one shape ``[max_steps_per_call, batch]`` (unused rows zero) and the trip count is
  a traced value, so every call runs the same compiled body whatever its length.
  """

  def __init__(self, train_step: Callable, state_sh, frozen, mesh, *, task, batch_size: int, per_call: int):
    self.max_steps_per_call, self.description = per_call, f", up to {per_call} steps per call on device-resident data"
    self._indices, self._batch_size = task.indices, batch_size
    self._frozen, frozen_sh = _frozen_placed(frozen, mesh)
    self._arrays = shard_rows(task.arrays, mesh)
    self._repl, data_sh = sharding.replicated(mesh), sharding.data_sharded(mesh)
    rows_sh = jax.tree.map(lambda _: data_sh, self._arrays)
    self._fn = jax.jit(make_multi_step(train_step, gather_rows(mesh)),
                       in_shardings=(state_sh, frozen_sh, rows_sh, self._repl, self._repl),
                       out_shardings=(state_sh, self._repl), donate_argnums=(0,))

  def run(self, state, step: int, n: int):
    """Runs steps ``step + 1 .. step + n``; returns the metrics summed over them."""
    host = np.zeros((self.max_steps_per_call, self._batch_size), np.int32)  # fresh: a CPU device array may alias it
    host[:n] = np.asarray(self._indices(step, n))
    idx = jax.make_array_from_callback(host.shape, self._repl, lambda i: host[i])
    n_dev = jax.make_array_from_callback((), self._repl, lambda i: np.asarray(n, np.int32))
    return self._fn(state, self._frozen, self._arrays, idx, n_dev)


def make_runner(task, cfg, source, mesh, train_step: Callable, state_sh, per_call: int, total: int):
  """The step runner of ``task``'s data path (see the module docstring) for the stage config ``cfg``; ``per_call``
  is the steps per call on device-resident arrays (``train_lib.steps_per_call``)."""
  tc = cfg.train
  if task.arrays is None:
    return ExampleSteps(train_step, state_sh, task.frozen, mesh, task=task, source=source, tc=tc,
                        seed=int(cfg.seed), total=total)
  if not tc.arrays_on_device:
    return HostArraySteps(train_step, state_sh, task.frozen, mesh, task=task, batch_size=tc.batch_size, total=total)
  return DeviceArraySteps(train_step, state_sh, task.frozen, mesh, task=task, batch_size=tc.batch_size,
                          per_call=per_call)
