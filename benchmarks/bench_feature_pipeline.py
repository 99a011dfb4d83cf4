"""Throughput of the Beam feature pipeline (``features.pipeline.build_features``): DirectRunner in-process against
DirectRunner with two worker processes (``--direct_num_workers 2 --direct_running_mode multi_processing``), on the
same log, alternated ``--repeats`` times so machine load hits both alike. Rows/s counts the log's rows over the
wall-clock seconds of ``build_features`` (driver preflight, pipeline, rename; TensorFlow already imported in the
driver, not in the worker processes, which import it themselves). Reports the median of each and the ratio
(multi-process / in-process; > 1 is faster). The in-memory ``read_log`` of the same log is timed once as a reference.

Usage (from the project root, env active; not run in CI):
    python benchmarks/bench_feature_pipeline.py [--config configs/kuairand.yaml] [--log LOG] [--repeats 2]
        [--buckets 16] [--out reports/bench_feature_pipeline.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _report import cpu_model, write_report

from features.logs import read_log
from features.pipeline import build_features
from features.spec import load_config

VARIANTS = {"in_process": [],
            "two_workers": ["--direct_num_workers", "2", "--direct_running_mode", "multi_processing"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/kuairand.yaml")
    ap.add_argument("--log", help="log (file, directory, glob) instead of the config's data.log")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=16)
    ap.add_argument("--out", default="reports/bench_feature_pipeline.json")
    args = ap.parse_args()
    config = load_config(args.config, [f"data.log={args.log}"] if args.log else [], None)
    import tensorflow  # noqa: F401  (the driver's import, outside every timing)

    t0 = time.perf_counter()
    t = time.perf_counter()
    frame_rows = len(read_log(config.data)) if not isinstance(config.data.log, list) else None
    pandas_s = time.perf_counter() - t
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    rows = 0
    work = Path(tempfile.mkdtemp(prefix="bench_feature_pipeline."))
    try:
        for r in range(args.repeats):
            for name, options in VARIANTS.items():
                out = work / f"{name}_{r}"
                t = time.perf_counter()
                manifest = build_features(config, out, pipeline_args=options, verbose=False, buckets=args.buckets)
                seconds[name].append(time.perf_counter() - t)
                rows = manifest["rows"]
                shutil.rmtree(out)
                print(f"{name} run {r}: {rows} rows in {seconds[name][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {v: statistics.median(s) for v, s in seconds.items()}
    rate = {v: rows / s for v, s in median.items()}
    ratio = rate["two_workers"] / rate["in_process"]
    lines = ["| variant | median s | rows/s |", "|---|---:|---:|"]
    lines += [f"| {v} | {median[v]:.1f} | {rate[v]:,.0f} |" for v in VARIANTS]
    if frame_rows is not None:
        lines.append(f"| read_log (pandas, in memory, reference) | {pandas_s:.1f} | {frame_rows / pandas_s:,.0f} |")
    lines.append(f"\ntwo_workers / in_process rows/s: {ratio:.2f} ({rows} rows, {args.buckets} buckets, "
                 f"{os.cpu_count()} cores)")
    report = {"config": args.config, "log": args.log or str(config.data.log), "rows": rows, "buckets": args.buckets,
              "repeats": args.repeats, "seconds_per_run": seconds, "rows_per_s": rate, "ratio": ratio,
              "read_log_s": pandas_s, "cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
              "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - t0, 1)}
    write_report(report, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
