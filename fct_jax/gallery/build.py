"""Build a gallery store: embed a data set with φ_old (and ψ) at old time, chunk by chunk, resumably.

Embedding runs through :func:`fct_jax.train_lib.predict` (the same sharded, multi-host path the stages use):
every chunk is one sharded pass over the global ``data`` mesh, its outputs are replicated to all processes, and
process ``i mod P`` writes chunk i. Item ids are the positions in the split.
"""

import os
from typing import Optional

import jax
import numpy as np

from fct_jax import artifacts, sharding, writers
from fct_jax.data import sources
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

