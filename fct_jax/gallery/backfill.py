"""FastFill's backfill of an upgraded gallery (Jaeckle et al., ICLR 2023): re-embed items with φ_new, most
uncertain first.

After an upgrade every stored vector is h(φ_old, ψ). Backfilling re-embeds items from their images with φ_new, a
budget at a time; FastFill's point is the *order*: items with the largest predicted uncertainty s = log σ² (stored by
the upgrade when h has an uncertainty head) first, so that retrieval approaches the new model's accuracy early.

Orders (:data:`ORDERS`): ``sigma`` (largest stored s first; the mean over s's dimensions when it is wider than 1;
ties: lower store position first) and ``random`` (a seeded permutation). Both come from
:func:`fct_jax.retrieval.backfill.backfill_order`, the function the evaluation's backfilling curves use, so a store
backfilled to a fraction f holds φ_new for exactly the items the curve's point f assumes. The oracle ``distance``
order (largest ‖φ_new − h‖ first) is not offered: it needs φ_new of every item, i.e. a full backfill first.

Versions: each step is a new, immutable version of the same store. It writes only the chunks that hold an item of
the step (read from the previous version, the step's rows replaced by φ_new, everything else — ids, ψ, s — copied)
and shares every other chunk with the version before it (``"at"`` in the manifest's chunk list). The order is fixed
by the first step, stored in its version (array ``order``, CRC-32 checked) and referenced by every later step; a
step backfills the next items of it. Items are re-embedded from the split the store was built from, indexed by the
stored ids exactly as :func:`fct_jax.gallery.build.build` assigned them (an id is a position in that split).

Commit protocol (as build and upgrade; docs/reliability.md): the version's name derives from its job (source
version and its manifest's hash, φ_new's fingerprint, order, number of items, data, split, embedding batch and
pass size); chunks are written
with a progress file each after their arrays landed; ``manifest.json`` is written last and makes the version
readable; replacing ``CURRENT`` makes it the default that ``search`` serves. A rerun of the same command resumes
(skips chunks with progress files), and a rerun after the manifest but before ``CURRENT`` only finishes the commit.
"""

import os
from typing import List, Optional

import jax
import numpy as np

from fct_jax import artifacts, sharding, writers
from fct_jax.data import sources
from fct_jax.errors import FCTError
from fct_jax.gallery import loader
from fct_jax.gallery import store as store_lib
from fct_jax.retrieval import backfill as backfill_lib

ORDERS = ("sigma", "random")
# Items per embedding pass (at least a chunk): each pass compiles once, and a killed run loses at most one pass.
GROUP_ITEMS = 8192


class _Take:
  """The items ``ids`` (positions) of a random-access source, in that order."""

  def __init__(self, source, ids: np.ndarray):
    self.source, self.ids = source, np.asarray(ids, np.int64)

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, i):
    return self.source[int(self.ids[int(i)])]


def build_record(store: store_lib.Store, version: store_lib.Version) -> Optional[dict]:
  """The job of the build a version descends from (its ``data`` and ``split``), followed through the source
  versions of the same store; None when the chain leaves the store (an upgrade written to another store)."""
  v, seen = version, set()
  while True:
    job = v.manifest.get("job", {})
    if job.get("op") == "build":
      return job
    src = job.get("source", {})
    if not src.get("version") or src["version"] in seen:
      return None
    seen.add(src["version"])
    try:
      v = store.open(src["version"])
    except FCTError:
      return None
    if store_lib.fingerprint(v.manifest) != src.get("manifest"):
      return None  # a version of the same name, but not the one this job read


def image_source(store: store_lib.Store, version: store_lib.Version, ctx: artifacts.Context,
                 split: Optional[str]):
  """``(source, data, split)``: the images the stored ids index — the split the gallery was built from.

  Taken from the build job of the version's chain when it is in this store, else from the build's old stage (its
  name is in the version's lineage) in the experiment. A ``split`` other than the build's is refused.
  """
  first = (version.manifest.get("lineage") or [{}])[0]
  job = build_record(store, version)
  if job is not None:
    data, built_split = job["data"], job["split"]
  else:
    if first.get("op") != "build" or not first.get("old"):
      raise FCTError(f"gallery version {version.name!r}: cannot tell which images its ids index (no build record "
                     "in its lineage)")
    data = artifacts.stage_config(ctx, first["old"], "gallery backfill").data.to_dict()
    built_split = first.get("split", "eval")
  if split is not None and split != built_split:
    raise FCTError(f"gallery version {version.name!r} was built from split {built_split!r}, not {split!r}: its ids "
                   "index that split")
  source, _ = sources.get_source(data, built_split)
  if len(source) != version.count:
    raise FCTError(f"split {built_split!r} has {len(source)} items but gallery version {version.name!r} holds "
                   f"{version.count}: not the data it was built from")
  return source, data, built_split


def compute_order(base: store_lib.Version, kind: str, seed: Optional[int]) -> np.ndarray:
  """The backfill order of ``base``'s items (a permutation of store positions): see the module docstring."""
  n = base.count
  if kind == "sigma":
    if not base.log_var_dim:
      raise FCTError(f"gallery version {base.name!r} stores no uncertainty s (upgraded by a plain h): --order sigma "
                     "needs an h trained with method='fastfill'; use --order random")
    log_var = np.concatenate([base.read_chunk(i, keys=[store_lib.LOG_VAR])[store_lib.LOG_VAR] for i in range(base.num_chunks)]
                             or [np.zeros((0, base.log_var_dim), np.float32)])
  else:
    log_var = None
  try:
    order = backfill_lib.backfill_order(np.zeros((n, 0), np.float32), None, kind, log_var=log_var, seed=seed or 0)
  except ValueError as e:
    raise FCTError(f"gallery version {base.name!r}: {e}") from e
  return np.asarray(order, np.int64)


def embedding_groups(chunks: List[int], count: dict, group_items: int) -> List[List[int]]:
  """The step's chunks in consecutive groups of at most ``group_items`` items (at least one chunk each): one
  embedding pass per group (fewer compilations than one per chunk). Fixed by the step alone — not by which chunks
  a killed run finished — so a resumed run embeds every item in the same batch as an uninterrupted one."""
  groups, cur, n = [], [], 0
  for i in chunks:
    if cur and n + count[i] > group_items:
      groups.append(cur)
      cur, n = [], 0
    cur.append(i)
    n += count[i]
  return groups + ([cur] if cur else [])


def step_size(n: int, *, budget: Optional[float], items: Optional[int]) -> int:
  """Items one step backfills: ``items``, or ⌊budget·n⌋ (at least 1; the evaluation curves' rounding)."""
  if (budget is None) == (items is None):
    raise FCTError("give exactly one of --budget (a fraction of the gallery) and --items (a count)")
  if items is not None:
    if items < 1:
      raise FCTError(f"--items must be at least 1, got {items}")
    return int(items)
  if not 0 < budget <= 1:
    raise FCTError(f"--budget must be a fraction in (0, 1], got {budget}")
  return max(1, int(np.floor(budget * n + 1e-9)))


def backfill(experiment_dir: str, store: store_lib.Store, *, version: Optional[str] = None, new: str = "new",
             split: Optional[str] = None, order: Optional[str] = None, seed: Optional[int] = None,
             budget: Optional[float] = None, items: Optional[int] = None, batch_size: Optional[int] = None,
             group_items: Optional[int] = None, mesh=None, progress: bool = True,
             stop_after_chunks: Optional[int] = None) -> Optional[store_lib.Version]:
  """Re-embeds the next items (in the backfill order) of an upgraded version with φ_new into a new version.

  Args:
    experiment_dir: the experiment workdir holding the backbone stage ``new``.
    store: the gallery store; the new version lands in it (it shares chunks with its source).
    version: the version to continue from (default: ``CURRENT``): an upgraded version (the first step) or a
      backfill version (the next step, in its recorded order).
    new: the backbone stage that re-embeds; it must be the model the version was upgraded to (fingerprint).
    split: the split the store was built from (default: the build's; another is refused).
    order: ``sigma`` or ``random`` (default: ``sigma`` on the first step, the recorded order later; a different
      one than recorded is refused).
    seed: seed of the ``random`` order (default 0; recorded).
    budget: fraction of the gallery to backfill in this step, in (0, 1]; or ``items``: a count. Clipped to the
      items left.
    batch_size: embedding batch (default: the new stage's eval batch size, rounded to the device count).
    group_items: items per embedding pass (default: a chunk, at least :data:`GROUP_ITEMS`). With ``batch_size``
      part of the job: they decide which items share a batch, so a rerun with other values starts afresh.
    mesh: the global ``data`` mesh (default: all devices).
    progress: print items/s and ETA.
    stop_after_chunks: test hook: return after this many new chunks without committing (as if killed).

  Returns:
    The committed version (also ``CURRENT``; the source itself when nothing is left), or None when stopped early
    or not process 0.
  """
  step_size(1, budget=budget, items=items)  # bad arguments are refused before anything is read
  if order is not None and order not in ORDERS:
    raise FCTError(f"unknown backfill order {order!r}; valid: {', '.join(ORDERS)} (the oracle 'distance' needs "
                   "φ_new of every item and is for the evaluation's curves only)")
  src = store.open(version)
  if (src.manifest.get("lineage") or [{}])[0].get("op") == "build_from_vectors":
    raise FCTError(f"gallery version {src.name!r} was built from stored vectors: backfill re-embeds images with an "
                   "fct_jax backbone stage; with your own model, embed the items to backfill yourself")
  ctx = artifacts.Context(workdir=os.path.abspath(experiment_dir))
  emb_model = loader.embedding_model(ctx, new, "gallery backfill")
  held = src.model.get("embedding", {})
  if held.get("fingerprint") != emb_model["fingerprint"]:
    raise FCTError(f"gallery version {src.name!r} holds vectors of model {held.get('stage')!r} "
                   f"({str(held.get('fingerprint'))[:12]}), not of {new!r} ({emb_model['fingerprint'][:12]}): "
                   f"backfilling re-embeds a gallery upgraded to {new!r} (gallery upgrade) with that model")
  record = src.backfill
  if record is None:  # the first step: the order is fixed now
    base, done = src, 0
    kind = order or "sigma"
    seed = (seed or 0) if kind == "random" else seed
  else:
    base, done = store.open(record["base"]), int(record["backfilled"])
    kind = record["order"]["kind"]
    if order is not None and order != kind:
      raise FCTError(f"gallery version {src.name!r} is being backfilled in {kind!r} order (fixed by its first step); "
                     f"to start a {order!r} order, pass --version {record['base']}")
    if kind == "random" and seed is not None and seed != record["order"]["seed"]:
      raise FCTError(f"gallery version {src.name!r} is backfilled in a random order of seed "
                     f"{record['order']['seed']}, not {seed}")
    seed = record["order"]["seed"]
  if kind == "sigma" and seed is not None:
    raise FCTError("--seed applies to --order random only (the sigma order is fixed by the stored s)")
  if kind == "sigma" and not base.log_var_dim:  # refused before any model or image is loaded
    raise FCTError(f"gallery version {base.name!r} stores no uncertainty s (upgraded by a plain h): --order sigma "
                   "needs an h trained with method='fastfill'; use --order random")
  m = min(step_size(src.count, budget=budget, items=items), src.count - done)
  if m == 0:
    if progress:
      print(f"[backfill] nothing left: all {src.count} items of version {src.name!r} hold {new!r}", flush=True)
    return src
  source, data, split = image_source(store, src, ctx, split)
  new_cfg = artifacts.stage_config(ctx, new, "gallery backfill")
  mesh = mesh or sharding.make_mesh()
  batch_size = batch_size or artifacts.eval_batch_size(new_cfg, mesh)
  group_items = group_items or max(src.chunk_size, GROUP_ITEMS)
  job = store_lib.canonical({
      "op": "backfill", "source": {"version": src.name, "manifest": store_lib.fingerprint(src.manifest)},
      "new": emb_model, "order": {"kind": kind, "seed": seed}, "items": m, "data": data, "split": split,
      "embedding": {"batch_size": batch_size, "group_items": group_items}})
  finished = store.find_job(job)
  if finished is not None:
    if jax.process_index() == 0 and store.current() == src.name:
      store.set_current(finished.name)  # killed between the manifest and CURRENT: finish the commit
    if progress:
      print(f"[backfill] already done: version {finished.name!r} of {store.root}", flush=True)
    return finished

  # The order: computed and recorded by the first step, read (checksums verified) by the later ones.
  name = f"backfill-{store_lib.fingerprint(job)[:12]}"
  if record is None:
    perm = compute_order(base, kind, seed)
  else:
    perm = src.read_aux("order")
  positions = perm[done:done + m]
  chunk_of = positions // src.chunk_size
  touched = np.unique(chunk_of)
  writer = store.begin(name, job, count=src.count, chunk_size=src.chunk_size, embedding_dim=src.embedding_dim,
                       side_info_dim=src.side_info_dim, dtype=src.dtype, log_var_dim=src.log_var_dim,
                       write_only=[int(i) for i in touched])
  p, n_proc = jax.process_index(), jax.process_count()
  if record is None:
    order_rec = writer.aux_done("order")
    if order_rec is None and p == 0:
      order_rec = writer.write_aux("order", perm)
  else:
    order_rec = src.manifest["aux"]["order"]

  module, variables, _ = artifacts.load_backbone(ctx, new, "gallery backfill")
  transform = artifacts.eval_transform(new_cfg)
  todo = [int(i) for i in touched if int(i) not in writer.done]
  if stop_after_chunks is not None:
    todo = todo[:stop_after_chunks]
  count = {int(i): int(c) for i, c in zip(*np.unique(chunk_of, return_counts=True))}
  left = sum(count[i] for i in todo)
  bar = writers.Progress(m, start=m - left, unit="items", prefix="[backfill] ") if progress else None
  if progress and writer.done:
    print(f"[backfill] resuming {writer.path}: {len(writer.done)}/{len(touched)} chunks already done", flush=True)
  finished_items = m - left
  todo_set = set(todo)
  pos_sorted = np.sort(positions)

  def rows_of(i):
    """Rows (within chunk i) of the step's items in chunk i, ascending."""
    start, stop = src.chunk_rows(i)
    return pos_sorted[np.searchsorted(pos_sorted, start):np.searchsorted(pos_sorted, stop)] - start

  for group in embedding_groups([int(i) for i in touched], count, group_items):
    if not todo_set.intersection(group):
      continue
    # The whole group is embedded even when a killed run wrote some of its chunks: every item is embedded in the
    # same batch, at the same row, as in an uninterrupted run, so the result is byte-identical.
    ids = []
    for i in group:  # only the ids here (checked): a group may span many chunks
      x = src.read_chunk(i, keys=("ids",))["ids"][rows_of(i)]
      if x.min() < 0 or x.max() >= len(source):
        raise FCTError(f"gallery version {src.name!r}: chunk {i} holds ids outside split {split!r} "
                       f"[0, {len(source)})")
      ids.append(x)
    # Every process takes part in every group's sharded pass (the mesh spans all hosts); one writes each chunk.
    emb = artifacts.embed(module, variables, _Take(source, np.concatenate(ids)), batch_size=batch_size, mesh=mesh,
                          transform=transform)
    artifacts.check_finite_embeddings(emb, f"φ_new ({new!r}) of gallery chunks {group[0]}–{group[-1]}")
    offset = 0
    for i in group:
      rows = rows_of(i)
      mine = emb[offset:offset + len(rows)]
      offset += len(rows)
      if i not in todo_set:
        continue
      if i % n_proc == p:
        c = src.read_chunk(i)
        out = np.array(c["embeddings"])
        out[rows] = mine.astype(out.dtype)
        writer.write_chunk(i, c["ids"], out, c["side_info"], c.get(store_lib.LOG_VAR))
      finished_items += len(rows)
      if bar:
        bar.update(finished_items)
  if stop_after_chunks is not None:
    return None
  sharding.barrier("gallery_backfill_written")
  if p != 0:
    return None
  if order_rec is None:
    order_rec = writer.aux_done("order")
  written = set(writer.to_write)
  shared = {i: {**e, "at": e.get("at", src.name)} for i, e in enumerate(src.manifest["chunks"]) if i not in written}
  steps = (record["steps"] if record else []) + [{"version": name, "items": m}]
  extra = {"backfill": {"base": base.name, "model": emb_model, "order": {"kind": kind, "seed": seed},
                        "backfilled": done + m, "count": src.count, "steps": steps, "split": split},
           "aux": {"order": order_rec}}
  lineage = list(src.manifest.get("lineage", [])) + [
      {"op": "backfill", "from_version": src.name, "from_manifest": job["source"]["manifest"], "model": new,
       "model_fingerprint": emb_model["fingerprint"], "order": kind, "items": m, "backfilled": done + m}]
  committed = writer.commit(model=src.model, lineage=lineage, inherited=shared, extra=extra)
  if progress:
    print(f"[backfill] committed version {committed.name!r}: {done + m}/{src.count} items hold {new!r} "
          f"({kind} order; {m} in this step, {len(touched)} chunk(s) rewritten) in {store.root}", flush=True)
  return committed


def describe(version: store_lib.Version) -> List[str]:
  """Lines for ``info``: the stored s and the backfill state of a version (none for a plain one)."""
  out = []
  b = version.backfill
  if version.log_var_dim:
    out.append(f"stores s = log σ² ({version.log_var_dim}-d, FastFill's uncertainty)"
               + ("" if b else ": backfill --order sigma available"))
  if b:
    o = b["order"]
    order = o["kind"] + (f" (seed {o['seed']})" if o["kind"] == "random" else "")
    out.append(f"backfilled {b['backfilled']}/{b['count']} items ({100 * b['backfilled'] / max(b['count'], 1):.1f}%) "
               f"with model {b['model']['stage']!r} {b['model']['fingerprint'][:12]} in {order} order, "
               f"{len(b['steps'])} step(s) since version {b['base']!r}")
  shared = version.shared_from()
  if shared:
    out.append(f"shares chunks with {', '.join(repr(s) for s in shared)}: delete none of them while this one is used")
  return out
