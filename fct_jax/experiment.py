"""The experiment plan: stages in order, each in its own sub-workdir, finished stages skipped on rerun.

An experiment config (see ``configs/demo.py``) has ``experiment`` (its name), ``plan`` (stage names in order), ``stages`` (one
stage config each, with a ``kind``) and ``stage`` (``""`` = the whole plan, or one stage name). A single-stage
config (``--config=...:stage=old``) carries that stage's fields at the top level instead, so that
``--config.train.epochs=3`` overrides it directly.

The experiment workdir holds ``experiment.json`` (the experiment's name) and one directory per stage. A stage
directory whose ``config.json`` differs from the current stage config belongs to a different experiment and is
refused rather than overwritten; only bookkeeping fields (logging and checkpoint cadence) may change on resume.
"""

import json
from typing import Optional

import jax
import ml_collections
from etils import epath

from fct_jax import checkpoint, sharding
from fct_jax.errors import FCTError
from fct_jax.stages import STAGE_KINDS
from fct_jax.stages.common import Context

# Fields that do not change what a stage computes; they may differ between a run and its resume.
BOOKKEEPING = ("train.log_every_steps", "train.checkpoint_every_steps", "train.eval_every_steps",
               "train.keep_checkpoints", "train.num_data_threads", "eval_batch_size")


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
  """JSON round trip (tuples → lists) minus bookkeeping fields, flattened."""
  flat = _flatten(json.loads(json.dumps(cfg_dict)))
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


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, stop_at_step: Optional[int] = None):
  """Runs the plan (or the one selected stage) in ``workdir``; returns the names of the stages that ran.

  Args:
    config: experiment config (plan or single stage).
    workdir: experiment directory (local path; created if missing).
    mesh: device mesh (default: all devices).
    stop_at_step: stop each trained stage at this step as if preempted (tests).
  """
  todo = stage_configs(config)
  for name, scfg in todo:  # validate everything before touching the disk
    if scfg.get("kind") not in STAGE_KINDS:
      raise FCTError(f"stage {name!r} has unknown kind {scfg.get('kind')!r}; valid: {', '.join(STAGE_KINDS)}")
  workdir = checkpoint.abspath(workdir)
  _check_experiment(config, workdir)
  for name, scfg in todo:
    _check_stage_config(name, scfg, checkpoint.join(workdir, name))
  sharding.barrier("fct_experiment_checked")  # every process checks before any process writes
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(checkpoint.join(workdir, "experiment.json"), {"experiment": config.experiment})
  sharding.barrier("fct_experiment_start")

  ctx = Context(workdir=workdir, mesh=mesh, stop_at_step=stop_at_step)
  ran = []
  for name, scfg in todo:
    stage_dir = checkpoint.join(workdir, name)
    if checkpoint.is_done(stage_dir):
      print(f"[{name}] finished earlier in {stage_dir}; skipping", flush=True)
      continue
    if jax.process_index() == 0:
      epath.Path(stage_dir).mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(checkpoint.join(stage_dir, "config.json"), scfg.to_dict())
    sharding.barrier(f"fct_{name}_start")
    print(f"[{name}] running stage kind {scfg.kind!r} in {stage_dir}", flush=True)
    finished = STAGE_KINDS[scfg.kind](scfg, stage_dir, ctx)
    if not finished:
      print(f"[{name}] stopped before the end; rerun the same command to resume", flush=True)
      return ran
    checkpoint.mark_done(stage_dir)
    sharding.barrier(f"fct_{name}_done")
    ran.append(name)
  return ran
