"""Streaming upgrade of a stored gallery: new embedding = h(old, ψ) (and ψ' = g(old, ψ) when g is present).

No image is read. Chunks flow through three overlapped stages:

  reader threads  ──►  main thread: device_put + jitted h (async dispatch)  ──►  writer threads
  (TensorStore read                                                            (device→host, cast, CRC-32,
   + CRC-32 check)                                                              TensorStore write, progress)

JAX dispatch is asynchronous, so the main thread queues chunk i+1 on the devices while writer threads still
wait for chunk i's result and write chunk i-1; reads run ``prefetch`` chunks ahead. Both queues are bounded, so
memory stays at a few chunks whatever the gallery size.

Sharding: each chunk is split over the ``data`` axis of a mesh of this process's devices (parameters
replicated); h is per-item, so no collective is needed. With several processes, process p upgrades chunks
i ≡ p (mod P) and process 0 commits once all progress files exist (shared storage, e.g. a bucket).

This module imports neither TensorFlow, grain nor ml_collections, so the benchmark runs where only jax is
installed; :mod:`fct_jax.gallery.loader` builds a :class:`Transform` from a transformation stage directory.
"""

import collections
import concurrent.futures as cf
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fct_jax import sharding, writers
from fct_jax.errors import FCTError
from fct_jax.gallery import store as store_lib


@dataclasses.dataclass
class Transform:
  """What an upgrade applies, and which model versions it maps between.

  Attributes:
    name: a label (the transformation stage name); names the new version.
    apply: ``apply(variables, old [B, old_dim] f32, side [B, side_dim] f32) -> (new [B, new_dim], side_next)``,
      jit-able; ``side_next`` is ``[B, side_out_dim]`` from g, or None when ψ is carried over unchanged. With
      ``sigma_dim`` > 0 it returns a third output, ``log_var [B, sigma_dim]`` (FastFill's s = log σ²).
    variables: h's (and g's) variables (host or device pytrees).
    old_dim, side_dim, new_dim: widths h expects and returns.
    side_out_dim: width of g's output; None without g.
    sigma_dim: width of h's uncertainty head (0: plain h); the upgraded version then stores s beside each vector.
    fingerprint: identifies the transformation's weights and config.
    expects: the ``model`` block a source store must have (see :func:`store.make_manifest`).
    produces: the ``model`` block of the upgraded store.
  """
  name: str
  apply: Callable
  variables: Any
  old_dim: int
  side_dim: int
  new_dim: int
  fingerprint: str
  expects: dict
  produces: dict
  side_out_dim: Optional[int] = None
  sigma_dim: int = 0


def check_compatible(version: store_lib.Version, t: Transform):
  """Raises a one-line :class:`FCTError` unless ``version`` holds what ``t`` was trained on."""
  if version.embedding_dim != t.old_dim or version.side_info_dim != t.side_dim:
    raise FCTError(f"gallery {version.path} holds {version.embedding_dim}-d embeddings and "
                   f"{version.side_info_dim}-d side-info, but transformation {t.name!r} expects {t.old_dim}-d and "
                   f"{t.side_dim}-d")
  got, want = version.model.get("embedding", {}), t.expects.get("embedding", {})
  if got.get("fingerprint") != want.get("fingerprint"):
    raise FCTError(f"gallery {version.path} was embedded by model {got.get('stage')!r} "
                   f"({str(got.get('fingerprint'))[:12]}), but transformation {t.name!r} maps from "
                   f"{want.get('stage')!r} ({str(want.get('fingerprint'))[:12]}): different model versions")
  got, want = version.model.get("side_info", {}), t.expects.get("side_info", {})
  if got.get("fingerprint") != want.get("fingerprint"):
    raise FCTError(f"gallery {version.path} holds side-information {got.get('kind')!r} from "
                   f"{got.get('stage')!r} ({str(got.get('fingerprint'))[:12]}), but transformation {t.name!r} "
                   f"was trained with {want.get('kind')!r} from {want.get('stage')!r} "
                   f"({str(want.get('fingerprint'))[:12]})")


@functools.lru_cache(maxsize=16)
def _step(apply: Callable, mesh: Mesh, out_dtype) -> Callable:
  repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P(sharding.DATA_AXIS))

  def step(variables, old, side):
    new, side_next, *log_var = apply(variables, old.astype(jnp.float32), side.astype(jnp.float32))
    out = (new.astype(out_dtype), (None if side_next is None else side_next.astype(out_dtype)))
    return out + tuple(x.astype(jnp.float32) for x in log_var)  # s stays float32 whatever the storage dtype

  return jax.jit(step, in_shardings=(repl, data, data), out_shardings=data)


def make_step(t: Transform, mesh: Mesh, out_dtype) -> Callable:
  """The jitted chunk step: ``(variables, old [C, d], side [C, ds]) -> (new [C, d_new], side_next or None)``, and
  ``log_var [C, sigma_dim]`` float32 as a third output when ``t.sigma_dim`` > 0.

  Inputs arrive in the storage dtype and are cast to float32 on the device (half the host→device traffic for
  16-bit stores); outputs are cast to the storage dtype on the device for the same reason.
  """
  # Cached per (apply, mesh, dtype): repeated upgrades with one transformation reuse the compiled step.
  return _step(t.apply, mesh, np.dtype(out_dtype))


def job_of(version: store_lib.Version, t: Transform, dtype: str, chunk_size: int) -> dict:
  """What identifies an upgrade run: a rerun with the same job resumes (or finds the committed result)."""
  return {"op": "upgrade", "source": {"version": version.name, "manifest": store_lib.fingerprint(version.manifest)},
          "transformation": {"name": t.name, "fingerprint": t.fingerprint}, "dtype": dtype,
          "chunk_size": chunk_size}


def upgrade(source: store_lib.Version, t: Transform, dest: store_lib.Store, *, dtype: Optional[str] = None,
            mesh: Optional[Mesh] = None, prefetch: int = 2, write_depth: int = 2, progress: bool = True,
            stop_after_chunks: Optional[int] = None) -> Optional[store_lib.Version]:
  """Applies ``t`` to every item of ``source`` and commits the result as a new version of ``dest``.

  When ``t`` has an uncertainty head (``t.sigma_dim`` > 0), the new version also stores each item's s = log σ² from
  the same pass of h (array ``log_var``, float32), which orders a later FastFill backfill
  (:mod:`fct_jax.gallery.backfill`). A plain h's version is byte-identical to what it was before s existed.

  Args:
    source: the committed version to read (left untouched).
    t: the transformation (see :func:`fct_jax.gallery.loader.load_transformation`).
    dest: the store to write to (may be the source's own store: the new version lands beside the old one).
    dtype: storage dtype of the new version (default: the source's).
    mesh: a ``data`` mesh of local devices (default: all of them; h is per-item, so no cross-host collective).
    prefetch: chunks read ahead.
    write_depth: chunks in flight between dispatch and the end of their write.
    progress: print items/s and ETA.
    stop_after_chunks: test hook: return after this many chunks without committing (as if killed).

  Returns:
    The committed new version (also ``dest``'s CURRENT), or None if stopped early / not process 0.
  """
  check_compatible(source, t)
  dtype = dtype or source.dtype
  if dtype not in store_lib.DTYPES:
    raise FCTError(f"unknown storage dtype {dtype!r}; valid: {', '.join(store_lib.DTYPES)}")
  job = job_of(source, t, dtype, source.chunk_size)
  finished = dest.find_job(job)
  if finished is not None:
    if progress:
      print(f"[upgrade] already done: version {finished.name!r} of {dest.root}", flush=True)
    return finished
  side_out_dim = t.side_dim if t.side_out_dim is None else t.side_out_dim
  writer = dest.begin(f"{t.name}-{store_lib.fingerprint(job)[:12]}", job, count=source.count,
                      chunk_size=source.chunk_size, embedding_dim=t.new_dim, side_info_dim=side_out_dim, dtype=dtype,
                      log_var_dim=t.sigma_dim)
  p, n_proc = jax.process_index(), jax.process_count()
  todo = [i for i in range(source.num_chunks) if i % n_proc == p and i not in writer.done]
  if stop_after_chunks is not None:
    todo = todo[:stop_after_chunks]
  mesh = mesh or sharding.make_mesh(jax.local_devices())
  step = make_step(t, mesh, store_lib.DTYPES[dtype])
  _run_chunks(source, writer, todo, step, jax.device_put(t.variables, NamedSharding(mesh, P())), mesh,
              prefetch=prefetch, write_depth=write_depth, progress=progress)
  if stop_after_chunks is not None:
    return None
  sharding.barrier("gallery_upgrade_written")  # every process's chunks land before process 0 commits
  if p != 0:
    return None
  lineage = list(source.manifest.get("lineage", [])) + [
      {"op": "upgrade", "from_version": source.name, "from_manifest": job["source"]["manifest"],
       "transformation": t.name, "transformation_fingerprint": t.fingerprint}]
  version = writer.commit(model=t.produces, lineage=lineage)
  if progress:
    print(f"[upgrade] committed version {version.name!r} ({version.count} items, {dtype}) in {dest.root}",
          flush=True)
  return version


def _pad(x: np.ndarray, rows: int) -> np.ndarray:
  """``x`` zero-padded to ``rows`` rows (every chunk one shape: one compilation, bitwise-stable output)."""
  if x.shape[0] == rows:
    return x
  out = np.zeros((rows,) + x.shape[1:], x.dtype)
  out[:x.shape[0]] = x
  return out


def _run_chunks(source, writer, todo, step, variables, mesh, *, prefetch: int, write_depth: int, progress: bool):
  """Reads, transforms and writes the chunks ``todo``: reads up to ``prefetch`` ahead, up to ``write_depth`` chunks
  between dispatch and landing on disk (see the module docstring)."""
  n_proc = jax.process_count()
  pad_to = -(-source.chunk_size // mesh.size) * mesh.size
  data_sh = NamedSharding(mesh, P(sharding.DATA_AXIS))
  items_todo = sum(source.chunk_rows(i)[1] - source.chunk_rows(i)[0] for i in todo)
  done = source.count - items_todo if n_proc == 1 else 0
  bar = writers.Progress(source.count if n_proc == 1 else items_todo, start=done, unit="items",
                         prefix="[upgrade] ") if progress else None
  if progress and writer.done:
    print(f"[upgrade] resuming {writer.path}: {len(writer.done)}/{writer.num_chunks} chunks already done",
          flush=True)

  def finish(i, c, outs):
    n = c["ids"].shape[0]
    new = np.asarray(outs[0])[:n]  # waits for this chunk's computation only
    # Without g, ψ is carried over as stored (cast on the host if the dtype changes); with g it is g's output.
    side = c["side_info"] if outs[1] is None else np.asarray(outs[1])[:n]
    log_var = np.asarray(outs[2])[:n] if len(outs) > 2 else None  # FastFill's s, from the same pass of h
    writer.write_chunk(i, c["ids"], new, side, log_var)
    return n

  with cf.ThreadPoolExecutor(max(1, prefetch), thread_name_prefix="gallery-read") as rpool, \
      cf.ThreadPoolExecutor(max(1, write_depth), thread_name_prefix="gallery-write") as wpool:
    reads = collections.deque(rpool.submit(source.read_chunk, i) for i in todo[:prefetch])
    writes = collections.deque()
    for k, i in enumerate(todo):
      c = reads.popleft().result()
      if k + prefetch < len(todo):
        reads.append(rpool.submit(source.read_chunk, todo[k + prefetch]))
      old = jax.device_put(_pad(c["embeddings"], pad_to), data_sh)
      side = jax.device_put(_pad(c["side_info"], pad_to), data_sh)
      outs = step(variables, old, side)  # async: returns before the devices finish
      writes.append(wpool.submit(finish, i, c, outs))
      while len(writes) > write_depth or (writes and writes[0].done()):
        done += writes.popleft().result()
        if bar:
          bar.update(done)
    while writes:
      done += writes.popleft().result()
      if bar:
        bar.update(done)
