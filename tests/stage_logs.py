"""Reading a stage's ``metrics.jsonl`` in tests (the tests' directory is on sys.path under pytest)."""

import json
import os


def records(stage_dir):
  """The stage's logged records (written by process 0 only), the hparams line excluded."""
  return [json.loads(l) for l in open(os.path.join(stage_dir, "metrics.jsonl")) if '"step"' in l]


def hparams(stage_dir):
  """The stage's hparams lines (one per run of the stage)."""
  return [json.loads(l)["hparams"] for l in open(os.path.join(stage_dir, "metrics.jsonl")) if "hparams" in l]
