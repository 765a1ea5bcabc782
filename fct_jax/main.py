r"""Command-line entry point.

  python -m fct_jax.main --config=configs/demo.py --workdir=/tmp/fct_demo
  python -m fct_jax.main --config=configs/demo.py:stage=old --workdir=/tmp/fct_demo \
      --config.stages.old.train.epochs=3         # one stage, with an override
  python -m fct_jax.main --config=configs/imagenet.py --workdir=/tmp/fct_imagenet --dry_run   # the plan only
  python -m fct_jax.main --config=configs/imagenet.py:stage=side_info --workdir=/tmp/fct_imagenet \
      --import_torch=imagenet_500_simclr.pt      # a stage from PyTorch weights (ml-fct's) instead of training
  python -m fct_jax.main --config=configs/imagenet.py:stage=transformation --workdir=/tmp/fct_imagenet \
      --export_torch=h.npz                       # a finished stage as a PyTorch state dict (ml-fct's names)

``--config`` takes a Python config file and an optional argument after ``:`` (``stage=NAME``, ``runlocal``;
comma-separated; ``stage=NAME`` only selects the stage to run). Any field of a stage is overridden with
``--config.stages.NAME.FIELD=VALUE`` (``--dry_run`` lists every field of every stage, resolved). Errors in the
user's input are printed as one line and exit with status 2. On SIGTERM (preemption) the running stage checkpoints
at the next step boundary and the process exits with status 143; rerunning the same command resumes.
"""

import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fct_jax import experiment, sharding, torch_stages
from fct_jax.errors import FCTError, Preempted

# 128 + SIGTERM, what a shell reports for a job ended by SIGTERM: schedulers requeue on it.
PREEMPTED_EXIT_CODE = 143

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (Python).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment directory (created if missing).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "Call jax.distributed.initialize(): auto = when a multi-host job is detected.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the plan (stages, their state in --workdir, split sizes, "
                              "steps, every stage's resolved config) without training, writing or reading data.")
_IMPORT_TORCH = flags.DEFINE_string("import_torch", None, "Fill the selected stage (--config=FILE:stage=NAME) from "
                                    "this PyTorch checkpoint (ml-fct's TorchScript .pt, a torch.save state dict, or "
                                    ".npz) instead of training it; the next runs skip it.")
_IMPORT_PREFIX = flags.DEFINE_string("import_prefix", None, "With --import_torch: the model's tensor-name prefix when "
                                     "the checkpoint holds several models (e.g. 'old_model.model.').")
_IMPORT_ALLOW_UNUSED = flags.DEFINE_bool("import_allow_unused", False, "With --import_torch: import even though some "
                                         "of the checkpoint's tensors have no place in the stage's model.")
_EXPORT_TORCH = flags.DEFINE_string("export_torch", None, "Write the selected finished stage's network "
                                    "(--config=FILE:stage=NAME) as a PyTorch state dict in this .npz file, with "
                                    "ml-fct's names and layouts.")
_EXPORT_TORCH_LINEAR = flags.DEFINE_bool("export_torch_linear", False, "With --export_torch: Dense layers as "
                                         "nn.Linear weights [out, in] (torchvision) rather than ml-fct's 1x1 convs.")
flags.mark_flags_as_required(["config", "workdir"])


def _one_line(e: BaseException, argv) -> str:
  """A one-line reason for a flag/config parsing failure (absl would print a multi-line traceback)."""
  text = str(e)
  if isinstance(e, (AttributeError, KeyError)):
    name = text.strip("\"' ")
    culprit = next((a.split("=")[0] for a in argv if a.startswith("--config.") and name in a), name)
    return f"unknown config field in {culprit}"
  errors = re.findall(r"^\s*(\w+(?:Error|Exception)): (.+)$", text, flags=re.M)
  if errors:
    return errors[-1][1].strip()
  return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {_one_line(e, argv)}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flag_clash() -> str:
  """Why the given flags do not go together, or ``""``."""
  modes = [f for f, on in (("--dry_run", _DRY_RUN.value), ("--import_torch", _IMPORT_TORCH.value),
                            ("--export_torch", _EXPORT_TORCH.value)) if on]
  if len(modes) > 1:
    return f"{' and '.join(modes)} do not go together"
  if not _IMPORT_TORCH.value and (_IMPORT_PREFIX.present or _IMPORT_ALLOW_UNUSED.present):
    return "--import_prefix and --import_allow_unused go with --import_torch"
  if not _EXPORT_TORCH.value and _EXPORT_TORCH_LINEAR.present:
    return "--export_torch_linear goes with --export_torch"
  return ""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  clash = _flag_clash()
  if clash:
    print(f"error: {clash}", file=sys.stderr, flush=True)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
  try:
    config = _CONFIG.value
    config.to_dict()  # config_flags defers load failures to first use
  except (OSError, ImportError, SyntaxError) as e:
    path = flags.FLAGS["config"].serialize().split("=", 1)[-1].split(":")[0]
    reason = "file not found" if "No such file" in str(e) else f"{type(e).__name__}: {str(e).splitlines()[0]}"
    print(f"error: cannot load config file {path}: {reason}", file=sys.stderr, flush=True)
    sys.exit(2)
  try:
    if _DRY_RUN.value:
      experiment.dry_run(config, _WORKDIR.value)
      return
    if _IMPORT_TORCH.value:
      record = torch_stages.import_stage(config, _WORKDIR.value, _IMPORT_TORCH.value, prefix=_IMPORT_PREFIX.value,
                                       allow_unused=_IMPORT_ALLOW_UNUSED.value)
      unused = f"; left out: {', '.join(record['unused'])}" if record["unused"] else ""
      note = f"; {record['note']}" if record["note"] else ""
      print(f"imported {record['tensors_used']} tensors (prefix {record['prefix']!r}) from {record['source']} into "
            f"{_WORKDIR.value}{unused}{note}", flush=True)
      return
    if _EXPORT_TORCH.value:
      n = torch_stages.export_stage(config, _WORKDIR.value, _EXPORT_TORCH.value,
                                  linear_as_conv=not _EXPORT_TORCH_LINEAR.value)
      print(f"wrote {n} tensors to {_EXPORT_TORCH.value}", flush=True)
      return
    sharding.maybe_initialize_distributed(_DISTRIBUTED.value)
    experiment.run(config, _WORKDIR.value)
  except FCTError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
