"""Multi-host path: two local processes (4 CPU devices each, gloo collectives) form one 8-device mesh.

Both run a trainable stage on the TFDS path — CIFAR-100's runlocal ``old`` stage on ``tfds.testing.mock_data``
(``tests/multihost_worker.py``: :func:`stage_config`) — with periodic retrieval evaluation. Each process reads only
its slice of every global batch and of every evaluation batch; the logged training metrics (loss, accuracy, lr),
the evaluation metrics (retrieval top-1, mAP) and the trained parameters must match a single process driving 8
devices (up to float reduction order).
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from fct_jax import checkpoint, experiment

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_worker  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

COMPARED = ("loss", "grad_norm", "train_accuracy", "lr", "eval/retrieval_top1", "eval/mAP")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _metrics(stage_dir):
  """The stage's logged records (``metrics.jsonl``, written by process 0 only), hparams line excluded."""
  return [json.loads(l) for l in open(os.path.join(stage_dir, "metrics.jsonl")) if '"step"' in l]


def test_two_processes_match_one(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env["FCT_TEST_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or ""
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(port), multi],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  assert checkpoint.is_done(os.path.join(multi, "old"))
  assert "(tfds cifar100 train, mock)" in outs[0]  # the TFDS source, not an in-memory one
  hparams = [json.loads(l)["hparams"] for l in open(os.path.join(multi, "old", "metrics.jsonl")) if "hparams" in l]
  assert hparams[0]["processes"] == "2" and hparams[0]["devices"] == "8"

  assert jax.device_count() == 8 and jax.process_count() == 1
  experiment.run(multihost_worker.stage_config(), single)

  # The logged metrics: every training step (log_every_steps=1) and the evaluations at steps 2 and 4.
  a, b = _metrics(os.path.join(multi, "old")), _metrics(os.path.join(single, "old"))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  steps = multihost_worker.STEPS
  assert [r["step"] for r in a if "loss" in r] == list(range(1, steps + 1))
  evals = [r for r in a if "eval/mAP" in r]
  assert [r["step"] for r in evals] == list(range(multihost_worker.EVAL_EVERY, steps + 1, multihost_worker.EVAL_EVERY))
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb), (ra, rb)
    for k in COMPARED:
      if k in ra:
        assert np.isfinite(ra[k]), (k, ra)
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-6, err_msg=f"{k} at step {ra['step']}")
  assert len({r["loss"] for r in a if "loss" in r}) > 1  # the run trained: the loss moved

  pa = checkpoint.load_model(os.path.join(multi, "old"))
  pb = checkpoint.load_model(os.path.join(single, "old"))
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), pa, pb)
