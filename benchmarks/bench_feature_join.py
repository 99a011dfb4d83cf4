"""Cost of the server-side feature join (``serving.features.FeatureTables.assemble``) against training's pandas path.

A request is what the gateway sends: one real user of the newest day, that user's context, and C distinct item ids
drawn from the items logged that day; every side-table feature is joined by the service. Two variants, timed
round-robin in blocks of calls over the same rotating set of requests, so machine load hits both alike:

    feature_tables   FeatureTables.assemble: a key lookup per table, one np.take per feature    [the service]
    pandas_merge     a C-row frame, join_side_tables (pandas merge) and raw_inputs               [baseline: training]

Both variants' outputs are checked equal (user features broadcast) before timing. Reports p50/p99 per C and the
ratio of each p50 to the baseline's (< 1 is faster).

Usage (from the project root, env active):
    python benchmarks/bench_feature_join.py [--config configs/kuairand.yaml] [--out reports/bench_feature_join.json]
"""

# ruff: noqa: E402  (sys.path is fixed before the project imports)
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this file's folder comes first on sys.path and benchmarks/serving.py would shadow the `serving`
# package (as in benchmarks/serving.py).
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import numpy as np
import pandas as pd

from benchmarks._report import write_report
from features.logs import join_side_tables, load_side_tables, raw_column, raw_inputs, read_log
from features.spec import RankstageConfig, load_config
from features.statistics import serving_joins
from serving.features import FeatureTables

BASELINE = "pandas_merge"
SIZES = (100, 500, 1000)

Request = tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]


def make_requests(config: RankstageConfig, day: pd.DataFrame, c: int, n: int, seed: int) -> list[Request]:
    """``n`` requests of ``c`` candidates: a logged (user, context) of ``day`` and ``c`` distinct items of the day."""
    rng = np.random.default_rng(seed)
    user, item = config.data.user_column, config.data.item_column
    # the context, the same-day history lists (match features) and the behaviour sequence: sent by the gateway,
    # one per request
    context = [f for f in config.serving_features if f.group == "context" or f.kind in ("match", "sequence")]
    items = day[item].unique()
    requests = []
    for pos in rng.choice(len(day), size=n, replace=False):
        row = day.iloc[pos:pos + 1]
        request = {user: row[user].to_numpy(), **{f.name: raw_column(row, f) for f in context}}
        requests.append((request, {item: rng.choice(items, size=c, replace=False)}, c))
    return requests


def assemble_call(tables: FeatureTables, config: RankstageConfig) -> Callable[[Request], dict[str, np.ndarray]]:
    features = config.serving_features

    def call(req: Request) -> dict[str, np.ndarray]:
        request_inputs, candidate_inputs = tables.assemble(features, *req)
        return {**request_inputs, **candidate_inputs}

    return call


def merge_call(config: RankstageConfig) -> Callable[[Request], dict[str, np.ndarray]]:
    sides = load_side_tables(config.data, serving_joins(config.data))  # side tables + statistics snapshots
    features = config.serving_features

    def call(req: Request) -> dict[str, np.ndarray]:
        request, candidates, c = req
        frame = pd.DataFrame({**{k: np.repeat(v, c) for k, v in request.items()}, **candidates})
        return raw_inputs(join_side_tables(frame, sides), features)

    return call


def check_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray], c: int) -> None:
    for name, values in b.items():
        got = np.broadcast_to(a[name], (c,))
        if got.dtype != values.dtype or not np.array_equal(got, values, equal_nan=values.dtype.kind == "f"):
            raise AssertionError(f"feature {name!r}: assemble and the pandas merge disagree")


def time_round_robin(variants: dict[str, Callable], requests: list[Request], iters: int, block: int,
                     ) -> dict[str, np.ndarray]:
    """Milliseconds per call of each variant, ``iters`` calls each, alternating in blocks of ``block`` calls."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    k = 0
    while k < iters:
        for name, call in variants.items():
            for i in range(k, min(k + block, iters)):
                req = requests[i % len(requests)]
                t0 = time.perf_counter()
                call(req)
                times[name].append((time.perf_counter() - t0) * 1e3)
        k += block
    return {name: np.array(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/kuairand.yaml")
    parser.add_argument("--iters", type=int, default=600, help="timed calls per variant and size")
    parser.add_argument("--block", type=int, default=20, help="calls per variant before switching")
    parser.add_argument("--requests", type=int, default=50, help="distinct requests rotated per size")
    parser.add_argument("--out", default="reports/bench_feature_join.json")
    args = parser.parse_args()
    start, load_start = time.perf_counter(), os.getloadavg()[0]

    config = load_config(args.config)
    log = read_log(config.data)
    newest = log[config.data.time_column].max()
    day = log[log[config.data.time_column] == newest].reset_index(drop=True)
    t0 = time.perf_counter()
    tables = FeatureTables.load(config)
    load_s = time.perf_counter() - t0
    variants = {"feature_tables": assemble_call(tables, config), BASELINE: merge_call(config)}

    results: dict[int, dict[str, dict[str, float]]] = {}
    for c in SIZES:
        requests = make_requests(config, day, c, args.requests, seed=c)
        for req in requests:
            check_equal(variants["feature_tables"](req), variants[BASELINE](req), c)
        for call in variants.values():  # warm: first calls build pandas' hash tables
            call(requests[0])
        times = time_round_robin(variants, requests, args.iters, args.block)
        base = float(np.median(times[BASELINE]))
        results[c] = {name: {"p50_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
                             "ratio_p50": float(np.median(t)) / base} for name, t in times.items()}

    load_avg = (load_start, os.getloadavg()[0])
    tables_used = [j.path for j in config.data.joins]
    lines = [f"feature join, {len(config.serving_features)} serving features, side tables {tables_used}",
             f"(tables loaded in {load_s:.2f} s; {args.iters} calls per variant and size; newest day {newest}; "
             f"load average {load_avg[0]:.2f} at the start, {load_avg[1]:.2f} at the end)", "",
             "| variant | " + " | ".join(f"C={c} p50 / p99 ms" for c in SIZES) + " | ratio p50 |",
             "|---|" + "---|" * (len(SIZES) + 1)]
    for name in variants:
        cells = [f"{results[c][name]['p50_ms']:.3f} / {results[c][name]['p99_ms']:.3f}" for c in SIZES]
        ratios = " / ".join(f"{results[c][name]['ratio_p50']:.3f}" for c in SIZES)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratios} |")
    report = {"config": args.config, "newest_day": str(newest), "load_seconds": load_s, "iters": args.iters,
              "machine": platform.platform(), "load_average": load_avg, "baseline": BASELINE,
              "results": {str(c): r for c, r in results.items()}, "seconds": round(time.perf_counter() - start, 1)}
    write_report(report, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
