"""Preemption and crash safety: SIGTERM checkpoints and exits 143; SIGKILL loses only work since the last
checkpoint; a resumed run ends bit-identical to an uninterrupted one."""

import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from fct_jax import checkpoint, experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 30


def _overrides(stage, ckpt_every):
  del stage  # the same spelling whether one stage is selected or the whole plan runs
  prefix = "--config.stages.old."
  return [f"{prefix}train.steps={STEPS}", f"{prefix}train.log_every_steps=1",
          f"{prefix}train.checkpoint_every_steps={ckpt_every}"]


def _cfg(ckpt_every):
  plan = demo.get_config("stage=old,runlocal")
  cfg = plan.stages.old
  cfg.train.steps, cfg.train.log_every_steps, cfg.train.checkpoint_every_steps = STEPS, 1, ckpt_every
  return plan


def _start(workdir, ckpt_every):
  # Same device count as this test process (conftest: 8), so compiled programs and results are identical.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = [sys.executable, "-u", "-m", "fct_jax.main", "--config=configs/demo.py:stage=old,runlocal",
          f"--workdir={workdir}", *_overrides(True, ckpt_every)]
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(proc, step):
  """Reads progress lines until the run reports ``step`` (or ends)."""
  for line in proc.stdout:
    if line.startswith("[old] ") and "/" in line and " steps |" in line:
      if int(line.split()[1].split("/")[0]) >= step:
        return True
  return False


def _params(wd):
  return jax.tree.map(np.asarray, checkpoint.load_model(os.path.join(wd, "old")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("ref"))
  experiment.run(_cfg(ckpt_every=1), wd)
  return _params(wd)


def _saved_steps(stage_dir):
  """Finalised checkpoint steps (orbax renames a step's temporary directory to its number when complete)."""
  d = os.path.join(stage_dir, "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if os.path.isdir(d) else []


def _finish_and_compare(wd, ckpt_every, reference):
  saved = _saved_steps(os.path.join(wd, "old"))
  proc = _start(wd, ckpt_every)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  # A kill can land before the first asynchronous save is finalised; then the rerun rightly starts from scratch.
  assert ("resumed from step" in out) == bool(saved), (saved, out[-500:])
  jax.tree.map(np.testing.assert_array_equal, _params(wd), reference)


def test_sigterm_checkpoints_and_resumes_bit_exact(tmp_path, reference):
  wd = str(tmp_path)
  proc = _start(wd, ckpt_every=0)  # no periodic checkpoints: only the SIGTERM one
  assert _wait_for_step(proc, 3)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert "preempted: stage 'old' stopped at step" in err
  steps = [int(d) for d in os.listdir(os.path.join(wd, "old", "checkpoints")) if d.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < STEPS
  assert not checkpoint.is_done(os.path.join(wd, "old"))
  _finish_and_compare(wd, 0, reference)


def test_sigkill_loses_only_uncheckpointed_work(tmp_path, reference):
  wd = str(tmp_path)
  kill_at = random.Random(os.getpid()).randint(2, STEPS - 5)
  proc = _start(wd, ckpt_every=1)
  assert _wait_for_step(proc, kill_at)
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not checkpoint.is_done(os.path.join(wd, "old"))
  _finish_and_compare(wd, 1, reference)


def test_leftover_temporary_checkpoint_is_ignored(tmp_path, reference):
  # A crash in the middle of a save leaves orbax's temporary directory behind; it must never be restored.
  wd = str(tmp_path)
  experiment.run(_cfg(ckpt_every=1), wd, stop_at_step=4)
  ckpt = os.path.join(wd, "old", "checkpoints")
  os.makedirs(os.path.join(ckpt, "9.orbax-checkpoint-tmp-123", "default"))
  with open(os.path.join(ckpt, "9.orbax-checkpoint-tmp-123", "default", "garbage"), "w") as f:
    f.write("half written")
  experiment.run(_cfg(ckpt_every=1), wd)
  jax.tree.map(np.testing.assert_array_equal, _params(wd), reference)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
  wd = str(tmp_path)
  experiment.run(_cfg(ckpt_every=1), wd, stop_at_step=2)
  d = os.path.join(wd, "old", "checkpoints", "2", "default")
  for root, _, files in os.walk(d):
    for f in files:
      if f.endswith(".ocdbt") or "manifest" in f or f.startswith("d"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"\0garbage")
  from fct_jax.errors import FCTError
  with pytest.raises(FCTError, match="cannot restore checkpoint step 2"):
    experiment.run(_cfg(ckpt_every=1), wd)


# ----------------------------------------------------------------- every trainable stage (slow, end to end)

TRAINABLE = ("backbone", "side_info", "transformation")


@pytest.fixture(scope="module")
def finished_plan(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("plan"))
  experiment.run(demo.get_config("runlocal"), wd)
  return wd


def _stage_cfg(stage, steps=12):
  plan = demo.get_config(f"stage={stage},runlocal")
  cfg = plan.stages[stage]
  cfg.train.steps, cfg.train.log_every_steps, cfg.train.checkpoint_every_steps = steps, 1, 1
  return plan


def _copy_without(src, dst, stage):
  import shutil
  shutil.copytree(src, dst)
  shutil.rmtree(os.path.join(dst, stage))
  return dst


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s for s in demo.get_config("runlocal").plan
                                   if demo.get_config("runlocal").stages[s].kind in TRAINABLE])
def test_sigkill_and_resume_every_stage(stage, finished_plan, tmp_path):
  ref = _copy_without(finished_plan, str(tmp_path / "ref"), stage)
  experiment.run(_stage_cfg(stage), ref)
  wd = _copy_without(finished_plan, str(tmp_path / "killed"), stage)
  args = [sys.executable, "-u", "-m", "fct_jax.main", f"--config=configs/demo.py:stage={stage},runlocal",
          f"--workdir={wd}", f"--config.stages.{stage}.train.steps=12",
          f"--config.stages.{stage}.train.log_every_steps=1", f"--config.stages.{stage}.train.checkpoint_every_steps=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  kill_at = random.Random(hash(stage) % 1000 + os.getpid()).randint(2, 9)
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith(f"[{stage}] ") and " steps |" in line and int(line.split()[1].split("/")[0]) >= kill_at:
      break
  proc.kill()
  proc.communicate(timeout=60)
  assert not checkpoint.is_done(os.path.join(wd, stage))
  saved = _saved_steps(os.path.join(wd, stage))
  proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert ("resumed from step" in proc.stdout) == bool(saved), (saved, proc.stdout[-500:])
  a = jax.tree.map(np.asarray, checkpoint.load_model(os.path.join(wd, stage)))
  b = jax.tree.map(np.asarray, checkpoint.load_model(os.path.join(ref, stage)))
  jax.tree.map(np.testing.assert_array_equal, a, b)
