"""The package's structure: dependencies point down, TensorFlow at the edge."""

import ast
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = "visionspeak_jax"
# Bottom to top: a module may import its own layer and the layers below.
_LAYERS = ("errors", "platform", "text", "models", "data", "evaluation",
           "training", "run", "tools", "train", "main")
# What must run where only jax/flax/optax/orbax/numpy/absl/ml_collections
# exist (a stock JAX accelerator image): no TensorFlow, no TFDS.
_TF_FREE = ("data.datasets.shapes_words", "evaluation.chair",
            "evaluation.cider", "evaluation.metrics", "models.attention",
            "models.captioner", "models.decoder", "models.decoding",
            "models.fast_decoder", "models.lstm", "models.pretrained",
            "models.resnet", "run.checkpoint", "run.figures", "run.restore",
            "text.vocabulary", "tools.caption", "training.optimizer",
            "training.scst", "training.state", "training.step")


def _modules():
  """{dotted name below the package: path} of every module."""
  found = {}
  top = os.path.join(_ROOT, _PACKAGE)
  for directory, _, files in os.walk(top):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, top)[:-3].replace(os.sep, ".")
        dotted = dotted.removesuffix("__init__").rstrip(".")
        found[dotted] = path  # "" is the package's own __init__.
  return found


def _import_graph():
  """{module: modules of the package it imports, at any depth of the file}."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.level:
        raise AssertionError(f"{name}: a relative import")
      if isinstance(node, ast.ImportFrom) and (
          node.module or "").startswith(_PACKAGE):
        base = node.module[len(_PACKAGE) + 1:]
        for alias in node.names:
          full = f"{base}.{alias.name}" if base else alias.name
          deps.add(full if full in modules else base)
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith(_PACKAGE + "."):
            deps.add(alias.name[len(_PACKAGE) + 1:])
    graph[name] = deps - {name, ""}
  return graph


def _layer(module: str) -> int:
  return _LAYERS.index(module.split(".")[0])


def test_every_module_has_a_layer():
  unplaced = [m for m in _import_graph()
              if m and m.split(".")[0] not in _LAYERS]
  assert not unplaced, unplaced


def test_dependencies_point_down():
  upward = sorted(f"{m} imports {d}" for m, deps in _import_graph().items()
                  if m for d in deps if _layer(d) > _layer(m))
  assert not upward, upward


def test_import_graph_has_no_cycle():
  graph = _import_graph()
  assert {"train", "models.captioner", "data.sources", "run.restore"} <= set(
      graph)
  done, active = set(), []

  def visit(module):
    active.append(module)
    for dep in sorted(graph.get(module, ())):
      assert dep not in active, "import cycle: " + " -> ".join(
          active[active.index(dep):] + [dep])
      if dep not in done:
        visit(dep)
    active.pop()
    done.add(module)

  for module in graph:
    if module not in done:
      visit(module)


def test_only_the_entry_point_imports_train():
  graph = _import_graph()
  assert [m for m, deps in graph.items() if "train" in deps] == ["main"]


def test_model_and_restore_code_imports_no_tensorflow():
  code = ("import sys\n"
          f"for m in {_TF_FREE!r}:\n"
          f"  __import__('{_PACKAGE}.' + m)\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets'))\n"
          "assert not bad, bad[:5]\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=_ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
