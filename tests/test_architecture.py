"""The package's structure: dependencies point down, TensorFlow at the edge."""

import ast
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PACKAGE = "visionspeak_jax"
# What must run where only jax/flax/optax/orbax/numpy/absl/ml_collections
# exist (a stock JAX accelerator image): no TensorFlow, no TFDS.
_TF_FREE = ("attention", "caption", "checkpoint", "cider", "decoder",
            "decoding", "fast_decoder", "figures", "lstm", "metrics", "model",
            "optimizer", "pretrained", "resnet", "restore", "scst",
            "shapes_words", "state", "step", "vocabulary")


def _import_graph():
  """{module: modules of the package it imports, at any depth of the file}."""
  graph = {}
  directory = os.path.join(_ROOT, _PACKAGE)
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(directory, name)) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module == _PACKAGE:
        deps |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
          _PACKAGE + "."):
        deps.add(node.module.split(".")[1])
    graph[name[:-3]] = deps - {name[:-3]}
  return graph


def test_import_graph_has_no_cycle():
  graph = _import_graph()
  assert {"train", "model", "data", "restore"} <= set(graph)
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
