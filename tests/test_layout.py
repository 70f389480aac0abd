"""The package's layout is its architecture (docs/design.md): every tcr_jax
import goes down the layers or stays within one, the import graph has no
cycle, no module outgrows 450 lines, main.py stays an entry point, no
module but the one lookup compares base-task names, and every import made
inside a function says why."""
import ast
import os
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tcr_jax"

# Lowest first. A module may import its own layer and the ones below.
LAYERS = (
    ("tcr_jax.errors", "tcr_jax.checkpoints"),
    ("tcr_jax.codec", "tcr_jax.tasks", "tcr_jax.data"),
    ("tcr_jax.model", "tcr_jax.reporting"),
    ("tcr_jax.bases",),
    ("tcr_jax.configs_lib", "tcr_jax.config_overrides"),
    ("tcr_jax.training",),
    ("tcr_jax.tools",),
    ("tcr_jax.cli", "tcr_jax.main", "tcr_jax.supervisor", "tcr_jax.bench"),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, ast.stmt, bool]]:
  """(imported tcr_jax module, statement, inside a function) of a module."""
  tree = ast.parse(MODULES[name].read_text())
  found = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((a.name, child, in_function) for a in child.names
                     if a.name.startswith("tcr_jax"))
      elif isinstance(child, ast.ImportFrom) and (child.module or "").startswith("tcr_jax"):
        for a in child.names:
          sub = f"{child.module}.{a.name}"
          found.append((sub if sub in MODULES else child.module, child, in_function))
      visit(child, inner)

  visit(tree, False)
  return found


def _layer(name: str) -> int:
  for i, prefixes in enumerate(LAYERS):
    if any(name == p or name.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"{name} is in no layer of tests/test_layout.py")


def test_every_module_is_in_a_layer():
  for name in MODULES:
    if name != "tcr_jax":
      _layer(name)


def test_imports_go_down_the_layers():
  upward = [f"{name} imports {target}" for name in MODULES if name != "tcr_jax"
            for target, _, _ in _imports(name)
            if _layer(target) > _layer(name)]
  assert not upward, upward


def test_the_import_graph_has_no_cycle():
  graph = {name: sorted({t for t, _, _ in _imports(name) if t != name})
           for name in MODULES}
  state: dict[str, int] = {}  # 1: on the path, 2: done

  def walk(node, path):
    state[node] = 1
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 1:
        raise AssertionError("import cycle: " + " -> ".join(
            path[path.index(nxt):] + [nxt]))
      if nxt not in state:
        walk(nxt, path + [nxt])
    state[node] = 2

  for name in graph:
    if name not in state:
      walk(name, [name])


def test_imports_inside_functions_say_why():
  silent = []
  for name, path in MODULES.items():
    lines = path.read_text().split("\n")
    for _, stmt, in_function in _imports(name):
      here = lines[stmt.lineno - 1]
      above = lines[stmt.lineno - 2].strip() if stmt.lineno > 1 else ""
      if in_function and "#" not in here and not above.startswith("#"):
        silent.append(f"{path.relative_to(PACKAGE.parent)}:{stmt.lineno}")
  assert not silent, silent


def test_modules_stay_small_and_main_stays_an_entry_point():
  lines = {name: len(path.read_text().split("\n")) for name, path in MODULES.items()}
  assert {n: k for n, k in lines.items() if k > 450} == {}
  assert lines["tcr_jax.main"] <= 80


def test_only_the_lookup_compares_base_task_names():
  """config.task.base is read in one place, tcr_jax/bases/__init__.py (and
  set by the config modules); nothing else compares it to a name."""
  names = re.compile(r"""["'](depth|detection)["']""")
  allowed = {"tcr_jax.bases", "tcr_jax.configs_lib"}
  found = []
  for name, path in MODULES.items():
    if name in allowed:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      text = ast.unparse(node) if isinstance(node, (ast.Compare, ast.Call,
                                                     ast.Attribute)) else ""
      if isinstance(node, ast.Compare) and "task" in text and names.search(text):
        found.append(f"{name}: {text}")
      elif isinstance(node, ast.Attribute) and text.endswith("task.base"):
        found.append(f"{name}: {text}")
      elif isinstance(node, ast.Call) and re.search(r"task\.get\([\'\"]base", text):
        found.append(f"{name}: {text}")
  assert not found, found


@pytest.mark.parametrize("package", ["model", "reporting", "training", "tools", "bases"])
def test_each_folder_says_what_it_holds(package):
  doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
  assert doc and len(doc) > 40
  assert os.path.isfile(PACKAGE.parent / "docs" / "design.md")
