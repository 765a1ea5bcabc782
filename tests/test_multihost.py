"""Multi-host path: two local processes (4 CPU devices each, gloo collectives) form one 8-device mesh.

Each process reads only its slice of every global batch; the trained parameters must match a single process
driving 8 devices (up to float reduction order).
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import demo
from fct_jax import checkpoint, experiment

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(port), multi],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert checkpoint.is_done(os.path.join(multi, "old"))

  assert jax.device_count() == 8
  experiment.run(demo.get_config("stage=old,runlocal"), single)
  a = checkpoint.load_model(os.path.join(multi, "old"))
  b = checkpoint.load_model(os.path.join(single, "old"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), a, b)
