"""What the benchmark scripts share: writing their results (``from benchmarks.bench_io import write_json`` once a
script has put the repository root on ``sys.path``)."""

import json
import os


def write_json(path: str, result, indent: int = 2):
  """Writes ``result`` as JSON at ``path`` (its folder made if missing) and says so on stdout."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=indent)
  print(f"wrote {path}", flush=True)
