"""Replay throughput: `rankstage replay --examples` (Beam, DirectRunner) on a synthetic log's shards, in one run
either the code of an earlier commit against this checkout's (``--before``) or this checkout reading the TFRecord
shards against the Parquet shards of the same rows (``--formats``). Not run in CI.

    .venv/bin/python benchmarks/bench_replay_throughput.py --rows 1000000 --work /tmp/rankstage_replay \\
        --before 0123abc --rounds 3 --out benchmarks/results/replay_throughput.json
    .venv/bin/python benchmarks/bench_replay_throughput.py --work /tmp/rankstage_replay --formats --rounds 3 \\
        --out benchmarks/results/replay_throughput.json

The log, its example shards and the exported model are built once by ``bench_scale.stages`` (synth -> features ->
train -> export, as the scale benchmark runs them; skipped when ``--work`` already holds them); with ``--formats``
the shards are built once more with ``features build --formats tfrecord,parquet`` into ``<work>/features_columnar``
(the same model reads them: same config, same rows), and both arms read that directory, ``--read-format tfrecord``
against ``--read-format parquet``. The replay runs ``--rounds`` times for each arm, alternating (``--before`` is
extracted with ``git archive`` into a temporary directory; ``after`` is this checkout), each as its own process
under ``/usr/bin/time -v``: wall seconds, CPU seconds (user + system) and peak RSS. Rows/s counts the whole process
(imports, model load and the pipeline), as ``bench_scale`` does. The load average is recorded around every run (the
machine may be shared). The two arms' replay.json must agree: counts equal, means and interval ends within
``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import cpu_model, write_report  # noqa: E402
from bench_scale import CONFIG, FUSION, RANKSTAGE, ROOT, stages, timed  # noqa: E402


def replay_command(work: Path, out: Path, beam_args: list[str], examples: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "rankstage.cli", "replay", "--model-base-path", str(work / "models"),
            "--fusion", str(FUSION), "--examples", str(examples or work / "features"), "--runner", "DirectRunner",
            *beam_args, "--out", str(out)]


def columnar_shards(work: Path) -> tuple[Path, dict]:
    """``<work>/features_columnar``: the log's shards as TFRecord and Parquet (built here when missing, timed)."""
    out = work / "features_columnar"
    if (out / "manifest.json").exists():
        return out, {}
    sets = ["--set", f"data.log={work / 'log'}", "--set", f"data.statistics.path={work / 'stats_columnar'}"]
    cmd = [*RANKSTAGE, "features", "build", "--config", str(CONFIG), *sets, "--out", str(out),
           "--runner", "DirectRunner", "--formats", "tfrecord,parquet"]
    return out, {"features_columnar": timed(cmd, work / "features_columnar.log")}


def tree_at(rev: str, into: Path) -> Path:
    """The files of commit ``rev`` under ``into`` (``git archive``; the checkout is not touched)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def cells(result: dict):
    for table in ("metrics", "differences"):
        for name, row in result[table].items():
            for metric, cell in row.items():
                yield (table, name, metric), cell


def max_difference(a: dict, b: dict) -> dict:
    """Largest |a - b| of the means and of the interval ends over every finite cell; counts compared exactly."""
    got = dict(cells(b))
    mean = ci = 0.0
    for key, cell in cells(a):
        if np.isfinite(cell["mean"]):
            mean = max(mean, abs(cell["mean"] - got[key]["mean"]))
            ci = max(ci, *(abs(x - y) for x, y in zip(cell["ci95"], got[key]["ci95"], strict=True)))
    return {"counts_equal": a["counts"] == b["counts"], "max_abs_mean_diff": mean, "max_abs_ci95_diff": ci}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=10)
    ap.add_argument("--work", default="/tmp/rankstage_replay", help="log, shards and model (built if missing)")
    arms = ap.add_mutually_exclusive_group(required=True)
    arms.add_argument("--before", help="commit whose replay code is the baseline (against this checkout)")
    arms.add_argument("--formats", action="store_true", help="this checkout reading TFRecord against Parquet shards")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--beam-arg", action="append", default=[], help="extra replay flag, e.g. --direct_num_workers=2")
    ap.add_argument("--tolerance", type=float, default=1e-9, help="largest |mean difference| between the trees")
    ap.add_argument("--out", default=str(ROOT / "reports" / "replay_throughput.json"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = Path(args.work)
    built = {}
    if not (work / "models").exists():
        work.mkdir(parents=True, exist_ok=True)
        built = stages(args.rows, args.days, work, [], ("synth", "features", "train", "export"))
    examples = None
    if args.formats:
        examples, more = columnar_shards(work)
        built |= more
    rows = sum(json.loads(((examples or work / "features") / "manifest.json").read_text())["rows_per_day"].values())
    after_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                               text=True).stdout.strip()
    before_rev = after_rev if args.formats else subprocess.run(
        ["git", "rev-parse", "--short", args.before], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "fusion", "evaluation", "features"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="replay_before-") as tmp:
        # arm -> (code tree, extra replay flags)
        if args.formats:
            trees = {"tfrecord": (ROOT, ["--read-format", "tfrecord"]), "parquet": (ROOT, ["--read-format", "parquet"])}
        else:
            trees = {"before": (tree_at(args.before, Path(tmp) / "tree"), []), "after": (ROOT, [])}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, (tree, flags) in trees.items():
                out = work / f"replay_{name}"
                load = os.getloadavg()[0]
                run = timed(replay_command(work, out, [*args.beam_arg, *flags], examples),
                            work / f"replay_{name}_{r}.log", tree)
                run |= {"load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2),
                        "rows_per_s": round(rows / run["seconds"])}
                runs[name].append(run)
                print(f"round {r + 1} {name}: {run}", flush=True)
        first, second = trees
        agree = max_difference(json.loads((work / f"replay_{first}" / "replay.json").read_text()),
                               json.loads((work / f"replay_{second}" / "replay.json").read_text()))
        agree["identical_files"] = ((work / f"replay_{first}" / "replay.json").read_bytes() ==
                                    (work / f"replay_{second}" / "replay.json").read_bytes())
    summary = {}
    for name, rs in runs.items():
        wall = float(np.median([x["seconds"] for x in rs]))
        cpu = float(np.median([x["cpu_s"] for x in rs]))
        summary[name] = {"median_s": wall, "rows_per_s": round(rows / wall), "median_cpu_s": cpu,
                         "rows_per_cpu_s": round(rows / cpu), "peak_rss_mb": max(x["peak_rss_mb"] for x in rs)}
    ratio = summary[first]["median_s"] / summary[second]["median_s"]
    cpu_ratio = summary[first]["median_cpu_s"] / summary[second]["median_cpu_s"]
    paired = [b["seconds"] / a["seconds"] for b, a in zip(runs[first], runs[second], strict=True)]
    report = {"rows": rows, "work": str(work), "arms": list(trees), "before": before_rev,
              "after": after_rev + (" + changes" if dirty else ""),
              "command": replay_command(work, work / "replay_<arm>", args.beam_arg, examples)[1:]
              + (["--read-format", "<arm>"] if args.formats else []), "rounds": args.rounds,
              "cpus": os.cpu_count(), "cpu": cpu_model(), "built": built, "runs": runs, "summary": summary,
              "speedup_of_medians": round(ratio, 3), "cpu_ratio_of_medians": round(cpu_ratio, 3),
              "speedup_per_round": [round(x, 3) for x in paired],
              "agreement": agree, "seconds": round(time.perf_counter() - t_start, 1)}
    lines = [f"{rows:,} rows, {args.rounds} rounds, " + (f"code {report['after']}, {first} vs {second}" if
                                                         args.formats else
                                                         f"before {before_rev}, after {report['after']}"),
             f"{'arm':<8} {'median s':>9} {'rows/s':>9} {'cpu s':>7} {'rows/cpu-s':>11} {'peak MB':>8}"]
    for name, s in summary.items():
        lines.append(f"{name:<8} {s['median_s']:>9.1f} {s['rows_per_s']:>9,} {s['median_cpu_s']:>7.1f} "
                     f"{s['rows_per_cpu_s']:>11,} {s['peak_rss_mb']:>8,.0f}")
    lines.append(f"speed-up (medians) {ratio:.2f}, CPU {cpu_ratio:.2f}; per round {report['speedup_per_round']}; "
                 f"{agree}")
    write_report(report, "\n".join(lines), args.out)
    if not agree["counts_equal"] or agree["max_abs_mean_diff"] > args.tolerance:
        raise SystemExit(f"the arms disagree: {agree}")


if __name__ == "__main__":
    main()
