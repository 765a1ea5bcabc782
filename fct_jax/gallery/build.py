"""Build a gallery store at old time, chunk by chunk, resumably: embed a data set with φ_old (and ψ), or take
the embeddings another model already made (``--from-vectors``).

:func:`build`: embedding runs through :func:`fct_jax.train_lib.predict` (the same sharded, multi-host path the
stages use): every chunk is one sharded pass over the global ``data`` mesh, its outputs are replicated to all
processes, and process ``i mod P`` writes chunk i. Item ids are the positions in the split.

:func:`build_from_vectors`: the vectors of a vector set (:mod:`fct_jax.data.vectors`: ``old``, optional ``psi`` and
``id``) are streamed into a version, recorded as made by the models the user names, so that upgrade, search and
info work on it as on a built one.
"""

import collections
import concurrent.futures as cf
import os
from typing import Optional

import jax
import numpy as np

from fct_jax import artifacts, sharding, writers
from fct_jax.data import sources, vectors
from fct_jax.errors import FCTError
from fct_jax.gallery import loader
from fct_jax.gallery import store as store_lib


class _Slice:
  """Rows ``[start, stop)`` of a random-access source."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, i):
    return self.source[self.start + int(i)]


def parse_side_info(spec: str):
  """``"STAGE"`` (a side_info stage) or ``"none[:DIM]"`` (ψ = 0 of width DIM, default 0) → (kind, stage, dim)."""
  if spec == "none" or spec.startswith("none:"):
    dim = int(spec.partition(":")[2] or 0)
    return "none", "", dim
  return "trained", spec, None


def build(experiment_dir: str, dest: store_lib.Store, *, old: str = "old", side_info: str = "none",
          split: str = "eval", dtype: str = "float32", chunk_size: int = store_lib.DEFAULT_CHUNK,
          batch_size: Optional[int] = None, mesh=None, progress: bool = True,
          stop_after_chunks: Optional[int] = None) -> Optional[store_lib.Version]:
  """Embeds split ``split`` of the old stage's data with φ_old and ψ into a new version of ``dest``.

  Args:
    experiment_dir: the experiment workdir holding the finished stages.
    dest: the store to write (created if needed).
    old: the backbone stage that embeds the gallery.
    side_info: a side_info stage name, or ``none[:DIM]``.
    split: the split of the old stage's data config to store.
    dtype: storage dtype (float32, float16, bfloat16).
    chunk_size: items per chunk (the unit of resumption and of an upgrade's work).
    batch_size: embedding batch (default: the stage's eval batch size, rounded to the device count).
    mesh: the global ``data`` mesh (default: all devices).
    progress: print items/s and ETA.
    stop_after_chunks: test hook: return after this many new chunks without committing (as if killed).

  Returns:
    The committed version (process 0), else None.
  """
  ctx = artifacts.Context(workdir=os.path.abspath(experiment_dir))
  module, variables, old_cfg = artifacts.load_backbone(ctx, old, "gallery build")
  kind, side_stage, side_dim = parse_side_info(side_info)
  if kind == "none":
    psi = artifacts.zero_side_info(side_dim)
    side_model = loader.side_info_model(ctx, "none", "", side_dim, "gallery build")
  else:
    psi = artifacts.load_side_info(ctx, side_stage, "gallery build")
    side_model = loader.side_info_model(ctx, psi.method, side_stage, psi.dim, "gallery build")
  emb_model = loader.embedding_model(ctx, old, "gallery build")
  source, _ = sources.get_source(old_cfg.data, split)
  mesh = mesh or sharding.make_mesh()
  batch_size = batch_size or artifacts.eval_batch_size(old_cfg, mesh)
  n = len(source)
  job = {"op": "build", "old": emb_model, "side_info": side_model, "data": old_cfg.data.to_dict(), "split": split,
         "dtype": dtype, "chunk_size": chunk_size}
  job = store_lib.canonical(job)
  finished = dest.find_job(job)
  if finished is not None:
    if progress:
      print(f"[build] already done: version {finished.name!r} of {dest.root}", flush=True)
    return finished
  name = f"build-{store_lib.fingerprint(job)[:12]}"
  writer = dest.begin(name, job, count=n, chunk_size=chunk_size, embedding_dim=emb_model["dim"],
                      side_info_dim=psi.dim, dtype=dtype)
  p, n_proc = jax.process_index(), jax.process_count()
  todo = [i for i in range(writer.num_chunks) if i not in writer.done]
  if stop_after_chunks is not None:
    todo = todo[:stop_after_chunks]
  done = n - sum(writer.chunk_rows(i)[1] - writer.chunk_rows(i)[0] for i in todo)
  bar = writers.Progress(n, start=done, unit="items", prefix="[build] ") if progress else None
  transform = artifacts.eval_transform(old_cfg)
  for i in todo:
    start, stop = writer.chunk_rows(i)
    part = _Slice(source, start, stop)
    # Every process takes part in every chunk's sharded pass (the mesh spans all hosts); one writes it.
    emb = artifacts.embed(module, variables, part, batch_size=batch_size, mesh=mesh, transform=transform)
    side = psi.embed(part, batch_size=batch_size, mesh=mesh, transform=transform)
    artifacts.check_finite_embeddings(emb, f"gallery chunk {i} embeddings")
    if i % n_proc == p:
      writer.write_chunk(i, np.arange(start, stop, dtype=np.int64), emb, side)
    done += stop - start
    if bar:
      bar.update(done)
  if stop_after_chunks is not None:
    return None
  sharding.barrier("gallery_build_written")
  if p != 0:
    return None
  version = writer.commit(model={"embedding": emb_model, "side_info": side_model},
                          lineage=[{"op": "build", "old": old, "side_info": side_info, "split": split}])
  if progress:
    print(f"[build] committed version {version.name!r} ({n} items, {dtype}) in {dest.root}", flush=True)
  return version



def build_from_vectors(path: str, dest: store_lib.Store, *, old_model: str, side_model: Optional[str] = None,
                       dtype: str = "float32", chunk_size: int = store_lib.DEFAULT_CHUNK, progress: bool = True,
                       workers: int = 4, stop_after_chunks: Optional[int] = None) -> Optional[store_lib.Version]:
  """Stores the ``old`` (and ``psi``) vectors of a vector set as a new version of ``dest``, made by the named models.

  The version's ``model`` block is :func:`loader.vectors_embedding_model` (``vectors:OLD_MODEL``) and, with
  ``side_model``, :func:`loader.vectors_side_info_model` (else the ``none:0`` record of a build without ψ): a
  transformation trained on vectors of those model names upgrades it. Ids are the set's ``id`` field (or 0..N-1).

  The whole set is checked before anything is written (every row finite, ids unique: a one-line error names the
  file and row), then streamed chunk by chunk (``workers`` chunks in flight) through the store's
  :class:`~fct_jax.gallery.store.VersionWriter`: checksummed, and resumable like :func:`build` — the job records
  the file's path and cheap identity (sizes, mtimes, shapes, dtypes), so rerunning the same command resumes a killed
  run, and a changed file is a new job. One process writes (no model runs; this is I/O). The pre-write check reads
  the file once more: free for a memory-mapped ``.npy`` in the page cache, a second read for zarr or a bucket.

  Args:
    path: the vector set (``.npz``, a directory of ``.npy`` files or of zarr arrays; local or ``gs://``).
    dest: the store to write (created if needed).
    old_model: the name of the model that made ``old`` (the version's embedding model).
    side_model: the name of the model that made ``psi``; required iff the set holds ``psi``.
    dtype: storage dtype (float32, float16, bfloat16).
    chunk_size: items per chunk (the unit of resumption and of an upgrade's work).
    progress: print items/s and ETA.
    workers: chunks read and written at once.
    stop_after_chunks: test hook: return after this many new chunks without committing (as if killed).

  Returns:
    The committed version (None with ``stop_after_chunks``).
  """
  if not old_model:
    raise FCTError("build --from-vectors needs --old-model NAME: the model that made the vectors' 'old' field")
  vs = vectors.open_vectors(path, need=("old", "psi") if side_model else ("old",), what="vectors")
  if vs.has("psi") and not side_model:
    raise FCTError(f"vectors {vs.path} hold {vs.dim('psi')}-d side-information 'psi' but no --side-model was "
                   "given: name the model that made it (--side-model NAME), or remove psi to store none")
  emb_model = loader.vectors_embedding_model(old_model, vs.dim("old"))
  side_rec = (loader.vectors_side_info_model(side_model, vs.dim("psi")) if side_model
              else loader.side_info_model(None, "none", "", 0, "gallery build"))
  n = vs.num_rows
  job = store_lib.canonical({"op": "build_from_vectors", "vectors": vs.identity(), "old": emb_model,
                             "side_info": side_rec, "dtype": dtype, "chunk_size": chunk_size})
  finished = dest.find_job(job)
  if finished is not None:
    if progress:
      print(f"[build] already done: version {finished.name!r} of {dest.root}", flush=True)
    return finished
  # Checked whole before the first write, so a bad row leaves nothing behind.
  fields = ["old"] + (["psi"] if side_model else [])
  vectors.check_finite(vs, fields, chunk_rows=chunk_size)
  ids = vs.ids()
  writer = dest.begin(f"build-{store_lib.fingerprint(job)[:12]}", job, count=n, chunk_size=chunk_size,
                      embedding_dim=emb_model["dim"], side_info_dim=side_rec["dim"], dtype=dtype)
  todo = [i for i in range(writer.num_chunks) if i not in writer.done]
  if stop_after_chunks is not None:
    todo = todo[:stop_after_chunks]
  done = n - sum(writer.chunk_rows(i)[1] - writer.chunk_rows(i)[0] for i in todo)
  bar = writers.Progress(n, start=done, unit="items", prefix="[build] ") if progress else None

  def copy(i):
    start, stop = writer.chunk_rows(i)
    emb = vs.read("old", start, stop)
    side = vs.read("psi", start, stop) if side_model else np.zeros((stop - start, 0), np.float32)
    writer.write_chunk(i, ids[start:stop], emb, side)
    return stop - start

  # Chunks are independent (the writer is thread-safe for distinct chunks): ``workers`` of them in flight, so one
  # chunk's reads, CRC-32s and writes overlap another's wait for its writes to land; memory stays at a few chunks.
  with cf.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for k, i in enumerate(todo):
      pending.append(pool.submit(copy, i))
      while pending and (len(pending) >= workers or k == len(todo) - 1):
        done += pending.popleft().result()
        if bar:
          bar.update(done)
  if stop_after_chunks is not None:
    return None
  version = writer.commit(model={"embedding": emb_model, "side_info": side_rec},
                          lineage=[{"op": "build_from_vectors", "vectors": vs.path, "old_model": old_model,
                                    "side_model": side_model or ""}])
  if progress:
    print(f"[build] committed version {version.name!r} ({n} items from {vs.path}, {dtype}) in {dest.root}",
          flush=True)
  return version
