"""`rankstage logs synth` and `rankstage logs import` at scale: rows/s and peak RSS (``/usr/bin/time -v``) per size,
the 5M / 1M ratios (memory should stay flat but for the id spaces, which grow with the rows), and the learnability
check on each synthetic log (click AUC on the last day: planted truth, popularity, a logistic regression).

    .venv/bin/python benchmarks/bench_synth.py [--rows 1000000 5000000] [--days 10] [--work runs/bench_synth]
        -> benchmarks/results/synth.{md,json}

The import leg writes each synthetic log back out as one CSV (pyarrow, not timed) and imports it with
configs/synthetic_scale.yaml pointed at the synthetic side tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._report import cpu_model, write_report  # noqa: E402


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: wall seconds, peak RSS (MB) and its stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    rate = re.search(r"\(([\d,]+) rows/s\)", done.stdout)  # the command's own rate, interpreter start excluded
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(rss / 1024, 1), "stdout": done.stdout.strip(),
            "rows_per_s_in_process": int(rate.group(1).replace(",", "")) if rate else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 5_000_000])
    p.add_argument("--days", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="runs/bench_synth")
    p.add_argument("--out", default="benchmarks/results/synth.json")
    args = p.parse_args()
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from features.logfiles import iter_batches, log_files
    from features.synth import learnability

    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    t_start, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for n in args.rows:
        out = work / f"synth_{n}"
        synth = timed([py, "-m", "rankstage.cli", "logs", "synth", "--rows", str(n), "--days", str(args.days),
                       "--seed", str(args.seed), "--out", str(out), "--overwrite"])
        csv = work / f"synth_{n}.csv"
        with pacsv.CSVWriter(csv, next(iter_batches(log_files(str(out))))[2].schema) as writer:
            for _, _, batch in iter_batches(log_files(str(out))):
                writer.write(pa.Table.from_batches([batch]))
        config = work / f"synthetic_scale_{n}.yaml"
        config.write_text((ROOT / "configs" / "synthetic_scale.yaml").read_text().replace("runs/synth_scale",
                                                                                          str(out)))
        imported = timed([py, "-m", "rankstage.cli", "logs", "import", "--config", str(config), "--out",
                          str(work / f"imported_{n}"), "--overwrite", str(csv)])
        csv.unlink()
        t0 = time.perf_counter()
        check = learnability(out)
        rows.append({"rows": n, "days": args.days,
                     "synth": {**synth, "rows_per_s": round(n / synth["wall_s"])},
                     "import": {**imported, "rows_per_s": round(n / imported["wall_s"])},
                     "learnability": {**check, "seconds": round(time.perf_counter() - t0, 1)}})
        print(json.dumps(rows[-1], indent=1), flush=True)
    first, last = rows[0], rows[-1]
    ratio = {leg: round(last[leg]["peak_rss_mb"] / first[leg]["peak_rss_mb"], 2) for leg in ("synth", "import")}
    lines = [f"Measured {time.strftime('%Y-%m-%d')} on {cpu_model()} ({os.cpu_count()} cores, load average "
             f"{load:.1f} at the start); wall time of the whole command (interpreter start included).", "",
             "rows/s: of the whole command / of the work itself (interpreter start and imports excluded).", "",
             "| rows | synth rows/s | synth peak RSS MB | import rows/s | import peak RSS MB | AUC truth | "
             "AUC popularity | AUC learner |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["learnability"]
        s, i = r["synth"], r["import"]
        lines.append(f"| {r['rows']:,} | {s['rows_per_s']:,} / {s['rows_per_s_in_process']:,} | {s['peak_rss_mb']} | "
                     f"{i['rows_per_s']:,} / {i['rows_per_s_in_process']:,} | {i['peak_rss_mb']} | "
                     f"{c['auc_truth']:.3f} | {c['auc_popularity']:.3f} | {c['auc_learner']:.3f} |")
    lines += ["", f"peak RSS {last['rows']:,} / {first['rows']:,} rows: synth x{ratio['synth']}, import "
              f"x{ratio['import']}"]
    table = "\n".join(lines)
    out = ROOT / args.out
    write_report({"runs": rows, "rss_ratio_last_over_first": ratio, "load_average": load,
                  "seconds": round(time.perf_counter() - t_start, 1)}, table, out)
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
