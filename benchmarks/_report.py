"""What every benchmark does last: print its table and write its JSON report."""

from __future__ import annotations

import json
import platform
from pathlib import Path


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_report(report: dict, table: str, out: str | Path) -> Path:
    """Print ``table`` and write ``report`` (which holds the run's ``seconds``) as JSON to ``out``."""
    print()
    print(table)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nreport written to {out} ({report['seconds']} s)")
    return out
