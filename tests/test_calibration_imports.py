"""The calibration package sits below fusion and serving: it imports nothing from ranking/, fusion/ or serving/
(at module level or inside a function), so replay, tuning and serving can all use it without a loop."""

from __future__ import annotations

import ast
from pathlib import Path

CALIBRATION = Path(__file__).resolve().parent.parent / "calibration"
UPWARD = ("ranking", "fusion", "serving")


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every ``import x`` / ``from x import y`` anywhere in the file (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_calibration_imports_nothing_upward():
    files = sorted(CALIBRATION.glob("*.py"))
    assert len(files) >= 5  # the package was found
    upward = {f.name: sorted(imported_packages(f) & set(UPWARD)) for f in files}
    assert {f: pkgs for f, pkgs in upward.items() if pkgs} == {}


def test_the_check_sees_a_lazy_import(tmp_path):
    """The walk finds imports inside functions, as calibration/fit.py once had (``from fusion.replay import ...``)."""
    path = tmp_path / "m.py"
    path.write_text("import numpy\n\ndef f():\n    from fusion.replay import score_log\n    import ranking.train\n")
    assert imported_packages(path) == {"numpy", "fusion", "ranking"}
