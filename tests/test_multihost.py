"""Multi-host path: two local processes (4 CPU devices each, gloo collectives) form one 8-device mesh.

Both run a trainable stage on the TFDS path — CIFAR-100's runlocal ``old`` stage on ``tfds.testing.mock_data``
(``tests/multihost_worker.py``: :func:`stage_config`) — with periodic retrieval evaluation. Each process reads only
its slice of every global batch and of every evaluation batch; the logged training metrics (loss, accuracy, lr),
the evaluation metrics (retrieval top-1, mAP) and the trained parameters must match a single process driving 8
devices (up to float reduction order).

The same for the transformation's cached-feature mode (:func:`cached_transformation_config`): the feature cache
computed over both processes, then h trained on it held on the devices (rows sharded over ``data`` across the two
processes, gathered by index on device, several steps per jitted call) and held on the hosts (each process slicing
its part of every global batch).
"""

import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np

from fct_jax import checkpoint, experiment

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multihost_worker  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import stage_logs  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

COMPARED = ("loss", "grad_norm", "train_accuracy", "lr", "eval/retrieval_top1", "eval/mAP")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(workdir: str, config: str = "backbone"):
  """Runs ``multihost_worker.CONFIGS[config]`` in 2 processes × 4 CPU devices on ``workdir``; their outputs."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  env["FCT_TEST_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or ""
  procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(port), workdir,
                             config], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
  return outs


def _assert_params_close(a_dir, b_dir):
  pa, pb = checkpoint.load_model(a_dir), checkpoint.load_model(b_dir)
  assert jax.tree.structure(pa) == jax.tree.structure(pb)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6), pa, pb)


def test_two_processes_match_one(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  outs = _run_workers(multi)
  assert checkpoint.is_done(os.path.join(multi, "old"))
  assert "(tfds cifar100 train, mock)" in outs[0]  # the TFDS source, not an in-memory one
  hparams = stage_logs.hparams(os.path.join(multi, "old"))
  assert hparams[0]["processes"] == "2" and hparams[0]["devices"] == "8"

  assert jax.device_count() == 8 and jax.process_count() == 1
  experiment.run(multihost_worker.stage_config(), single)

  # The logged metrics: every training step (log_every_steps=1) and the evaluations at steps 2 and 4.
  a, b = stage_logs.records(os.path.join(multi, "old")), stage_logs.records(os.path.join(single, "old"))
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

  _assert_params_close(os.path.join(multi, "old"), os.path.join(single, "old"))


def test_cached_transformation_two_processes_match_one(tmp_path):
  """The cached transformation stage over 2 processes × 4 devices = 1 process × 8 devices: the feature cache, every
  logged loss and h's saved variables, with the features on the devices and on the hosts."""
  up, multi, single = str(tmp_path / "up"), str(tmp_path / "multi"), str(tmp_path / "single")
  assert jax.device_count() == 8 and jax.process_count() == 1
  experiment.run(multihost_worker.upstream_config(), up)  # φ_old, ψ, φ_new: trained once, in this process
  shutil.copytree(up, multi)
  shutil.copytree(up, single)

  outs = _run_workers(multi, "cached_transformation")
  experiment.run(multihost_worker.cached_transformation_config(), single)

  rows = multihost_worker.H_IMAGES * multihost_worker.H_VIEWS
  every, steps = multihost_worker.H_EVERY, multihost_worker.H_STEPS
  assert f"cached features of {multihost_worker.H_VIEWS} view(s) × {multihost_worker.H_IMAGES} images" in outs[0]
  assert f"up to {steps} steps per call on device-resident data" in outs[0]
  for name in multihost_worker.H_STAGES:
    a_dir, b_dir = os.path.join(multi, name), os.path.join(single, name)
    assert checkpoint.is_done(a_dir) and checkpoint.is_done(b_dir)
    ha = stage_logs.hparams(a_dir)[0]
    assert ha["processes"] == "2" and ha["devices"] == "8"
    assert stage_logs.hparams(b_dir)[0]["processes"] == "1"
    # The cache: computed with each process embedding its slice of every batch, written once (process 0).
    for k in ("old", "psi", "new"):
      fa = np.load(os.path.join(a_dir, "features", f"{k}.npy"))
      fb = np.load(os.path.join(b_dir, "features", f"{k}.npy"))
      assert fa.shape == fb.shape and fa.shape[0] == rows and np.ptp(fa) > 0, (k, fa.shape, fb.shape)
      np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-5, err_msg=f"{name}: cached {k} features")
    a, b = stage_logs.records(a_dir), stage_logs.records(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(every, steps + 1, every))
    for ra, rb in zip(a, b):
      assert set(ra) == set(rb), (ra, rb)
      for k in ("loss", "grad_norm", "lr", "bn_train_mode"):
        assert np.isfinite(ra[k]), (k, ra)
        np.testing.assert_allclose(ra[k], rb[k], rtol=1e-4, atol=1e-6, err_msg=f"{name}: {k} at step {ra['step']}")
    assert a[0]["loss"] != a[-1]["loss"]  # h trained
    _assert_params_close(a_dir, b_dir)
