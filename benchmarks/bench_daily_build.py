"""The daily feature build of a warm start: from the whole log against from the previous build's state
(``features.carry``), on the same log and day, alternated ``--repeats`` times so machine load hits both alike.

A build through the day before (``data.until`` = D - 1) writes the state; then the examples of day D are built
(``DaySelect`` of D, ``data.until`` = D) by reading every day of the log (the baseline: what a warm start did
before states) and by reading day D alone plus the state. Each build runs in its own process (TensorFlow imported
before the clock starts), which reports its wall seconds and peak RSS. The two outputs' examples are compared
row for row once. Reports medians and the ratio baseline / state (> 1: the state is faster).

Usage (from the project root, env active; not run in CI):
    python benchmarks/bench_daily_build.py [--config configs/kuairand.yaml] [--set KEY=VALUE ...] [--day D]
        [--repeats 3] [--out benchmarks/results/daily_build.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import cpu_model, write_report

ROOT = Path(__file__).resolve().parent.parent


def _config(path: str, sets: list[str], until=None):
    from features.spec import load_config

    return load_config(path, [*sets, *([f"data.until={until}"] if until is not None else [])], None)


def log_days(config) -> list:
    """The log's distinct time values, sorted (the time column read alone)."""
    import pandas as pd

    from features.logfiles import iter_batches, log_files

    values: set = set()
    for _, _, batch in iter_batches(log_files(config.data.log), columns=[config.data.time_column]):
        values |= set(pd.unique(batch.column(0).to_pandas()).tolist())
    return sorted(values)


def one(args: argparse.Namespace) -> None:
    """A child: one build, printing {"seconds", "peak_rss_gb", "rows"} as its last line."""
    import tensorflow  # noqa: F401  (outside the timing, as a warm start's process has it already)

    from features.pipeline import DaySelect, build_features

    config = _config(args.config, args.set, args.until)
    days = DaySelect(config.data.time_column, values=(args.day,)) if args.day is not None else None
    t = time.perf_counter()
    manifest = build_features(config, args.one, verbose=False, days=days, state_from=args.state_from)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "rows": manifest["rows"],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))


def child(args: argparse.Namespace, out: Path, until, day=None, state_from: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--config", args.config, "--one", str(out), "--until", str(until)]
    cmd += [a for s in args.set for a in ("--set", s)]
    cmd += ["--day", str(day)] if day is not None else []
    cmd += ["--state-from", str(state_from)] if state_from is not None else []
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_examples(a: Path, b: Path, day) -> bool:
    """Whether two builds' examples of ``day`` are equal row for row (by row id) and column for column."""
    import numpy as np

    from features import examples

    cols = [examples.Column(**c) for c in json.loads((a / "schema.json").read_text())]
    x, y = ({k: v[np.argsort(c[examples.ROW], kind="stable")] for k, v in c.items()}
            for c in (examples.read_columns(sorted((d / "examples" / f"date={day}").glob("*" + examples.SUFFIX)),
                                            cols) for d in (a, b)))
    return all(np.array_equal(x[c.name], y[c.name], equal_nan=True) if c.kind == "float"
               else x[c.name].tolist() == y[c.name].tolist() for c in cols)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/kuairand.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--day", type=int, help="the day built (default: the log's last)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="reports/bench_daily_build.json")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--until", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--state-from", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    config = _config(args.config, args.set)
    days = log_days(config)
    day = args.day if args.day is not None else days[-1]
    before = max(d for d in days if d < day)
    work = Path(tempfile.mkdtemp(prefix="bench_daily_build."))
    runs: dict[str, list[dict]] = {"whole log": [], "from the state": []}
    try:
        t0 = time.perf_counter()
        base = child(args, work / "base", before)
        print(f"build through {before} (writes the state): {base['seconds']:.1f} s, {base['rows']} rows", flush=True)
        for r in range(args.repeats):
            for name in runs:
                out = work / f"{'whole' if name == 'whole log' else 'state'}_{r}"
                got = child(args, out, day, day, work / "base" if name == "from the state" else None)
                runs[name].append(got)
                print(f"{name} {r}: {got['seconds']:.1f} s, peak RSS {got['peak_rss_gb']:.2f} GB", flush=True)
                if r == 0 and name == "from the state":
                    equal = same_examples(work / "whole_0", out, day)
                    print(f"examples of {day} equal: {equal}", flush=True)
                if r > 0:
                    shutil.rmtree(out)
        med = {n: statistics.median(g["seconds"] for g in v) for n, v in runs.items()}
        rss = {n: statistics.median(g["peak_rss_gb"] for g in v) for n, v in runs.items()}
        report = {
            "benchmark": "daily feature build: whole log vs the previous build's state",
            "config": args.config, "sets": args.set, "log_days": len(days), "day": day,
            "rows_of_day": runs["from the state"][0]["rows"], "examples_equal": equal,
            "runs": runs, "median_seconds": med, "median_peak_rss_gb": rss,
            "ratio_whole_over_state": med["whole log"] / med["from the state"],
            "base_build_seconds": base["seconds"], "seconds": round(time.perf_counter() - t0, 1),
            "machine": {"cpu": cpu_model(), "python": platform.python_version()},
        }
        table = "\n".join([
            f"day {day} ({report['rows_of_day']} rows) of a {len(days)}-day log, {args.repeats} runs each; examples "
            f"equal: {equal}",
            "| build | median s | median peak RSS GB |", "|---|---|---|",
            *(f"| {n} | {med[n]:.1f} | {rss[n]:.2f} |" for n in runs),
            f"ratio whole log / state: {report['ratio_whole_over_state']:.2f}"])
        write_report(report, table, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
