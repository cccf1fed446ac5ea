"""Imports point down the layers (house rule): no import cycle inside ``edgeprune``; bundle/ export/ runtime/ apart.

Static, over the source with ``ast``: every module's module-level imports (statements at the top level,
including inside module-level ``if``/``try``, and ``if TYPE_CHECKING:`` blocks) form a graph whose cycles
would make the import order matter. Function-level (lazy) imports are not edges of this graph, but they must
still respect the layering checked below for the bundle format.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgeprune"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.AST) -> list[str]:
    is_pkg = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = _resolve(module, is_pkg, node)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
        return []
    out = []
    for name in names:  # the longest known module prefix (``edgeprune.x.y.Z`` -> ``edgeprune.x.y``)
        parts = name.split(".")
        while parts and ".".join(parts) not in MODULES:
            parts.pop()
        if parts and parts[0] == "edgeprune":
            out.append(".".join(parts))
    return out


def _top_level(body: list[ast.stmt]):
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            yield stmt
        elif isinstance(stmt, ast.If):
            yield from _top_level(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try):
            yield from _top_level(stmt.body + [s for h in stmt.handlers for s in h.body] + stmt.orelse + stmt.finalbody)


def _graph(all_levels: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = ast.walk(tree) if all_levels else _top_level(tree.body)
        graph[module] = {t for n in nodes for t in _targets(module, n) if t != module}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_graph_sees_the_imports():
    graph = _graph(all_levels=False)
    assert "edgeprune.bundle.spec" in graph["edgeprune.export.spec"]
    assert "edgeprune.export.job" in graph["edgeprune.export.graphs"]


def test_no_import_cycle_in_the_package():
    cycle = _cycle(_graph(all_levels=False))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_cycle_even_through_lazy_imports_in_the_former_circles():
    """The two former circles stay open even counting function-level imports."""
    graph = _graph(all_levels=True)
    sub = {m: {t for t in ts if t.startswith(("edgeprune.export.", "edgeprune.methods."))}
           for m, ts in graph.items() if m.startswith(("edgeprune.export.", "edgeprune.methods."))}
    cycle = _cycle(sub)
    assert cycle is None, "import cycle through lazy imports: " + " -> ".join(cycle or [])


def test_bundle_format_layers():
    """bundle/ imports neither export/ nor runtime/ (nor torch/onnx); runtime/ never imports export/; export/
    imports from runtime/ only the LLaVA-NeXT packing (``runtime.anyres``, numpy host code models/ share)."""
    graph = _graph(all_levels=True)
    for module, targets in graph.items():
        if module.startswith("edgeprune.bundle"):
            assert not {t for t in targets if t.startswith(("edgeprune.export", "edgeprune.runtime"))}, module
            tree = ast.parse(MODULES[module].read_text())
            heavy = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
            heavy |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
            assert not heavy & {"torch", "onnx", "onnxruntime", "transformers"}, module
        if module.startswith("edgeprune.runtime"):
            assert not {t for t in targets if t.startswith("edgeprune.export")}, module
        if module.startswith("edgeprune.export"):
            assert {t for t in targets if t.startswith("edgeprune.runtime")} <= {"edgeprune.runtime.anyres"}, module
