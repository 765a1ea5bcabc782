"""What the gallery tests share: running ``python -m fct_jax.gallery`` in-process and reading its exit code, and
killing a worker process after its k-th chunk write (crash tests)."""

import os
import signal


def run_cli(argv, capsys):
  """``(exit code, stdout, stderr)`` of the gallery command line with ``argv`` (0 when it returns normally)."""
  from fct_jax.gallery import __main__ as cli  # pylint: disable=g-import-not-at-top
  try:
    cli.main(argv)
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def sigkill_after_chunks(kill_at: int):
  """Makes this process SIGKILL itself once ``kill_at`` chunks of any gallery version have landed (the writes of
  other chunks may be in flight): a crash at an arbitrary point of a build, upgrade or backfill."""
  from fct_jax.gallery import store as store_lib  # pylint: disable=g-import-not-at-top
  original = store_lib.VersionWriter.write_chunk
  count = [0]

  def write_chunk(self, *a, **kw):
    out = original(self, *a, **kw)
    count[0] += 1
    if count[0] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  store_lib.VersionWriter.write_chunk = write_chunk
