"""notebooks/demo.ipynb executes headless (tiny plan via FCT_NOTEBOOK_RUNLOCAL=1), so it cannot rot.

The notebook runs in a child process (this file run as a script: nbclient starts the Jupyter kernel and writes the
executed notebook), not inside the test process: the kernel and nbclient's event loop then share nothing with the
earlier tests' threads and event loops (orbax's checkpoint saves run asyncio loops of their own), and a hang
anywhere in the Jupyter machinery ends at a hard deadline with every thread's stack printed, instead of stalling
the test session.
"""

import faulthandler
import os
import signal
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "demo.ipynb")
CELL_TIMEOUT_S = 600  # one cell (the plan itself takes ~30-60 s here)
DEADLINE_S = 900  # the whole child process: kernel start, every cell, shutdown


def _execute(src: str, dst: str) -> None:
  """Child process: executes notebook ``src`` in a fresh python3 kernel, writes it with its outputs to ``dst``."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  faulthandler.dump_traceback_later(DEADLINE_S * 0.9, exit=False)  # stacks into the log before the parent kills us
  nb = nbformat.read(src, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(src)}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, dst)


def test_demo_notebook_executes(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  cache = os.environ.get("FCT_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fct_jax_cache"))
  # The kernel inherits this environment: tiny plan, a temporary workdir, the repository importable without an
  # install, one CPU device and the test session's compile cache.
  env = dict(os.environ, FCT_NOTEBOOK_RUNLOCAL="1", FCT_NOTEBOOK_WORKDIR=str(tmp_path / "wd"),
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), XLA_FLAGS="", JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", MPLBACKEND="Agg")
  executed = str(tmp_path / "executed.ipynb")
  child = subprocess.Popen([sys.executable, os.path.abspath(__file__), NOTEBOOK, executed], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  try:
    log, _ = child.communicate(timeout=DEADLINE_S)
  except subprocess.TimeoutExpired:
    os.killpg(child.pid, signal.SIGKILL)
    log, _ = child.communicate()
    pytest.fail(f"the notebook did not finish within {DEADLINE_S} s; its log:\n{log[-6000:]}")
  assert child.returncode == 0, log[-6000:]

  nb = nbformat.read(executed, as_version=4)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs) + "".join(
      str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
  assert "plan finished" in text and "| new/h[simclr] |" in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
  assert not any(c.get("outputs") for c in nbformat.read(NOTEBOOK, as_version=4).cells)  # stored without outputs


if __name__ == "__main__":
  _execute(sys.argv[1], sys.argv[2])
