r"""Re-renders an experiment's report from its ``results.json``, and optionally the README's results block.

  python -m fct_jax.report --workdir /tmp/fct_demo                               # results.md and the plots
  python -m fct_jax.report --workdir /tmp/fct_demo --update_readme README.md     # and the README's block
  python -m fct_jax.report --workdir /tmp/fct_demo3                              # a multi-seed (combined) report

Errors in the user's input are printed as one line and exit with status 2.
"""

import sys

from absl import app, flags

from fct_jax.errors import FCTError
from fct_jax.report import seeds

_WORKDIR = flags.DEFINE_string("workdir", None, "Experiment workdir holding results.json.")
_UPDATE_README = flags.DEFINE_string("update_readme", None, "Also rewrite this README's "
                                     "<!-- demo-results:start/end --> block with the case table.")
_SOURCE_NAME = flags.DEFINE_string("source_name", None, "Workdir name shown in the README's note "
                                   "(default: --workdir).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    for path in seeds.rerender(_WORKDIR.value, _UPDATE_README.value or "", _SOURCE_NAME.value or ""):
      print(path, flush=True)
  except FCTError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
