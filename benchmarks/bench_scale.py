"""Scale: the offline stages on synthetic logs of growing size, rows/s and peak RSS per stage and size.

    .venv/bin/python benchmarks/bench_scale.py --rows 1000000 10000000 --out reports/bench_scale

For each size N: ``rankstage logs synth`` (N rows, day-partitioned Parquet) -> ``rankstage features build``
(Beam, DirectRunner) -> ``rankstage train --examples`` (one epoch from the TFRecord shards) -> ``rankstage
replay --examples`` (Beam, RunInference) after an export. Every stage runs as its own process under
``/usr/bin/time -v``, so the peak RSS is the stage's own (children included for multi-process runners). Ratios are
against the smallest size measured in the same run: rows/s within 20% and peak RSS at 10x rows within 1.3x mean cost
linear in rows and memory flat in log size. Writes ``<out>/scale.json`` and ``<out>/scale.md``; not run in CI.
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

ROOT = Path(__file__).resolve().parent.parent
RANKSTAGE = [sys.executable, "-m", "rankstage.cli"]
CONFIG = ROOT / "configs" / "synthetic_scale.yaml"
FUSION = ROOT / "configs" / "fusion.yaml"  # its profiles use the synthetic log's tasks


def timed(cmd: list[str], log: Path, root: Path = ROOT) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` with the code of ``root`` (cwd and PYTHONPATH); -> {seconds,
    peak_rss_mb, cpu_s (user + system)}. Output goes to ``log``."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)})
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "cpu_s": round(sum(cpu), 1) if cpu else None}


STAGES = ("synth", "features", "train", "export", "replay")


def stages(rows: int, days: int, work: Path, beam_args: list[str], names: tuple[str, ...] = STAGES
           ) -> dict[str, dict]:
    log_dir, feat, run, models = work / "log", work / "features", work / "run", work / "models"
    sets = ["--set", f"data.log={log_dir}", "--set", f"data.statistics.path={work / 'stats'}",
            "--set", "training.epochs=1"]
    plan = {
        "synth": [*RANKSTAGE, "logs", "synth", "--rows", str(rows), "--days", str(days), "--out", str(log_dir)],
        "features": [*RANKSTAGE, "features", "build", "--config", str(CONFIG), *sets, "--out", str(feat),
                     "--runner", "DirectRunner", *beam_args],
        "train": [*RANKSTAGE, "train", "--config", str(CONFIG), *sets, "--examples", str(feat), "--out", str(run)],
        "export": [*RANKSTAGE, "export", "--run", str(run), "--model-base-path", str(models)],
        "replay": [*RANKSTAGE, "replay", "--model-base-path", str(models), "--fusion", str(FUSION),
                   "--examples", str(feat),
                   "--runner", "DirectRunner", *beam_args, "--out", str(work / "replay")],
    }
    out = {}
    for name, cmd in ((n, plan[n]) for n in names):
        print(f"[{rows:,} rows] {name} ...", file=sys.stderr, flush=True)
        out[name] = timed(cmd, work / f"{name}.log")
        out[name]["rows_per_s"] = round(rows / out[name]["seconds"]) if out[name]["seconds"] else None
        if name == "features":  # how many passes over disjoint users the pipeline chose (1 per 1M rows)
            out[name]["passes"] = json.loads((feat / "manifest.json").read_text()).get("passes", 1)
        print(f"[{rows:,} rows] {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def report(results: dict[int, dict[str, dict]]) -> str:
    sizes = sorted(results)
    base = sizes[0]
    lines = ["| stage | " + " | ".join(f"{n:,} rows: rows/s, peak RSS MB" for n in sizes) +
             " | rows/s ratio | RSS ratio |", "|---|" + "---|" * (len(sizes) + 2)]
    for stage in results[base]:
        cells = [f"{results[n][stage]['rows_per_s']:,} , {results[n][stage]['peak_rss_mb']:,}" for n in sizes]
        top = sizes[-1]
        r_speed = results[top][stage]["rows_per_s"] / results[base][stage]["rows_per_s"]
        r_rss = results[top][stage]["peak_rss_mb"] / results[base][stage]["peak_rss_mb"]
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {r_speed:.2f} | {r_rss:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--work", default="/tmp/rankstage_scale", help="scratch directory (logs, shards, runs)")
    ap.add_argument("--out", default="reports/bench_scale")
    ap.add_argument("--beam-arg", action="append", default=[], help="extra Beam option, e.g. --direct_num_workers=2")
    args = ap.parse_args()
    results = {}
    for n in args.rows:
        work = Path(args.work) / f"rows_{n}"
        if work.exists():
            subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        results[n] = stages(n, args.days, work, args.beam_arg)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    (out / "scale.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
