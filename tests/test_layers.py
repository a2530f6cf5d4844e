"""The package's import graph: lower layers never import higher ones (wordlist < pipeline <
trainer < world), and no two modules import each other, directly or round a longer circle
(imports inside functions count: they are still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("seacore", "wordlist", "pipeline", "trainer", "world", "paper")
LAYER = {"seacore": 0, "wordlist": 0, "pipeline": 1, "trainer": 2, "world": 3, "paper": 3}


def _graph() -> dict[str, set[str]]:
    mods = {f"{p.parent.name}.{p.stem}" if p.stem != "__init__" else p.parent.name: p
            for pkg in PACKAGES for p in (REPO / pkg).glob("*.py")}
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                found.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_the_checker_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_no_module_circle():
    assert _cycles(_graph()) == []


def test_lower_layers_never_import_higher_ones():
    bad = [(a, b) for a, deps in _graph().items() for b in deps
           if LAYER[b.split(".")[0]] > LAYER[a.split(".")[0]]]
    assert bad == []
