"""The import graph: a strict stack ``common <- client, server <- simulations <- benchmarks``
(imports inside functions included), and no cycle between modules."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER = {"common": 0, "client": 1, "server": 1, "simulations": 2, "benchmarks": 3}


def _modules() -> dict[str, str]:
    out = {}
    for pkg in LAYER:
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(dirpath, name)
    return out


def _imports(path: str, module: str) -> set[str]:
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):  # every import, at module level or inside a function
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = module.split(".")[: -node.level]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for mod, path in mods.items():
        graph[mod] = {m for m in _imports(path, mod) if m in mods and m != mod}
    return graph


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = []
    for mod, deps in _graph().items():
        top = mod.split(".")[0]
        for dep in deps:
            other = dep.split(".")[0]
            if other != top and LAYER[other] >= LAYER[top]:
                bad.append(f"{mod} -> {dep}")
    assert not bad, "imports against the stack: " + "; ".join(sorted(bad))


def test_no_cycle_between_modules():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_the_graph_is_read():
    graph = _graph()
    assert "common.config" in graph["common.engine"] and "server.runner" in graph["server.app"]
