"""The shape of the package: data flows one way between its top-level parts.

Imports are read from the source (every import statement, lazy ones inside functions included),
nothing is imported, so the checks see what a reader of the code sees.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "retrainer"
#: Private TensorFlow APIs: allowed in this one module, each beside its public fallback.
TF_INTERNALS = "_tf_internals.py"
PRIVATE_TF = re.compile(r"\b(tensorflow\.(python|lite\.python|core)\b|atexit\._run_exitfuncs)")


def _parts() -> set[str]:
    return ({p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
            | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()})


def _imports(path: Path) -> list[tuple[str, int]]:
    """Absolute module names imported by ``path``, with line numbers."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            out.append((root, node.lineno))
            out += [(f"{root}.{a.name}", node.lineno) for a in node.names]
    return out


def part_graph() -> dict[str, dict[str, str]]:
    """{part: {imported part: "file:line"}} between retrainer's top-level parts."""
    parts = _parts()

    def part_of(module: str) -> str | None:
        bits = module.split(".")
        return bits[1] if len(bits) > 1 and bits[0] == "retrainer" and bits[1] in parts else None

    edges: dict[str, dict[str, str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        here = part_of(".".join(rel.with_suffix("").parts))
        if here is None:  # retrainer/__init__.py: the lazy public API, above every part
            continue
        for module, line in _imports(path):
            there = part_of(module)
            if there and there != here:
                edges.setdefault(here, {}).setdefault(there, f"{rel}:{line}")
    return edges


def cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one part (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b": ""}, "b": {"c": ""}}) == []


def test_no_import_cycles_between_parts() -> None:
    edges = part_graph()
    assert "training" in edges and "bottlenecks" in edges["training"]  # the reader sees imports
    found = cycles(edges)
    described = ["; ".join(f"{a} -> {b} ({edges[a][b]})" for a in comp for b in edges.get(a, {})
                           if b in comp) for comp in found]
    assert not found, "\n".join(described)


def test_private_tensorflow_apis_live_in_one_module() -> None:
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if PRIVATE_TF.search(p.read_text(encoding="utf-8")))
    assert users in ([], [TF_INTERNALS]), users


def test_only_the_cli_imports_click() -> None:
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                   if not p.relative_to(PACKAGE).parts[0] == "cli"
                   and re.search(r"^\s*(import click|from click)", p.read_text(encoding="utf-8"), re.M))
    assert users == []
