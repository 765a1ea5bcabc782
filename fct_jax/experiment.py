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

A multi-seed plan (``seeds`` = N > 1, an experiment-level field: ``--config.seeds=3``) runs the whole plan once per
seed set, each in its own experiment workdir ``WORKDIR/seed_<i>/`` (resumable, finished seed sets skipped), and
then writes the combined report (``fct_jax/report/seeds.py``) into ``WORKDIR``. Seed set i adds
:data:`SEED_OFFSET` · i to every stage's ``seed`` (initialisation, data order, augmentation, cached views); the data
blocks (datasets, evaluation set) are unchanged. Seed set 0 is the plan as written, so ``seed_0`` reproduces a
single-seed run.
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

# Seed set i of a multi-seed plan adds SEED_OFFSET * i to every stage's seed (far from the plans' own 1…30).
SEED_OFFSET = 1000

# Fields that do not change what a stage computes; they may differ between a run and its resume (``orderings``: what
# the multi-seed report checks, not what the evaluation computes).
BOOKKEEPING = ("train.log_every_steps", "train.checkpoint_every_steps", "train.eval_every_steps",
               "train.keep_checkpoints", "train.num_data_threads", "train.steps_per_call", "train.arrays_on_device",
               "eval_batch_size", "orderings")


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
    if "paper_table" in scfg:
      try:
        report.check_table(scfg.paper_table)
      except FCTError as e:
        raise FCTError(f"stage {name!r}: {e}") from e
    classifier = scfg.kind == "backbone" or (scfg.kind == "side_info"
                                             and scfg.method in config_schema.CLASSIFIER_METHODS)
    if classifier:
      backbone.check_head_matches_loss(scfg)  # an ArcFace head needs the ArcFace loss, and vice versa
    if "train" in scfg:
      device_arrays = (scfg.kind == "transformation" and scfg.feature_mode == "cached"
                       and bool(scfg.train.arrays_on_device))
      train_lib.check_steps_per_call(name, scfg.train, device_arrays)
    for ordering in scfg.orderings if "orderings" in scfg else ():
      report.parse_ordering(ordering)


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, stop_at_step: Optional[int] = None):
  """Runs the plan (or the one selected stage) in ``workdir``; returns the names of the stages that ran.

  Args:
    config: experiment config (a plan; ``config.stage`` may select one stage).
    workdir: experiment directory (local path; created if missing).
    mesh: device mesh (default: all devices).
    stop_at_step: stop each trained stage at this step as if preempted (tests).
  """
  if num_seeds(config) > 1:
    return run_seeds(config, workdir, mesh=mesh, stop_at_step=stop_at_step)
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
      report.write(workdir, finished, scfg, config.experiment)
    if not finished:
      print(f"[{name}] stopped before the end; rerun the same command to resume", flush=True)
      return ran
    checkpoint.mark_done(stage_dir)
    sharding.barrier(f"fct_{name}_done")
    ran.append(name)
  return ran


# ---------------------------------------------------------------------------------------------------- seed sets

def num_seeds(config) -> int:
  """The plan's number of seed sets (``config.seeds``); a one-line error unless it is a positive integer."""
  n = config.seeds
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise FCTError(f"seeds must be a positive integer (seed sets to run), not {n!r}")
  return n


def seed_set(config, i: int) -> ml_collections.ConfigDict:
  """The single-seed plan of seed set ``i``: every stage's ``seed`` + :data:`SEED_OFFSET` · i (set 0: the plan's
  own seeds), ``seeds`` = 1; the data blocks are untouched, so every seed set sees the same data."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.seeds = 1
  for stage in out.stages.values():
    if "seed" in stage:
      stage.seed = int(stage.seed) + SEED_OFFSET * i
  return out


def seed_dir(workdir: str, i: int) -> str:
  return checkpoint.join(workdir, f"seed_{i}")


def _finished(config, workdir: str) -> bool:
  return all(checkpoint.is_done(checkpoint.join(workdir, name)) for name, _ in stage_configs(config))


def run_seeds(config, workdir: str, *, mesh=None, stop_at_step: Optional[int] = None) -> list:
  """:func:`run` of a multi-seed plan: each seed set in ``WORKDIR/seed_<i>/``, then the combined report.

  Every seed set's workdir and stage configs are checked before anything is written. A seed set stopped before
  its end (preemption) ends the call; the rerun resumes it. Returns ``"seed_<i>/<stage>"`` for the stages that ran.
  """
  n = num_seeds(config)
  sets = [seed_set(config, i) for i in range(n)]
  workdir = checkpoint.abspath(workdir)
  check_workdir(config, workdir)
  for i, cfg in enumerate(sets):
    validate_stages(stage_configs(cfg))
    check_workdir(cfg, seed_dir(workdir, i))
    for name, scfg in stage_configs(cfg):
      check_stage_config(name, scfg, checkpoint.join(seed_dir(workdir, i), name))
  sharding.barrier("fct_seeds_checked")
  open_workdir(config, workdir)
  ran = []
  for i, cfg in enumerate(sets):
    sub = seed_dir(workdir, i)
    if _finished(cfg, sub):
      print(f"[seed_{i}] finished earlier in {sub}; skipping", flush=True)
      continue
    print(f"[seed_{i}] seed set {i + 1} of {n} (stage seeds + {SEED_OFFSET * i}) in {sub}", flush=True)
    ran += [f"seed_{i}/{name}" for name in run(cfg, sub, mesh=mesh, stop_at_step=stop_at_step)]
    if not _finished(cfg, sub):
      return ran
  write_combined_report(config, workdir)
  return ran


def write_combined_report(config, workdir: str):
  """The combined report of every seed set's ``results.json`` (process 0 writes), with the orderings of the plan's
  evaluation stages; skipped (with a note) while a seed set has no report, e.g. a plan run one stage at a time."""
  dirs = [f"seed_{i}" for i in range(num_seeds(config))]
  missing = [d for d in dirs if not checkpoint.exists(checkpoint.join(workdir, d, report.RESULTS_JSON))]
  if missing:
    print(f"[report] no combined report yet: {', '.join(missing)} has no {report.RESULTS_JSON}", flush=True)
    return
  resolved = [config_schema.resolve(config.stages[s]) for s in config.plan]
  orderings = [o for scfg in resolved if "orderings" in scfg for o in scfg.orderings]
  if jax.process_index() == 0:
    report.write_seeds(workdir, dirs, orderings)
  sharding.barrier("fct_seeds_report")


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
  if scfg.data.name == "vectors":
    lines.append("       (data: stored vectors, no images)")
  else:
    spec = sources.get_image_spec(scfg.data)
    lines.append(f"       (data normalisation: mean {tuple(spec.mean)}, std {tuple(spec.std)}, resize {spec.resize})")
  return "\n     config:\n" + "\n".join(lines)


def dry_run(config: ml_collections.ConfigDict, workdir: str) -> list:
  """Prints the plan without training, creating anything or reading data; returns one dict per stage.

  For each stage in order: its name, kind and state in ``workdir`` (finished / started / to run); for training
  stages the split, its size (see :func:`sizes.split_size`) and the steps per epoch, total steps, epochs and batch the
  run would use; for evaluation the evaluation split's size; then the stage's resolved config, every field (what
  its ``config.json`` will hold), and its dataset's input normalisation. A workdir or stage the real run would
  refuse is reported, not raised. A multi-seed plan prints how many seed sets run where, then each seed set's plan
  in its ``seed_<i>/`` (the resolved configs of seed set 0 only: the others differ in the stages' ``seed``); its
  rows carry ``seed_dir``.
  """
  n = num_seeds(config)
  workdir = checkpoint.abspath(workdir)
  if n == 1:
    return _dry_run_one(config, workdir, full=True)
  print(f"dry run: {n} seed sets of experiment {config.experiment!r}, each a full plan in {workdir}/seed_<i>/ "
        f"(i = 0…{n - 1}; stage seeds + {SEED_OFFSET}·i, seed_0 = the plan's own seeds), then the combined report "
        f"(mean ± sample sd over seeds, orderings) in {workdir}")
  _print_refusal(config, workdir)
  plan = []
  for i in range(n):
    rows = _dry_run_one(seed_set(config, i), seed_dir(workdir, i), full=i == 0)
    plan += [dict(r, seed_dir=f"seed_{i}") for r in rows]
  return plan


def _print_refusal(config, workdir: str):
  """What the real run would say of ``workdir`` (:func:`check_workdir`), printed rather than raised."""
  try:
    check_workdir(config, workdir)
  except FCTError as e:
    print(f"  the run would stop here: {e}")


def _dry_run_one(config, workdir: str, *, full: bool) -> list:
  """:func:`dry_run` of a single-seed plan; ``full``: with every stage's resolved config."""
  todo = stage_configs(config)
  validate_stages(todo)
  print(f"dry run: experiment {config.experiment!r}, {len(todo)} stage(s), workdir {workdir} "
        f"({'exists' if epath.Path(workdir).exists() else 'not created yet'}); nothing is trained or written")
  _print_refusal(config, workdir)
  plan = []
  for i, (name, scfg) in enumerate(todo, 1):
    row, line = _dry_run_stage(i, name, scfg, workdir)
    print(line + (_config_lines(scfg) if full else ""), flush=True)
    plan.append(row)
  return plan


def _dry_run_stage(i: int, name: str, scfg, workdir: str) -> tuple[dict, str]:
  """One stage of the dry run: its row and its printed lines (without the resolved config)."""
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
      line += _dry_run_train(scfg.train, n, row)
    if scfg.kind == "transformation":
      side = scfg.side_info
      origin = (f"stored vectors {scfg.data[scfg.split]}" if scfg.data.name == "vectors"
                else f"{scfg.old} → {scfg.new}")
      line += (f"\n     from {origin}, side-info {side.kind}{' (' + side.stage + ')' if side.stage else ''}, "
               f"method {scfg.method}, features {scfg.feature_mode}")
    if scfg.kind == "evaluation":
      compare = ", ".join(scfg.compare_transformations)
      line += (f"\n     h from {scfg.transformation}" + (f"; compared: {compare}" if compare else "")
               + f"; report: results.md, results.json, plots in {workdir}")
  return row, line


def _dry_run_train(tc, n, row: dict) -> str:
  """The dry run's training line (batch, duration, steps); fills ``row``'s step counts."""
  try:  # an unknown size (None): steps per epoch unknown, the total only when train.steps fixes it
    spe, total = train_lib.resolve_steps(tc, n)
  except FCTError:  # fewer examples than one batch (noted below): shown, the run would stop there
    spe, total = n // tc.batch_size, train_lib.resolve_steps(tc, None).total
  row.update(batch_size=int(tc.batch_size), epochs=float(tc.epochs), steps_per_epoch=spe, total_steps=total)
  dur = f"{tc.steps} steps (fixed)" if tc.steps > 0 else f"{tc.epochs:g} epochs"
  line = (f"\n     train: batch {tc.batch_size}, {dur} → "
          f"{f'{spe:,}' if spe is not None else '?'} steps/epoch, "
          f"{f'{total:,}' if total is not None else '?'} steps")
  if spe == 0:
    line += " (the split is smaller than one batch: the run would stop with an error)"
  return line
