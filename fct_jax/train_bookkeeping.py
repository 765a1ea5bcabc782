"""What the training loop (:func:`fct_jax.train_lib.train`) does on the hosts between device calls.

Kept apart from the loop so that the loop reads top to bottom: when something is due (:func:`itstime`,
:func:`next_stop` on a :class:`Cadence`), the running metrics and their log lines (:class:`MetricLog`, with the
NaN/Inf guard that keeps a non-finite state out of the checkpoints), and noticing a request to stop
(:class:`PreemptionWatcher`).
"""

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fct_jax.errors import NonFiniteError


class Cadence(NamedTuple):
  """Every how many steps the host logs, evaluates and checkpoints (0: never; logging is at least every step)."""
  log: int
  eval: int
  checkpoint: int

  @classmethod
  def from_config(cls, tc) -> "Cadence":
    """The cadences of a ``train`` config block."""
    return cls(max(1, int(tc.log_every_steps)), int(tc.eval_every_steps or 0), int(tc.checkpoint_every_steps or 0))


def itstime(step: int, every: int, last: bool = False) -> bool:
  """Whether a cadence of ``every`` steps (0: never) falls on ``step``, or ``last`` (the run's final step, or the
  step it stops at on request) makes it due anyway."""
  return bool(every and step % every == 0) or last


def next_stop(step: int, end: int, max_steps: int, cadence: Cadence) -> int:
  """The last step of the call that starts after ``step``: at most ``max_steps`` steps, ending at ``end`` or at the
  next step where the host logs, evaluates or checkpoints, so that those land on exactly the configured steps."""
  stop = min(step + max_steps, end)
  for every in cadence:
    if every:
      stop = min(stop, (step // every + 1) * every)
  return stop


def check_finite(metrics: Dict[str, float], step: int, name: str):
  """Raises :class:`NonFiniteError` (naming the loss first) when a metric is NaN/Inf: the run stops before the
  state that produced it is checkpointed."""
  bad = {k: v for k, v in metrics.items() if not np.all(np.isfinite(v))}
  if bad:
    k = "loss" if "loss" in bad else next(iter(bad))
    v = bad[k]
    raise NonFiniteError(f"stage {name!r}: {k} is {v} at step {step}; stopped before checkpointing "
                         f"(lower the learning rate or check the input data)")


class MetricLog:
  """The metrics of the steps run since the last log line, and the records logged so far.

  The device calls' metrics are summed on device (:meth:`add`, no host sync per call); :meth:`flush` fetches their
  mean, guards against NaN/Inf and writes one record (with ``lr`` and ``steps_per_sec``) to the writer, the
  history and the console. :meth:`evaluate` does the same for the task's periodic evaluation.

  Attributes:
    history: the logged records, ``{"step": ..., **metrics}``, in order.
  """

  def __init__(self, name: str, writer, schedule: Callable, progress):
    self.history: List[Dict[str, Any]] = []
    self._name, self._writer, self._schedule, self._progress = name, writer, schedule, progress
    self._sum, self._steps = None, 0

  def add(self, metrics, num_steps: int):
    """Adds the metrics of one call (summed over its ``num_steps`` steps)."""
    self._sum = metrics if self._sum is None else jax.tree.map(jnp.add, self._sum, metrics)
    self._steps += num_steps

  def flush(self, step: int):
    """Logs the mean of the metrics added since the last flush (nothing when none were)."""
    if self._sum is None:
      return
    m = {k: float(v) / self._steps for k, v in jax.device_get(self._sum).items()}
    self._sum, self._steps = None, 0
    check_finite(m, step, self._name)
    m["lr"] = float(self._schedule(step - 1))
    m["steps_per_sec"] = self._progress.rate(step)
    self._writer.write_scalars(step, m)
    self.history.append({"step": step, **m})
    self._progress.update(step, f"loss {m['loss']:.4f} lr {m['lr']:.3g}")

  def evaluate(self, step: int, state, evaluate: Optional[Callable]):
    """Runs ``evaluate(state)`` (when the task has one) and logs its metrics as ``eval/<name>``."""
    if evaluate is None:
      return
    t0 = time.perf_counter()
    m = evaluate(state)
    check_finite(m, step, self._name)
    record = {f"eval/{k}": v for k, v in m.items()}
    self._writer.write_scalars(step, record)
    self.history.append({"step": step, **record})
    shown = " ".join(f"{k}={v:.4g}" for k, v in m.items())
    print(f"[{self._name}] eval at step {step}: {shown} ({time.perf_counter() - t0:.1f}s)", flush=True)


class PreemptionWatcher:
  """Notices a request to stop at the next step boundary.

  One process: a SIGTERM handler sets a flag (installed only while training, from the main thread; the previous
  handler is restored afterwards). Several processes: JAX's preemption service (started by
  ``jax.distributed.initialize``) catches the signal and makes every host agree on the same step, which orbax's
  ``reached_preemption`` reports — a per-host flag could stop hosts at different steps and deadlock collectives.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  @contextlib.contextmanager
  def installed(self):
    """Watches for SIGTERM (one process, main thread) while the block runs; yields the watcher."""
    single = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
    if single:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    try:
      yield self
    finally:
      if single:
        signal.signal(signal.SIGTERM, self._previous)

  def _on_signal(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int, mngr) -> bool:
    """Whether to stop after ``step`` (the same answer on every host)."""
    if jax.process_count() > 1:
      return mngr.reached_preemption(step)
    return self.requested
