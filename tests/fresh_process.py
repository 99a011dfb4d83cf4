"""Run an exported signature in a fresh Python process in which the project's packages cannot be imported:
what proves a SavedModel servable by stock TF Serving (no Python-only ops, no project code in the graph)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

PROJECT_PACKAGES = ("features", "ranking", "calibration", "fusion", "serving", "retrieval", "rankstage")

SCRIPT = textwrap.dedent("""
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(","))

    class NoProjectCode(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ImportError(f"project module {name!r} imported while serving")
            return None

    sys.meta_path.insert(0, NoProjectCode())
    try:
        import ranking  # noqa
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    import numpy as np
    import tensorflow as tf

    fn = tf.saved_model.load(sys.argv[2]).signatures[sys.argv[5]]
    with np.load(sys.argv[3]) as rows:
        outputs = fn(**{k: tf.constant(rows[k]) for k in rows.files})
    np.savez(sys.argv[4], **{k: v.numpy() for k, v in outputs.items()})
    leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
    if leaked:
        raise SystemExit(f"project modules loaded: {leaked}")
""")


def serve_in_fresh_process(version_dir: Path, rows: dict[str, np.ndarray], signature: str, tmp_path: Path
                           ) -> dict[str, np.ndarray]:
    """{input: (C,) or (1,)} -> {task: (C,)} from ``signature`` of ``version_dir``, run with project code blocked;
    fails the test if the process fails."""
    np.savez(tmp_path / "rows.npz", **{k: v.astype(str) if v.dtype == object else v for k, v in rows.items()})
    done = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, ",".join(PROJECT_PACKAGES), str(version_dir), str(tmp_path / "rows.npz"),
         str(tmp_path / "out.npz"), signature],
        cwd=tmp_path, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as got:
        return {k: got[k] for k in got.files}
