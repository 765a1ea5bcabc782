"""The experiment plan: stages in order, each in its own sub-workdir, finished stages skipped on rerun.

An experiment config (see ``configs/demo.py``) has ``experiment`` (its name), ``plan`` (stage names in order), ``stages`` (one
stage config each, with a ``kind``) and ``stage`` (``""`` = the whole plan, or one stage name). A single-stage
config (``--config=...:stage=old``) carries that stage's fields at the top level instead, so that
``--config.train.epochs=3`` overrides it directly.

The experiment workdir holds ``experiment.json`` (the experiment's name) and one directory per stage. A stage
directory whose ``config.json`` differs from the current stage config belongs to a different experiment and is
refused rather than overwritten; only bookkeeping fields (logging and checkpoint cadence) may change on resume.
"""

import hashlib
import json
import math
from typing import Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from fct_jax import checkpoint, sharding, torch_import, train_lib
from fct_jax.errors import FCTError
from fct_jax.stages import STAGE_KINDS, backbone, side_info, transformation
from fct_jax.stages.common import Context

# Fields that do not change what a stage computes; they may differ between a run and its resume.
BOOKKEEPING = ("train.log_every_steps", "train.checkpoint_every_steps", "train.eval_every_steps",
               "train.keep_checkpoints", "train.num_data_threads", "train.steps_per_call", "train.arrays_on_device",
               "eval_batch_size")


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


# Fields added to the stage configs after workdirs existed, with the value their absence meant: a stage saved before
# (no such key in its config.json) still matches a config that spells the default out.
ADDED_DEFAULTS = {"loss.kind": "softmax", "loss.arcface_scale": 64.0, "loss.arcface_margin": 0.5,
                  "model.head": "linear", "input_norm": "none"}


def _normalise(cfg_dict):
  """JSON round trip (tuples → lists) minus bookkeeping fields, flattened, :data:`ADDED_DEFAULTS` filled in."""
  flat = {**ADDED_DEFAULTS, **_flatten(json.loads(json.dumps(cfg_dict)))}
  return {k: v for k, v in flat.items() if k not in BOOKKEEPING}


def stage_configs(config):
  """``[(name, stage_config)]`` to run, in order, for a plan config or a single-stage config."""
  if "stages" in config:
    plan = list(config.plan)
    unknown = [s for s in plan if s not in config.stages]
    if unknown:
      raise FCTError(f"plan names unknown stage(s) {unknown}; stages: {', '.join(config.stages)}")
    if config.get("stage"):
      if config.stage not in config.stages:
        raise FCTError(f"unknown stage {config.stage!r}; valid: {', '.join(plan)}")
      plan = [config.stage]
    return [(s, config.stages[s]) for s in plan]
  if not config.get("stage"):
    raise FCTError("config has neither a plan (stages) nor a stage name")
  own = {k: v for k, v in config.to_dict().items() if k not in ("experiment", "stage")}
  return [(config.stage, ml_collections.ConfigDict(own))]


def _check_experiment(config, workdir: str):
  marker = checkpoint.join(workdir, "experiment.json")
  wd = epath.Path(workdir)
  if epath.Path(marker).exists():
    try:
      held = checkpoint.read_json(marker).get("experiment")
    except (OSError, ValueError, AttributeError) as e:
      raise FCTError(f"{marker} is unreadable ({type(e).__name__}); is this an fct_jax workdir?") from e
    if held != config.experiment:
      raise FCTError(f"workdir {workdir} holds experiment {held!r}, not {config.experiment!r}; "
                     "choose another --workdir")
  elif wd.is_dir() and any(wd.iterdir()):
    raise FCTError(f"workdir {workdir} is not empty and is not an fct_jax experiment; choose another --workdir")


def _check_stage_config(name: str, stage_cfg, stage_dir: str):
  path = checkpoint.join(stage_dir, "config.json")
  if not checkpoint.exists(path):
    return
  saved, now = _normalise(checkpoint.read_json(path)), _normalise(stage_cfg.to_dict())
  diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
  if diff:
    k = diff[0]
    more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
    raise FCTError(f"workdir stage {name!r} was run with a different config: {k}={saved.get(k, '<absent>')!r} "
                   f"there, {now.get(k, '<absent>')!r} now{more}; use a new --workdir")


def _validate_stages(todo):
  """Checks every stage config that can be checked without the disk: known kind, head and loss consistent,
  train.steps_per_call usable."""
  for name, scfg in todo:
    if scfg.get("kind") not in STAGE_KINDS:
      raise FCTError(f"stage {name!r} has unknown kind {scfg.get('kind')!r}; valid: {', '.join(STAGE_KINDS)}")
    if scfg.kind == "backbone" or (scfg.kind == "side_info" and scfg.get("method") in side_info.CLASSIFIER_METHODS):
      backbone.check_head_matches_loss(scfg)  # an ArcFace head needs the ArcFace loss, and vice versa
    if "train" in scfg:
      device_arrays = (scfg.kind == "transformation" and transformation.feature_mode(scfg) == "cached"
                       and bool(scfg.train.get("arrays_on_device", True)))
      train_lib.check_steps_per_call(name, scfg.train, device_arrays)


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, stop_at_step: Optional[int] = None):
  """Runs the plan (or the one selected stage) in ``workdir``; returns the names of the stages that ran.

  Args:
    config: experiment config (plan or single stage).
    workdir: experiment directory (local path; created if missing).
    mesh: device mesh (default: all devices).
    stop_at_step: stop each trained stage at this step as if preempted (tests).
  """
  todo = stage_configs(config)
  _validate_stages(todo)  # before touching the disk
  workdir = checkpoint.abspath(workdir)
  _check_experiment(config, workdir)
  for name, scfg in todo:
    _check_stage_config(name, scfg, checkpoint.join(workdir, name))
  sharding.barrier("fct_experiment_checked")  # every process checks before any process writes
  _open_workdir(config, workdir)

  ctx = Context(workdir=workdir, mesh=mesh, stop_at_step=stop_at_step)
  ran = []
  for name, scfg in todo:
    stage_dir = checkpoint.join(workdir, name)
    if checkpoint.is_done(stage_dir):
      print(f"[{name}] finished earlier in {stage_dir}; skipping", flush=True)
      continue
    _open_stage(name, scfg, stage_dir)
    print(f"[{name}] running stage kind {scfg.kind!r} in {stage_dir}", flush=True)
    finished = STAGE_KINDS[scfg.kind](scfg, stage_dir, ctx)
    if not finished:
      print(f"[{name}] stopped before the end; rerun the same command to resume", flush=True)
      return ran
    checkpoint.mark_done(stage_dir)
    sharding.barrier(f"fct_{name}_done")
    ran.append(name)
  return ran


def _open_workdir(config, workdir: str):
  """Creates the experiment workdir (if missing) and its ``experiment.json``; all processes return together."""
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(checkpoint.join(workdir, "experiment.json"), {"experiment": config.experiment})
  sharding.barrier("fct_experiment_start")


def _open_stage(name: str, scfg, stage_dir: str):
  """Creates a stage directory with the ``config.json`` that built it; all processes return together."""
  if jax.process_index() == 0:
    epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(checkpoint.join(stage_dir, "config.json"), scfg.to_dict())
  sharding.barrier(f"fct_{name}_start")


def _single_stage(config, what: str):
  """``(name, stage_config)`` of the one stage a config selects, in a single-process run; else a one-line error."""
  todo = stage_configs(config)
  if len(todo) != 1 or "stages" in config and not config.get("stage"):
    raise FCTError(f"{what} one stage: select it with --config=FILE:stage=NAME")
  if jax.process_count() > 1:
    raise FCTError("run this in a single process (it reads and writes one stage)")
  return todo[0]


IMPORTED = "imported.json"  # in a stage directory filled by import_stage: where its weights came from


def import_stage(config: ml_collections.ConfigDict, workdir: str, path: str, *, prefix: Optional[str] = None,
                 allow_unused: bool = False) -> dict:
  """Fills the one selected stage from a PyTorch checkpoint instead of training it (:mod:`fct_jax.torch_import`).

  The stage directory gets what training would leave (``config.json``, ``model/``, the finished marker) plus
  ``imported.json`` (the file, its SHA-256, the tensors used and left out); later runs of the plan skip it and
  read it like a trained stage. Everything is checked before anything is written: an unfinished or finished
  stage directory is refused, as is a checkpoint that does not fit the stage config's model.

  Args:
    config: experiment config with one stage selected (``--config=...:stage=NAME``) or a single-stage config.
    workdir: experiment directory (created if missing); a transformation stage needs its upstream stages there.
    path: the checkpoint (TorchScript, ``torch.save`` zip or ``.npz``; see ``torch_import.read_state_dict``).
    prefix: the model's tensor-name prefix in the checkpoint when it holds several models.
    allow_unused: import even though some of the checkpoint's tensors have no place in the model.

  Returns:
    the ``imported.json`` record.
  """
  name, scfg = _single_stage(config, "an import fills")
  _validate_stages([(name, scfg)])
  workdir = checkpoint.abspath(workdir)
  stage_dir = checkpoint.join(workdir, name)
  _check_experiment(config, workdir)
  if checkpoint.exists(stage_dir):
    what = "finished" if checkpoint.is_done(stage_dir) else "started"
    raise FCTError(f"stage {name!r} in {workdir} is {what} already ({stage_dir}); nothing was imported")
  variables, info = torch_import.stage_variables(name, scfg, Context(workdir=workdir), path, prefix=prefix,
                                                 allow_unused=allow_unused)
  record = {"source": checkpoint.abspath(path), "sha256": _sha256(path), **info}
  _open_workdir(config, workdir)
  _open_stage(name, scfg, stage_dir)
  checkpoint.save_model(stage_dir, variables)
  checkpoint.write_json(checkpoint.join(stage_dir, IMPORTED), record)
  checkpoint.mark_done(stage_dir)
  return record


def export_stage(config: ml_collections.ConfigDict, workdir: str, out: str, *, linear_as_conv: bool = True) -> int:
  """Writes the selected finished stage's network as a PyTorch state dict in an ``.npz`` file.

  The names and layouts are ml-fct's (``torch_import.from_flax``): load it with
  ``model.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(out).items()})`` into ml-fct's ResNet or
  ``MLP_BN_SIDE_PROJECTION`` of the same widths (``linear_as_conv=False``: torchvision's Linear classifier).
  For a SimCLR stage that is the encoder (ψ). ``out`` must not exist.

  Returns:
    the number of tensors written.
  """
  name, scfg = _single_stage(config, "an export writes")
  workdir = checkpoint.abspath(workdir)
  stage_dir = checkpoint.join(workdir, name)
  if not checkpoint.is_done(stage_dir):
    raise FCTError(f"stage {name!r} is not finished in {workdir}; nothing to export")
  _check_stage_config(name, scfg, stage_dir)
  if not str(out).endswith(".npz"):
    raise FCTError(f"export to a .npz file, not {out}")
  if epath.Path(out).exists():
    raise FCTError(f"{out} exists; choose another path (nothing was overwritten)")
  state = torch_import.stage_state_dict(name, scfg, lambda: checkpoint.load_model(stage_dir),
                                        linear_as_conv=linear_as_conv)
  tmp = epath.Path(str(out)[:-len(".npz")] + ".tmp.npz")
  with tmp.open("wb") as f:
    np.savez(f, **state)
  tmp.rename(out)
  return len(state)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------- dry run

# Split sizes known without reading a dataset: TFDS split sizes of the prepared datasets, and the class-filtered
# counts we know (ImageNet's first 500 classes, counted once; CIFAR-100 has 500 training images per class).
# Anything else is counted from the label index when the data is prepared, so a dry run cannot know it.
KNOWN_SPLIT_SIZES = {
    ("imagenet2012", "train"): 1_281_167, ("imagenet2012", "validation"): 50_000,
    ("places365_small", "train"): 1_803_460, ("places365_small", "validation"): 36_500,
    ("cifar100", "train"): 50_000, ("cifar100", "test"): 10_000,
    ("vggface2", "train"): 3_141_890, ("vggface2", "test"): 169_396,  # the VGGFace2 release (8631 / 500 subjects)
}
KNOWN_FIRST_CLASSES = {("imagenet2012", 500): 640_542, **{("cifar100", k): 500 * k for k in range(1, 101)}}
UNKNOWN = "unknown (not prepared)"


def split_size(data_cfg, split: str):
  """``(num_examples or None, note)`` of a split, from the config and known sizes only: no data is read.

  The shapes demo's sizes are config fields; digits' come from scikit-learn's bundled labels (a 14 KB array, no
  images); TFDS datasets use :data:`KNOWN_SPLIT_SIZES` / :data:`KNOWN_FIRST_CLASSES`; ``runlocal``'s mock data
  has ``mock_num_examples`` per split with random labels, so a class subset keeps about its share.
  """
  from fct_jax.data import shapes, sources  # pylint: disable=g-import-not-at-top
  name = data_cfg.get("name")
  m = sources.TRAIN_K.match(split)
  if name == "shapes":
    sizes = {"old_train": "num_old_train", "new_train": "num_new_train", "eval": "num_eval"}
    if split in sizes:
      return int(data_cfg[sizes[split]]), "config"
    if m:  # the first K shapes of new_train
      pairs = shapes.balanced_pairs(int(data_cfg["num_new_train"]), len(shapes.SHAPES))
      return int((pairs // len(shapes.COLOURS) < int(m.group(1))).sum()), "config"
    return None, f"unknown split {split!r}"
  if name == "digits":
    try:
      from sklearn import datasets as skd  # pylint: disable=g-import-not-at-top
    except ImportError:
      return None, "unknown (needs scikit-learn)"
    labels = skd.load_digits().target
    n_eval = int(data_cfg.get("num_eval", 497))
    if split == "eval":
      return n_eval, "scikit-learn digits"
    perm = np.random.default_rng(int(data_cfg.get("seed", 0))).permutation(len(labels))
    rest = labels[perm[:len(perm) - n_eval]]
    k = int(data_cfg.get("old_classes", 5)) if split == "old_train" else 10
    return int((rest < k).sum()), "scikit-learn digits"
  if name not in sources.TFDS_DATASETS:
    return None, f"unknown dataset {name!r}"
  spec = sources.TFDS_DATASETS[name]
  tfds_name = (data_cfg.get("tfds_name", "") or spec.tfds_name).split(":")[0]
  if split == "eval":
    k = None
  elif split in ("old_train", "new_train") or m:
    k = (int(data_cfg.get("old_classes", 0) or spec.old_classes) if split == "old_train"
         else int(m.group(1)) if m else spec.num_classes)
  else:
    return None, f"unknown split {split!r}"
  mock = int(data_cfg.get("mock_num_examples", 0) or 0)
  if mock:
    # Mock labels are uniform over all classes: a subset of k classes keeps about k/num_classes of them.
    share = 1.0 if k is None else k / spec.num_classes
    return max(1, round(mock * share)), "mock data, random labels: approximate"
  if k is None:
    total = KNOWN_SPLIT_SIZES.get((tfds_name, spec.eval_split))
    per_class = int(data_cfg.get("eval_per_class", spec.eval_per_class) or 0)
    if per_class and total is not None:
      # Every VGGFace2 test subject has more than 50 images, so the subsample is exactly 50 per subject.
      return 500 * per_class if name == "vggface2" else None, f"{per_class} per class of tfds {spec.eval_split}"
    return total, f"tfds {tfds_name} {spec.eval_split}" if total else UNKNOWN
  if k == spec.num_classes:
    total = KNOWN_SPLIT_SIZES.get((tfds_name, spec.train_split))
    return total, f"tfds {tfds_name} {spec.train_split}" if total else UNKNOWN
  n = KNOWN_FIRST_CLASSES.get((tfds_name, k))
  return n, f"first {k} classes of tfds {tfds_name} {spec.train_split}" if n else UNKNOWN


def _stage_state(stage_dir: str) -> str:
  if checkpoint.is_done(stage_dir):
    imported = checkpoint.join(stage_dir, IMPORTED)
    if checkpoint.exists(imported):
      return f"finished: imported from {checkpoint.read_json(imported).get('source')} (skipped)"
    return "finished (skipped)"
  ckpts = epath.Path(stage_dir) / "checkpoints"
  if ckpts.is_dir() and any(ckpts.iterdir()):
    return "started (resumes from its last checkpoint)"
  return "to run"


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> list:
  """Prints the plan without training, creating anything or reading data; returns one dict per stage.

  For each stage in order: its name, kind and state in ``workdir`` (finished / started / to run); for training
  stages the split, its size (see :func:`split_size`) and the steps per epoch, total steps, epochs and batch the
  run would use; for evaluation the evaluation split's size. A workdir or stage the real run would refuse is
  reported, not raised.
  """
  todo = stage_configs(config)
  _validate_stages(todo)
  workdir = checkpoint.abspath(workdir)
  experiment = config.get("experiment", "")
  print(f"dry run: experiment {experiment!r}, {len(todo)} stage(s), workdir {workdir} "
        f"({'exists' if epath.Path(workdir).exists() else 'not created yet'}); nothing is trained or written")
  try:
    _check_experiment(config, workdir)
  except FCTError as e:
    print(f"  the run would stop here: {e}")
  plan = []
  for i, (name, scfg) in enumerate(todo, 1):
    stage_dir = checkpoint.join(workdir, name)
    state = _stage_state(stage_dir)
    try:
      _check_stage_config(name, scfg, stage_dir)
    except FCTError as e:
      state = f"refused: {e}"
    row = {"stage": name, "kind": scfg.kind, "state": state}
    line = f"{i}. {name} [{scfg.kind}] {state}"
    if "data" in scfg and "split" in scfg:
      n, note = split_size(scfg.data, scfg.split)
      row.update(split=scfg.split, num_examples=n, size_note=note)
      size = f"{n:,} examples ({note})" if n is not None else note
      line += f"\n     data {scfg.data.name}:{scfg.split}: {size}"
      tc = scfg.get("train")
      if tc is not None:
        spe = n // tc.batch_size if n is not None else None
        if tc.get("steps", 0) > 0:
          total = int(tc.steps)
        elif spe:
          total = int(math.ceil(tc.epochs * spe))
        else:
          total = None
        row.update(batch_size=int(tc.batch_size), epochs=float(tc.epochs), steps_per_epoch=spe, total_steps=total)
        dur = f"{tc.steps} steps (fixed)" if tc.get("steps", 0) > 0 else f"{tc.epochs:g} epochs"
        line += (f"\n     train: batch {tc.batch_size}, {dur} → "
                 f"{f'{spe:,}' if spe is not None else '?'} steps/epoch, "
                 f"{f'{total:,}' if total is not None else '?'} steps")
        if spe == 0:
          line += " (the split is smaller than one batch: the run would stop with an error)"
      if scfg.kind == "transformation":
        side = scfg.get("side_info", {})
        line += (f"\n     from {scfg.get('old', 'old')} → {scfg.get('new', 'new')}, side-info "
                 f"{side.get('kind', 'none')}{' (' + side.get('stage') + ')' if side.get('stage') else ''}, "
                 f"features {transformation.feature_mode(scfg)}")  # checked by _validate_stages
      if scfg.kind == "evaluation":
        compare = ", ".join(scfg.get("compare_transformations", ()))
        line += (f"\n     h from {scfg.get('transformation')}" + (f"; compared: {compare}" if compare else "")
                 + f"; report: results.md, results.json, plots in {workdir}")
    print(line, flush=True)
    plan.append(row)
  return plan
