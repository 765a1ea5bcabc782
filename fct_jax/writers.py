"""Metric writers: clu's (TensorBoard) when TensorFlow is importable, else JSON lines + console.

Both expose clu's ``MetricWriter`` methods used here: ``write_scalars(step, scalars)``, ``write_hparams(hparams)``,
``flush()``, ``close()``. Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath


def _to_py(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class JsonlWriter:
  """Appends ``{"step": s, name: value, ...}`` lines to ``DIR/metrics.jsonl`` and echoes them to the console.

  Local directories are appended to line by line; cloud URLs (no append there) are rewritten whole on ``flush``.
  """

  def __init__(self, logdir: str, prefix: str = "", console: bool = True):
    self._path = epath.Path(logdir) / "metrics.jsonl"
    self._remote = "://" in str(logdir)
    self._lines = []
    if self._remote:
      if self._path.exists():
        self._lines = self._path.read_text().splitlines(keepends=True)
      self._f = None
    else:
      os.makedirs(logdir, exist_ok=True)
      self._f = open(self._path, "a")
    self._prefix = prefix
    self._console = console

  def _write(self, line: str):
    if self._remote:
      self._lines.append(line)
    else:
      self._f.write(line)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    rec = {"step": int(step), **{k: _to_py(v) for k, v in scalars.items()}}
    self._write(json.dumps(rec) + "\n")
    if self._console:
      body = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "step")
      print(f"{self._prefix}step {step}: {body}", flush=True)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

  def flush(self):
    if self._remote:
      self._path.write_text("".join(self._lines))
    elif not self._f.closed:
      self._f.flush()

  def close(self):
    self.flush()
    if self._f is not None:
      self._f.close()


class _NullWriter:
  def write_scalars(self, step, scalars):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


def create_writer(logdir: str, prefix: str = "", console: bool = True):
  """A writer for ``logdir``: clu's default (TensorBoard + log) if TensorFlow imports, else :class:`JsonlWriter`.

  The JSON-lines file is written in both cases so that tools and tests can read metrics without TensorFlow.
  """
  if jax.process_index() != 0:
    return _NullWriter()
  jsonl = JsonlWriter(logdir, prefix=prefix, console=console)
  if not tensorflow_available():
    return jsonl
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  return metric_writers.MultiWriter([jsonl, metric_writers.SummaryWriter(logdir)])


class Progress:
  """Console progress for long loops: done/total, rate, ETA. Prints from process 0 only."""

  def __init__(self, total: int, *, start: int = 0, unit: str = "steps", prefix: str = "", file=None):
    self.total, self.start, self.unit, self.prefix = total, start, unit, prefix
    self._t0 = time.perf_counter()
    self._file = file or sys.stdout

  def rate(self, done: int) -> float:
    dt = time.perf_counter() - self._t0
    return (done - self.start) / dt if dt > 0 else 0.0

  def line(self, done: int) -> str:
    r = self.rate(done)
    eta = (self.total - done) / r if r > 0 else float("inf")
    eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if np.isfinite(eta) else "?"
    return f"{self.prefix}{done}/{self.total} {self.unit} | {r:.1f} {self.unit}/s | ETA {eta_s}"

  def update(self, done: int, extra: str = ""):
    if jax.process_index() == 0:
      print(self.line(done) + (f" | {extra}" if extra else ""), file=self._file, flush=True)


def progress_factory(unit: str, prefix: str) -> Callable[[int], Callable[[int], None]]:
  """``factory(total) -> update(done)``: a console :class:`Progress` made when a long job knows its size. Low layers
  (the retrieval kernel) take such a factory instead of importing this module."""
  return lambda total: Progress(total, unit=unit, prefix=prefix).update
