"""Checkpoints (orbax) and the saved stage outputs.

A stage's workdir holds:
  ``config.json``   the stage config that built it (the next stage rebuilds models from it);
  ``checkpoints/``  orbax ``CheckpointManager`` steps of the full train state, for resuming;
  ``model/``        the final model variables only ({params, batch_stats}), read by later stages;
  ``DONE``          written last: a stage without it is unfinished and is resumed, never read downstream;
  ``imported.json`` only in a stage filled from PyTorch weights instead of trained: the file and its hash.
Orbax writes each step to a temporary directory and renames it when complete, so a half-written checkpoint is
never picked up.

Paths may be local or cloud URLs (``gs://…``, through ``etils.epath``; GCS needs ``gcsfs`` or TensorFlow).
"""

import json
import os
from typing import Any, Optional

import jax
from etils import epath
import numpy as np
import orbax.checkpoint as ocp

from fct_jax.errors import FCTError

DONE = "DONE"
IMPORTED = "imported.json"  # in a stage directory filled from PyTorch weights (torch_stages): where they came from


def abspath(path: str) -> str:
  """Absolute local path; URLs (``gs://…``) unchanged."""
  return os.path.abspath(path) if is_local(path) else path


def is_local(path: str) -> bool:
  """True for a local path, False for a URL (``gs://…``)."""
  return "://" not in str(path)


def join(*parts: str) -> str:
  return str(epath.Path(parts[0]).joinpath(*[str(p) for p in parts[1:]]))


def exists(path: str) -> bool:
  return epath.Path(path).exists()


def manager(directory: str, *, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(abspath(directory), options=options)


def save_state(mngr: ocp.CheckpointManager, step: int, state: Any, *, force: bool = False):
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_state(mngr: ocp.CheckpointManager, abstract_state: Any, step: Optional[int] = None):
  """Restores into the structure/shardings of ``abstract_state`` (a pytree of ``jax.ShapeDtypeStruct``)."""
  step = mngr.latest_step() if step is None else step
  try:
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # orbax raises several types for unreadable or mismatching checkpoints
    raise FCTError(f"cannot restore checkpoint step {step} in {mngr.directory}: {type(e).__name__}: "
                   f"{str(e).splitlines()[0] if str(e) else ''}") from e


def save_model(stage_dir: str, variables: Any):
  """Writes the final model variables (replicated arrays) to ``stage_dir/model``."""
  path = abspath(join(stage_dir, "model"))
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(path, variables, force=True)
  finally:
    ckptr.close()  # waits for the save, then ends the checkpointer's background threads


def load_model(stage_dir: str) -> Any:
  """Reads ``stage_dir/model`` as a pytree of numpy arrays in host memory.

  Restored as numpy whatever mesh saved it (a model trained on 2 hosts × 4 devices loads on one CPU), and the
  caller places it on its own mesh.
  """
  path = abspath(join(stage_dir, "model"))
  if not epath.Path(path).is_dir():
    raise FCTError(f"no saved model in {stage_dir} (stage not finished?)")
  ckptr = ocp.PyTreeCheckpointer()
  try:
    meta = ckptr.metadata(path)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
                                is_leaf=lambda x: hasattr(x, "shape"))
    return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:
    raise FCTError(f"cannot read model in {path}: {type(e).__name__}") from e
  finally:
    ckptr.close()


def write_text(path: str, text: str):
  """Writes a text file atomically (temp file + rename) from process 0."""
  if jax.process_index() != 0:
    return
  p = epath.Path(path)
  tmp = p.parent / (p.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(p)


def write_json(path: str, obj: Any):
  """Writes JSON atomically from process 0."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json(path: str) -> Any:
  return json.loads(epath.Path(path).read_text())


def is_done(stage_dir: str) -> bool:
  return epath.Path(stage_dir, DONE).exists()


def mark_done(stage_dir: str):
  write_text(join(stage_dir, DONE), "ok\n")
