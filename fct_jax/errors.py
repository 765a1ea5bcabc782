"""User-facing errors: ``main`` prints them as one line and exits non-zero."""


class FCTError(Exception):
  """A problem with the user's input (config, workdir, data), explained in one line."""


class NonFiniteError(FCTError):
  """A loss or metric became NaN/Inf; training stops before anything is checkpointed."""


class Preempted(Exception):
  """Training was asked to stop (SIGTERM / preemption notice); a checkpoint of the current step was written."""
