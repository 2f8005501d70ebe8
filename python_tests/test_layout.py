"""The package's layering: no import cycle anywhere in ``cda2_ext`` (through a package's
``__init__.py`` and inside a folder too), and the layers import downwards only, as
docs/architecture.md describes them.

Imports are read from the source (every ``import`` statement, also inside functions and under
``TYPE_CHECKING``), so a cycle that only a lazy import hides still counts.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cda2_ext"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
#: The compiled extension: a submodule (``from .. import _C`` imports it, not the package's names)
#: that imports nothing of the package.
COMPILED = {"cda2_ext._C"}


def _imports(name: str, path: Path) -> Set[str]:
    """The modules of ``cda2_ext`` that module ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import sub` imports the submodule; `from pkg import name`, the package
            subs = {f"{target}.{a.name}" for a in node.names} & (set(MODULES) | COMPILED)
            out |= subs if subs else {target}
    return {m for m in out if m in MODULES and m != name}


GRAPH: Dict[str, Set[str]] = {n: _imports(n, p) for n, p in MODULES.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_import_reader_sees_the_package():
    assert {"cda2_ext.cli", "cda2_ext.jobs.train", "cda2_ext.ops.reference"} <= set(MODULES)
    assert "cda2_ext.training.config" in GRAPH["cda2_ext.jobs.train"]
    assert "cda2_ext.ops._checks" in GRAPH["cda2_ext.ops.reference"]  # `from . import _checks`
    # and the cycle finder finds a cycle where there is one
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_in_the_package():
    assert _cycles(GRAPH) == []


#: The layers of docs/architecture.md, lowest first: a module may import its own layer and the
#: layers before it, never a later one.
LAYERS = [
    ["ops"], ["errors", "limits", "runtime", "registry"], ["data"], ["storage"], ["plotting"],
    ["models"], ["attacks"], ["xor"], ["evaluation"], ["training"], ["jobs"], ["reproduce"], ["cli"],
]


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} belongs to no layer of docs/architecture.md")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "cda2_ext"))
def test_every_import_goes_down_the_layers(module):
    # e.g. the checkpoint files may not rebuild a model from its TrainConfig: training/restore.py
    # does, above both
    upward = sorted(m for m in GRAPH[module] if m != "cda2_ext" and _layer(m) > _layer(module))
    assert upward == [], f"{module} imports from a higher layer: {upward}"


def test_experiments_drive_the_library_not_the_command_line():
    reproduce = [m for m in MODULES if m.startswith("cda2_ext.reproduce")]
    assert reproduce
    for m in reproduce:
        assert not any(i.startswith("cda2_ext.cli") for i in GRAPH[m]), m
