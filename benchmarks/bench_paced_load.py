"""How much ``ranking.servable.paced_load`` slows the loading thread, on this machine, against a baseline run alike.

The work is ``--calls`` small Python calls (what loading a SavedModel mostly is). Variants, timed round-robin in
each of ``--rounds`` rounds so load from elsewhere on a shared machine hits them alike:

    baseline          the work, no pacing                                                              [baseline]
    duty 1            paced_load(1.0): switch interval 0.5 ms and the garbage collector off, no profile hook
    hook, no sleep    paced_load(0.25) with its sleep replaced by a no-op: the profile hook's own cost
    duty 0.5, 0.25    paced_load(duty): the loader sleeps slice * (1 - duty) / duty after each 1 ms slice

Reported per variant: the median seconds and the medians of same-round ratios to the baseline and to "hook, no
sleep". A paced variant's ideal ratio to the hook alone is 1 / duty; ``time.sleep`` oversleeping raises it, and the
hook's own cost (large for these tiny calls, smaller for a real load) is the ratio of "hook, no sleep" to baseline.
CPU / wall is the share of the time the loading thread actually ran: at most the duty, below 1 for the
baseline when other processes share the cores (and a thread that runs in short bursts between sleeps likely competes
better than one that runs flat out, so on a loaded machine the paced ratios fall below 1 / duty).
The accounting itself (sleep per slice, work per slice) is tested on a fake clock in ``tests/test_paced_load.py``;
this is the machine's part, not asserted anywhere.

Usage (from the project root):  python benchmarks/bench_paced_load.py [--calls 300000] [--rounds 7]
                                                                       [--out reports/bench_paced_load.json]
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
from _report import cpu_model, write_report

from ranking.servable import paced_load

VARIANTS = {
    "baseline": lambda: contextlib.nullcontext(),
    "duty 1": lambda: paced_load(1.0),
    "hook, no sleep": lambda: paced_load(0.25, sleep=lambda s: None),
    "duty 0.5": lambda: paced_load(0.5),
    "duty 0.25": lambda: paced_load(0.25),
}
IDEAL = {"hook, no sleep": 1.0, "duty 0.5": 2.0, "duty 0.25": 4.0}  # ratio to "hook, no sleep": 1 / duty


def python_work(n: int) -> None:
    def f(i: int) -> int:
        return i + 1

    for i in range(n):
        f(i)


def timed(variant: str, calls: int) -> tuple[float, float]:
    """-> (wall seconds, this thread's CPU seconds) of the work under ``variant``."""
    with VARIANTS[variant]():
        t0, c0 = time.perf_counter(), time.thread_time()
        python_work(calls)
        return time.perf_counter() - t0, time.thread_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default="reports/bench_paced_load.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    for v in VARIANTS:  # warm
        timed(v, args.calls // 10)
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[:r % len(VARIANTS)]  # rotate who goes first
        for v in order:
            wall, used = timed(v, args.calls)
            seconds[v].append(wall)
            cpu[v].append(used)
    base, hook = np.asarray(seconds["baseline"]), np.asarray(seconds["hook, no sleep"])
    results, lines = {}, ["| variant | median s | ratio to baseline | ratio to hook, no sleep | ideal ratio to hook "
                          "| CPU / wall (the loader's share of the time) |", "|---|---|---|---|---|---|"]
    for v, s in seconds.items():
        s = np.asarray(s)
        ratio, to_hook = float(np.median(s / base)), float(np.median(s / hook))  # medians of same-round ratios
        share = float(np.median(np.asarray(cpu[v]) / s))
        results[v] = {"median_s": float(np.median(s)), "ratio_to_baseline": ratio, "ratio_to_hook": to_hook,
                      "ideal_ratio_to_hook": IDEAL.get(v), "cpu_share": share, "seconds": s.tolist(),
                      "cpu_seconds": cpu[v]}
        lines.append(f"| {v} | {np.median(s):.4f} | {ratio:.2f} | {to_hook:.2f} | {IDEAL.get(v, '')} | {share:.2f} |")
    write_report({"results": results, "calls": args.calls, "rounds": args.rounds, "cpu": cpu_model(),
                  "seconds": round(time.perf_counter() - t_start, 1)}, "\n".join(lines), args.out)


if __name__ == "__main__":
    main()
