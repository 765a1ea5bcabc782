"""The package's layers: imports go down only, no cycles, and function-level imports only for optional packages.

Every module of ``fct_jax`` has a layer (:data:`LAYERS`, lowest first; docs/architecture.md draws them). A module may
import modules of a lower layer, and modules of its own group (the same sub-package, or itself); nothing else, not
even inside a function. The imports are read with ``ast`` (nothing is imported), function-level ones included.
A new module must be given a layer here: an unplaced module fails the test.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fct_jax")

# (layer, groups): a group is a module, or a sub-package (a name ending in "."), or a tuple of those that may
# import each other. Within a layer, groups do not import each other (peers).
LAYERS = [
    (0, ("fct_jax", "fct_jax.errors")),
    (1, ("fct_jax.config_schema",)),
    (2, ("fct_jax.writers", "fct_jax.sharding", "fct_jax.checkpoint", "fct_jax.optim", "fct_jax.losses")),
    (3, ("fct_jax.data.", "fct_jax.models.", "fct_jax.retrieval.", "fct_jax.torch_import")),
    (4, (("fct_jax.train_lib", "fct_jax.train_bookkeeping", "fct_jax.train_steps"),)),
    (5, ("fct_jax.artifacts",)),
    (6, ("fct_jax.stages.", "fct_jax.gallery.")),  # peers: stages never import the gallery, nor the reverse
    (7, ("fct_jax.report.",)),
    (8, ("fct_jax.experiment",)),
    (9, ("fct_jax.torch_stages",)),
    (10, ("fct_jax.main",)),
]
# Imported inside functions only, so that fct_jax runs without them (or starts faster without them). clu's metric
# writers import TensorFlow; the VGGFace2 builder registers a tensorflow_datasets builder.
OPTIONAL = ("tensorflow", "tensorflow_datasets", "torch", "matplotlib", "nbclient", "nbformat", "sklearn",
            "clu.metric_writers", "clu.periodic_actions", "jax.experimental.multihost_utils",
            "fct_jax.data.vggface2_builder")


def _matches(module: str, name: str) -> bool:
  return (module + ".").startswith(name) if name.endswith(".") else module == name


def place(module: str):
  """``(layer, group)`` of a module name, or None when :data:`LAYERS` does not place it."""
  for layer, groups in LAYERS:
    for group in groups:
      names = group if isinstance(group, tuple) else (group,)
      if any(_matches(module, n) for n in names):
        return layer, group if isinstance(group, str) else "+".join(group)
  return None


def _module_name(path: str, root: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(root))[:-len(".py")].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  parts = module.split(".")
  base = parts[:len(parts) - node.level + (1 if is_package else 0)]
  return ".".join(base + ([node.module] if node.module else []))


def read_imports(root: str = ROOT):
  """``{module: [(imported, line, function_level)]}`` for every ``.py`` under ``root`` (fct_jax modules resolved
  to the deepest module name that exists, e.g. ``from fct_jax import artifacts`` → ``fct_jax.artifacts``)."""
  files = {}
  for d, _, names in os.walk(root):
    for n in names:
      if n.endswith(".py"):
        files[_module_name(os.path.join(d, n), root)] = os.path.join(d, n)
  out = {}
  for module, path in files.items():
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    edges = []
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = _resolve(node, module, path.endswith("__init__.py"))
        # fct_jax: the module imported (``from fct_jax import artifacts``) or the one holding the name; others:
        # the full dotted name, so that an optional sub-module (``jax.experimental.multihost_utils``) is seen.
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files or not base.startswith("fct_jax") else base
                   for a in node.names]
      else:
        continue
      edges += [(t, node.lineno, id(node) in in_function) for t in targets]
    out[module] = edges
  # Importing ``a.b.c`` from outside ``a.b`` first runs ``a/b/__init__.py``: that is an import of ``a.b`` too
  # (an ``__init__`` that imports its sub-modules can close a cycle through any of them).
  for module, edges in out.items():
    implied = []
    for target, line, function_level in edges:
      parent = target.rpartition(".")[0]
      while parent in files and parent != "fct_jax" and not (module + ".").startswith(parent + "."):
        implied.append((parent, line, function_level))
        parent = parent.rpartition(".")[0]
    edges += implied
  return out


def violations(imports) -> list:
  """Every broken rule of ``imports`` (as :func:`read_imports` returns), one line each."""
  bad = []
  for module, edges in sorted(imports.items()):
    here = place(module)
    if here is None:
      bad.append(f"{module}: no layer; add it to LAYERS in tests/test_layers.py")
      continue
    for target, line, function_level in edges:
      if function_level and not any(target == o or target.startswith(o + ".") for o in OPTIONAL):
        bad.append(f"{module}:{line}: function-level import of {target} (only the packages in OPTIONAL)")
      if not target.startswith("fct_jax"):
        continue
      there = place(target)
      if there is None:
        bad.append(f"{module}:{line}: imports {target}, which has no layer")
      elif there[0] > here[0] or (there[0] == here[0] and there[1] != here[1]):
        bad.append(f"{module}:{line}: imports {target} (layer {there[0]}, {there[1]}) from layer {here[0]} "
                   f"({here[1]}): imports go down only")
  bad += [f"import cycle: {' → '.join(c)}" for c in cycles(imports)]
  return bad


def cycles(imports) -> list:
  """The import cycles among fct_jax modules (each as a closed path), found by depth-first search."""
  graph = {m: sorted({t for t, _, _ in e if t in imports and t != m}) for m, e in imports.items()}
  found, state = [], {}

  def visit(m, path):
    state[m] = "open"
    for t in graph[m]:
      if state.get(t) == "open":
        found.append(path[path.index(t):] + [t])
      elif t not in state:
        visit(t, path + [t])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return found


def test_the_package_keeps_its_layers():
  bad = violations(read_imports())
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize("extra, expected", [
    ({"fct_jax.stages.backbone": [("fct_jax.experiment", 3, False)]}, "imports go down only"),
    ({"fct_jax.stages.backbone": [("fct_jax.gallery.store", 3, False)]}, "imports go down only"),
    ({"fct_jax.artifacts": [("fct_jax.stages.common", 9, True)]}, "function-level import"),
    ({"fct_jax.artifacts": [("numpy", 9, True)]}, "function-level import of numpy"),
    ({"fct_jax.brand_new": []}, "no layer"),
    ({"fct_jax.data.a": [("fct_jax.data.b", 1, False)], "fct_jax.data.b": [("fct_jax.data.a", 1, False)]},
     "import cycle: fct_jax.data.a → fct_jax.data.b → fct_jax.data.a"),
])
def test_the_check_fails_on_broken_rules(extra, expected):
  """The checker itself: an upward import, a peer import, a needless function-level import, an unplaced module
  and a cycle (within a group, where the layers allow the edges) are each reported."""
  imports = {**read_imports(), **extra}
  assert any(expected in line for line in violations(imports)), violations(imports)
