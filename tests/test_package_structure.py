"""The package's architecture, checked: no import cycles, and the routing core stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_moe_patch

ROOT = Path(hf_moe_patch.__file__).parent
SUBPACKAGES = {"embeddings", "data", "training", "sharing"}
ENTRY_POINTS = {"hf_moe_patch", "hf_moe_patch.cli", "hf_moe_patch.testing"}  # may import anything


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Intra-package imports of every module, at module level and inside functions."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import x` names a module, `from .x import y` a module too
                for alias in node.names if not node.module else [None]:
                    full = f"{target}.{alias.name}" if alias is not None else target
                    deps.add(full if full in modules else target)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_moe_patch."):
                deps.add(node.module)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_no_import_cycles_between_modules():
    graph = import_graph()
    # a package's __init__ re-exporting its own modules is not a cycle of the design
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in edges[node]:
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, f"import cycles: {cycles}"


def test_the_routing_core_imports_no_subpackage():
    graph = import_graph()
    core = [m for m in graph if m.count(".") <= 1 and m not in ENTRY_POINTS and m.split(".")[-1] not in SUBPACKAGES]
    core += [m for m in graph if m.split(".")[1:2] and m.split(".")[1] in {"ops", "methods", "families"}]
    offenders = {m: sorted(d for d in graph[m] if d.split(".")[1:2] and d.split(".")[1] in SUBPACKAGES) for m in core}
    assert not {m: d for m, d in offenders.items() if d}, offenders
    assert "hf_moe_patch.patching" in core and "hf_moe_patch.lm" in core


def test_routing_rules_import_no_transformers():
    """Routing algorithms are pure tensor functions: ops/ and methods/ never import transformers."""
    for sub in ("ops", "methods"):
        for path in (ROOT / sub).glob("*.py"):
            tree = ast.parse(path.read_text())
            names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            assert not [n for n in names if n.split(".")[0] == "transformers"], path


def test_every_test_marked_slow_exists():
    """`make test-quick` leaves out conftest.SLOW_TESTS: a renamed test must not silently drop out."""
    from conftest import SLOW_TESTS

    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    assert not [name for name in SLOW_TESTS if f"def {name}(" not in sources]
