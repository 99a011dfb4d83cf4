"""Import graph of rankstage's top-level packages and modules, from ``ast`` (no imports executed).

    python scripts/import_graph.py            # package graph and any cycles; exit 1 if a cycle exists
    python scripts/import_graph.py --modules  # module-level cycles too

Imports inside functions count as well as module-level ones: a lazy import hides a loop, it does not remove it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("features", "ranking", "calibration", "fusion", "evaluation", "serving", "retrieval", "simulation",
            "rankstage")
CONTRACT = "rankstage.v1"  # the generated gRPC contract: a node of its own (it imports nothing of ours)


def package_of(module: str) -> str:
    """Top-level package of a module; the generated contract ``rankstage.v1`` counts apart from the CLI."""
    return CONTRACT if module == CONTRACT or module.startswith(CONTRACT + ".") else module.split(".")[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Project modules ``path`` imports (``from a.b import c`` counts a.b, and a.b.c if that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def graph() -> dict[str, set[str]]:
    modules = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            modules[module_name(path)] = path
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path, name) if m in modules and m != name}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="also report module-level cycles")
    args = ap.parse_args()
    edges = graph()
    pkg_edges: dict[str, set[str]] = {}
    for src, dsts in edges.items():
        for dst in dsts:
            a, b = package_of(src), package_of(dst)
            if a != b:
                pkg_edges.setdefault(a, set()).add(b)
    print("package imports (top-level package -> packages it imports):")
    for pkg in (*PACKAGES, CONTRACT):
        print(f"  {pkg:12s} -> {', '.join(sorted(pkg_edges.get(pkg, ()))) or '-'}")
    bad = 0
    pkg_cycles = cycles(pkg_edges)
    print("package cycles:", pkg_cycles or "none")
    bad += len(pkg_cycles)
    if args.modules:
        mod_cycles = cycles(edges)
        print("module cycles:", mod_cycles or "none")
        bad += len(mod_cycles)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
