"""grain pipelines: random-access source → per-host slices of global batches → global ``jax.Array``s.

Training order is a pure function of (seed, step): global step ``s`` consists of the shuffled stream's positions
``[s·B, (s+1)·B)`` (each epoch reshuffled), and process ``p`` of ``P`` reads the contiguous slice
``[s·B + p·B/P, s·B + (p+1)·B/P)``. The iterator's whole state is therefore the step number, which is in the
checkpoint: a resumed run sees exactly the batches an uninterrupted run would have seen, and random augmentation
is seeded per global position so it does not depend on the host count or worker threads either.
"""

from typing import Callable, Iterator, Optional

import grain
import jax
import numpy as np

from fct_jax import sharding
from fct_jax.errors import FCTError


def _read_options(num_threads: int):
  return grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(2, 2 * num_threads))


def train_batches(source, *, global_batch_size: int, seed: int, start_step: int, num_steps: int,
                  transform: Callable, keys=("image", "label"), num_threads: int = 2,
                  process_index: Optional[int] = None, process_count: Optional[int] = None) -> Iterator[dict]:
  """Yields this process's numpy slice of each global training batch, for steps ``start_step..num_steps-1``.

  Args:
    source: random-access source (``len`` and ``[i]`` → dict).
    global_batch_size: B, summed over all processes.
    seed: shuffling and augmentation seed.
    transform: ``fn(example, rng) -> example`` applied per example.
    keys: which example fields to keep in the batch.
  """
  p = jax.process_index() if process_index is None else process_index
  n_proc = jax.process_count() if process_count is None else process_count
  if global_batch_size % n_proc:
    raise FCTError(f"batch size {global_batch_size} does not split over {n_proc} processes")
  b = global_batch_size // n_proc
  keys = tuple(keys)

  def select(ex):
    return {k: ex[k] for k in keys}

  stream = (grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
            .random_map(lambda ex, rng: select(transform(ex, rng)), seed=seed + 1))

  def position(i):  # local element index → global stream position
    step, j = divmod(i, b)
    return step * global_batch_size + p * b + j

  local = (grain.MapDataset.range(start_step * b, num_steps * b)
           .map(lambda i: stream[position(int(i))])
           .batch(b, drop_remainder=True))
  return iter(local.to_iter_dataset(_read_options(num_threads)))


def eval_batches(source, *, global_batch_size: int, transform: Callable, keys=("image", "label"),
                 num_threads: int = 2, process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[dict]:
  """Yields padded numpy slices of sequential global batches covering ``source`` once.

  Every process runs the same number of steps; the last global batch is padded by repeating element 0 and each
  batch carries ``mask`` (1.0 real, 0.0 padding). Global batch ``s`` covers positions ``[s·B, (s+1)·B)``, split
  contiguously over processes, so concatenating global batches restores the source order.
  """
  p = jax.process_index() if process_index is None else process_index
  n_proc = jax.process_count() if process_count is None else process_count
  b = global_batch_size // n_proc
  n = len(source)
  num_steps = -(-n // global_batch_size)
  keys = tuple(keys)

  def load(i):
    step, j = divmod(int(i), b)
    pos = step * global_batch_size + p * b + j
    ex = transform(source[pos if pos < n else 0])
    out = {k: ex[k] for k in keys}
    out["mask"] = np.float32(pos < n)
    return out

  ds = grain.MapDataset.range(num_steps * b).map(load).batch(b, drop_remainder=True)
  return iter(ds.to_iter_dataset(_read_options(num_threads)))


def to_global(local_batch, mesh):
  return sharding.host_to_global(local_batch, mesh)


def row_indices(num_rows: int, *, batch_size: int, seed: int):
  """``indices(start_step, num_steps) -> [num_steps, batch_size]`` (``train_lib.Task.indices``, for data held as
  arrays, e.g. the transformation's cached features): global step s takes positions ``[s·B, (s+1)·B)`` of a stream
  of per-epoch permutations of the ``num_rows`` rows (like :func:`train_batches`). A pure function of the step, so
  resume is exact."""
  perms = {}

  def perm(epoch):
    if epoch not in perms:
      if len(perms) > 2:
        perms.clear()
      perms[epoch] = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
    return perms[epoch]

  def indices(start_step, num_steps):
    pos = start_step * batch_size + np.arange(num_steps * batch_size, dtype=np.int64)
    epoch, within = pos // num_rows, pos % num_rows
    idx = np.empty(len(pos), np.int64)
    for e in np.unique(epoch):
      sel = epoch == e
      idx[sel] = perm(e)[within[sel]]
    return idx.reshape(num_steps, batch_size)

  return indices
