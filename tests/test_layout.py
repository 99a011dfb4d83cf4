"""The layout's import rules, read from the source with ``ast`` (scripts/import_graph.py): no cycle among the
top-level packages or among modules, and the stage order of the data's path holds (a lower stage never imports a
higher one)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_graph)

# each package may import only packages listed before it (rankstage.v1, the generated contract, imports nothing)
ORDER = ["features", "calibration", "evaluation", "ranking", "fusion", "simulation", "rankstage.v1", "serving",
         "retrieval", "rankstage"]


def package_edges() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for src, dsts in import_graph.graph().items():
        for dst in dsts:
            a, b = import_graph.package_of(src), import_graph.package_of(dst)
            if a != b:
                out.setdefault(a, set()).add(b)
    return out


def test_no_import_cycles_among_packages_or_modules():
    assert import_graph.cycles(package_edges()) == []
    assert import_graph.cycles(import_graph.graph()) == []


def test_packages_import_only_earlier_stages():
    upward = [(a, b) for a, dsts in package_edges().items() for b in dsts if ORDER.index(b) > ORDER.index(a)]
    assert upward == [], f"imports against the stage order {ORDER}: {upward}"


def test_the_cycle_finder_finds_a_planted_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_package_is_installed_by_pyproject():
    """The installed ``rankstage`` command imports from site-packages, not the checkout: a package missing from
    ``tool.setuptools.packages.find.include`` passes every test here and fails on a user's machine."""
    import fnmatch
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    missing = [p for p in packages if not any(fnmatch.fnmatch(p, pattern) for pattern in include)]
    assert set(import_graph.PACKAGES) <= set(packages) and missing == [], missing
