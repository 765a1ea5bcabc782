"""The experiment plan: stages in order, each in its own sub-workdir, finished stages skipped on rerun.

An experiment config (see ``configs/demo.py``) has ``experiment`` (its name), ``plan`` (stage names in order),
``stages`` (one stage config each, with a ``kind``) and ``stage`` (``""`` = the whole plan, or one stage name,
selected with ``--config=...:stage=old``). Either way a field is overridden as ``--config.stages.NAME.FIELD=VALUE``.
Stage configs are resolved (:func:`fct_jax.config_schema.resolve`: every field, defaults filled) before anything
runs.

The experiment workdir holds ``experiment.json`` (the experiment's name) and one directory per stage. A stage
directory whose ``config.json`` (the resolved stage config) differs from the current one belongs to a different
experiment and is refused rather than overwritten; only bookkeeping fields (logging and checkpoint cadence) may
change on resume.
"""

import json
from typing import Optional

import jax
import ml_collections
from etils import epath

from fct_jax import checkpoint, config_schema, report, sharding, train_lib
from fct_jax.artifacts import Context
from fct_jax.data import sizes, sources
from fct_jax.errors import FCTError
from fct_jax.retrieval.summary import EvaluationResults
from fct_jax.stages import STAGE_KINDS, backbone

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


def _normalise(cfg_dict):
  """The resolved config (a saved one gets the defaults of fields added since), JSON round trip (tuples → lists),
  flattened, minus bookkeeping fields."""
  flat = _flatten(json.loads(json.dumps(config_schema.resolve(cfg_dict).to_dict())))
  return {k: v for k, v in flat.items() if k not in BOOKKEEPING}


def stage_configs(config):
  """``[(name, resolved stage_config)]`` to run, in order: the whole plan, or the stage ``config.stage`` selects."""
  if "stages" not in config:
    raise FCTError("config has no stages: an experiment config is a plan (see configs/common.experiment)")
  plan = list(config.plan)
  unknown = [s for s in plan if s not in config.stages]
  if unknown:
    raise FCTError(f"plan names unknown stage(s) {unknown}; stages: {', '.join(config.stages)}")
  if config.stage:
    if config.stage not in config.stages:
      raise FCTError(f"unknown stage {config.stage!r}; valid: {', '.join(plan)}")
    plan = [config.stage]
  return [(s, config_schema.resolve(config.stages[s])) for s in plan]


def check_workdir(config, workdir: str):
  """One-line error unless ``workdir`` is missing, empty, or holds this experiment (its ``experiment.json``)."""
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


def check_stage_config(name: str, stage_cfg, stage_dir: str):
  """One-line error when ``stage_dir`` was run with another config (bookkeeping fields aside; see the module)."""
  path = checkpoint.join(stage_dir, "config.json")
  if not checkpoint.exists(path):
    return
  try:
    saved = _normalise(checkpoint.read_json(path))
  except config_schema.ConfigError as e:
    raise FCTError(f"workdir stage {name!r} was run with a config this version cannot read ({e}); use a new "
                   "--workdir") from e
  now = _normalise(stage_cfg.to_dict())
  diff = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
  if diff:
    k = diff[0]
    more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
    raise FCTError(f"workdir stage {name!r} was run with a different config: {k}={saved.get(k, '<absent>')!r} "
                   f"there, {now.get(k, '<absent>')!r} now{more}; use a new --workdir")


def validate_stages(todo):
  """Checks every stage config that can be checked without the disk: known kind, head and loss consistent,
  train.steps_per_call usable, a paper table the report knows."""
  for name, scfg in todo:
    if scfg.kind not in STAGE_KINDS:  # a kind of the schema without a stage implementation
      raise FCTError(f"stage {name!r} has unknown kind {scfg.kind!r}; valid: {', '.join(STAGE_KINDS)}")
    if "paper_table" in scfg and scfg.paper_table and scfg.paper_table not in report.PAPER_TABLES:
      raise FCTError(f"stage {name!r}: unknown paper_table {scfg.paper_table!r}; valid: "
                     f"{', '.join(report.PAPER_TABLES)}")
    classifier = scfg.kind == "backbone" or (scfg.kind == "side_info"
                                             and scfg.method in config_schema.CLASSIFIER_METHODS)
    if classifier:
      backbone.check_head_matches_loss(scfg)  # an ArcFace head needs the ArcFace loss, and vice versa
    if "train" in scfg:
      device_arrays = (scfg.kind == "transformation" and scfg.feature_mode == "cached"
                       and bool(scfg.train.arrays_on_device))
      train_lib.check_steps_per_call(name, scfg.train, device_arrays)


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, stop_at_step: Optional[int] = None):
  """Runs the plan (or the one selected stage) in ``workdir``; returns the names of the stages that ran.

  Args:
    config: experiment config (a plan; ``config.stage`` may select one stage).
    workdir: experiment directory (local path; created if missing).
    mesh: device mesh (default: all devices).
    stop_at_step: stop each trained stage at this step as if preempted (tests).
  """
  todo = stage_configs(config)
  validate_stages(todo)  # before touching the disk
  workdir = checkpoint.abspath(workdir)
  check_workdir(config, workdir)
  for name, scfg in todo:
    check_stage_config(name, scfg, checkpoint.join(workdir, name))
  sharding.barrier("fct_experiment_checked")  # every process checks before any process writes
  open_workdir(config, workdir)

  ctx = Context(workdir=workdir, mesh=mesh, stop_at_step=stop_at_step)
  ran = []
  for name, scfg in todo:
    stage_dir = checkpoint.join(workdir, name)
    if checkpoint.is_done(stage_dir):
      print(f"[{name}] finished earlier in {stage_dir}; skipping", flush=True)
      continue
    open_stage(name, scfg, stage_dir)
    print(f"[{name}] running stage kind {scfg.kind!r} in {stage_dir}", flush=True)
    finished = STAGE_KINDS[scfg.kind](scfg, stage_dir, ctx)
    if isinstance(finished, EvaluationResults):  # an evaluation stage: the experiment's report (process 0 writes)
      report.write(workdir, finished, scfg)
    if not finished:
      print(f"[{name}] stopped before the end; rerun the same command to resume", flush=True)
      return ran
    checkpoint.mark_done(stage_dir)
    sharding.barrier(f"fct_{name}_done")
    ran.append(name)
  return ran


def open_workdir(config, workdir: str):
  """Creates the experiment workdir (if missing) and its ``experiment.json``; all processes return together."""
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(checkpoint.join(workdir, "experiment.json"), {"experiment": config.experiment})
  sharding.barrier("fct_experiment_start")


def open_stage(name: str, scfg, stage_dir: str):
  """Creates a stage directory with the ``config.json`` that built it (the resolved stage config, exactly); all
  processes return together."""
  if jax.process_index() == 0:
    epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(checkpoint.join(stage_dir, "config.json"), scfg.to_dict())
  sharding.barrier(f"fct_{name}_start")


# ---------------------------------------------------------------------------------------------------- dry run

def _stage_state(stage_dir: str) -> str:
  if checkpoint.is_done(stage_dir):
    imported = checkpoint.join(stage_dir, checkpoint.IMPORTED)
    if checkpoint.exists(imported):
      return f"finished: imported from {checkpoint.read_json(imported).get('source')} (skipped)"
    return "finished (skipped)"
  ckpts = epath.Path(stage_dir) / "checkpoints"
  if ckpts.is_dir() and any(ckpts.iterdir()):
    return "started (resumes from its last checkpoint)"
  return "to run"


def _config_lines(scfg) -> str:
  """The resolved stage config as indented ``key = value`` lines (every field, defaults included), and the input
  normalisation its dataset implies (a property of the dataset, not a config field)."""
  flat = _flatten(scfg.to_dict())
  lines = [f"       {k} = {v!r}" for k, v in flat.items()]
  spec = sources.get_image_spec(scfg.data)
  lines.append(f"       (data normalisation: mean {tuple(spec.mean)}, std {tuple(spec.std)}, resize {spec.resize})")
  return "\n     config:\n" + "\n".join(lines)


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> list:
  """Prints the plan without training, creating anything or reading data; returns one dict per stage.

  For each stage in order: its name, kind and state in ``workdir`` (finished / started / to run); for training
  stages the split, its size (see :func:`sizes.split_size`) and the steps per epoch, total steps, epochs and batch the
  run would use; for evaluation the evaluation split's size; then the stage's resolved config, every field (what
  its ``config.json`` will hold), and its dataset's input normalisation. A workdir or stage the real run would
  refuse is reported, not raised.
  """
  todo = stage_configs(config)
  validate_stages(todo)
  workdir = checkpoint.abspath(workdir)
  print(f"dry run: experiment {config.experiment!r}, {len(todo)} stage(s), workdir {workdir} "
        f"({'exists' if epath.Path(workdir).exists() else 'not created yet'}); nothing is trained or written")
  try:
    check_workdir(config, workdir)
  except FCTError as e:
    print(f"  the run would stop here: {e}")
  plan = []
  for i, (name, scfg) in enumerate(todo, 1):
    stage_dir = checkpoint.join(workdir, name)
    state = _stage_state(stage_dir)
    try:
      check_stage_config(name, scfg, stage_dir)
    except FCTError as e:
      state = f"refused: {e}"
    row = {"stage": name, "kind": scfg.kind, "state": state}
    line = f"{i}. {name} [{scfg.kind}] {state}"
    if "data" in scfg and "split" in scfg:
      n, note = sizes.split_size(scfg.data, scfg.split)
      row.update(split=scfg.split, num_examples=n, size_note=note)
      size = f"{n:,} examples ({note})" if n is not None else note
      line += f"\n     data {scfg.data.name}:{scfg.split}: {size}"
      if "train" in scfg:
        tc = scfg.train
        try:  # an unknown size (None): steps per epoch unknown, the total only when train.steps fixes it
          spe, total = train_lib.resolve_steps(tc, n)
        except FCTError:  # fewer examples than one batch (noted below): shown, the run would stop there
          spe, total = n // tc.batch_size, train_lib.resolve_steps(tc, None).total
        row.update(batch_size=int(tc.batch_size), epochs=float(tc.epochs), steps_per_epoch=spe, total_steps=total)
        dur = f"{tc.steps} steps (fixed)" if tc.steps > 0 else f"{tc.epochs:g} epochs"
        line += (f"\n     train: batch {tc.batch_size}, {dur} → "
                 f"{f'{spe:,}' if spe is not None else '?'} steps/epoch, "
                 f"{f'{total:,}' if total is not None else '?'} steps")
        if spe == 0:
          line += " (the split is smaller than one batch: the run would stop with an error)"
      if scfg.kind == "transformation":
        side = scfg.side_info
        line += (f"\n     from {scfg.old} → {scfg.new}, side-info "
                 f"{side.kind}{' (' + side.stage + ')' if side.stage else ''}, "
                 f"features {scfg.feature_mode}")
      if scfg.kind == "evaluation":
        compare = ", ".join(scfg.compare_transformations)
        line += (f"\n     h from {scfg.transformation}" + (f"; compared: {compare}" if compare else "")
                 + f"; report: results.md, results.json, plots in {workdir}")
    line += _config_lines(scfg)
    print(line, flush=True)
    plan.append(row)
  return plan
