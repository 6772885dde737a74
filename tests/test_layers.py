"""The package imports one way only, and no module reaches itself through its imports.

Every import statement of every module counts, at the top level and inside functions, and so does an
`importlib.import_module("literal.name")` call: a lazy import is still an import. Only a name held as data (the
registering modules a registry lists and imports by a variable) is not an import edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import genlab

PACKAGE = Path(genlab.__file__).parent

# errors / registry / config and the small helpers below them  <-  data, nn, sampling  <-  models  <-  eval
#   <-  train, adapt  <-  commands, serve, the CLI
LAYERS = {
    "genlab": 0, "errors": 0, "registry": 0, "config": 0, "files": 0, "plots": 0,
    "data": 1, "nn": 1, "sampling": 1,
    "models": 2,
    "eval": 3,
    "train": 4, "adapt": 4,
    "commands": 5, "serve": 5, "cli": 5,
}


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = ("genlab", *path.relative_to(root).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _target(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that `import name` loads (the longest known prefix), or None outside the package."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _called(func: ast.expr) -> str | None:
    """The name a call calls: `f(...)` -> "f", `a.b.f(...)` -> "f"."""
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `module` imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else a name in `base`
        elif (isinstance(node, ast.Call) and _called(node.func) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        for name in names:
            target = _target(name, modules) if name.split(".")[0] == "genlab" else None
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_names(root)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    if top not in LAYERS:
        raise AssertionError(f"{module} is in no layer: add genlab.{top} to LAYERS")
    return LAYERS[top]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})"
                  for m, targets in graph.items() for t in targets if layer(t) > layer(m))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_is_in_a_layer():
    for m in import_graph():
        layer(m)


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "genlab" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "genlab"


def test_the_rules_catch_function_level_relative_and_literal_lazy_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "config.py": "def f():\n    from genlab.models import gpt\n",  # upward, inside a function
        "models/__init__.py": "",
        "models/gpt.py": "from . import export\n",  # relative
        "models/export.py": "from importlib import import_module\nimport_module('genlab.models.gpt')\n",  # literal lazy
        "registry.py": "import importlib\nMODS = ['genlab.models.gpt']\n"
                       "def load():\n    for m in MODS:\n        importlib.import_module(m)\n",  # data: no edge
    })
    graph = import_graph(root)
    assert graph["genlab.config"] == {"genlab.models.gpt"} and graph["genlab.registry"] == set()
    assert upward_imports(graph) == ["genlab.config (layer 0) imports genlab.models.gpt (layer 2)"]
    assert cycles(graph) == [["genlab.models.export", "genlab.models.gpt"]]


def test_a_module_outside_the_layers_is_reported(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "misc.py": ""})
    with pytest.raises(AssertionError, match="genlab.misc is in no layer"):
        [layer(m) for m in import_graph(root)]
