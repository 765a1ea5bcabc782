"""What the gallery tests share: running ``python -m fct_jax.gallery`` in-process and reading its exit code."""


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
