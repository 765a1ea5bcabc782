"""notebooks/demo.ipynb executes headless (tiny plan via FCT_NOTEBOOK_RUNLOCAL=1), so it cannot rot."""

import os
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "demo.ipynb")


def test_demo_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  cache = os.environ.get("FCT_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fct_jax_cache"))
  # The kernel inherits this environment: tiny plan, a temporary workdir, the repository importable without an
  # install, one CPU device and the test session's compile cache.
  monkeypatch.setenv("FCT_NOTEBOOK_RUNLOCAL", "1")
  monkeypatch.setenv("FCT_NOTEBOOK_WORKDIR", str(tmp_path / "wd"))
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") for o in outputs) + "".join(
      str(o.get("data", {}).get("text/markdown", "")) for o in outputs)
  assert "plan finished" in text and "| new/h[simclr] |" in text
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3
  assert not any(c.get("outputs") for c in nbformat.read(NOTEBOOK, as_version=4).cells)  # stored without outputs
