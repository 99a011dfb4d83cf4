"""LightGBM with and without the behaviour sequence (as counts), judged on a day no model saw (issue 21).

    PYTHONPATH=$PWD .venv/bin/python scripts/gbdt_sequence_eval.py --days 20220503 20220504 --seeds 0 1 --threads 2

For each judged day and LightGBM seed, and each config (configs/kuairand_nosequence.yaml, no sequence; configs/kuairand
.yaml, whose ``clicked_videos`` reaches the trees as ``ranking.baselines.gbdt.sequence_counts``): one LightGBM per
judged task trained on the ten KuaiRand-Pure days up to ``data.until`` = the day before the judged day, that last day
its validation day (early stopping on click GAUC, as the configs say), then scored on the judged day
(``ranking.judging``): click AUC, GAUC and NDCG@5 over user-day lists, like AUC, long view AUC, watch time Spearman.
Only the tasks behind those figures are trained. Writes a markdown table (per judged day and config: the mean over
seeds, then each seed's value) with the command, date and commit, and the raw figures as JSON beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import FIGURES, LOGS, seed_row  # noqa: E402  (scripts/ is on sys.path as the script's directory)

CONFIGS = {"no sequence": "configs/kuairand_nosequence.yaml", "sequence as counts": "configs/kuairand.yaml"}


def day_before(day: int) -> int:
    return int((datetime.strptime(str(day), "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--days", type=int, nargs="+", default=[20220503, 20220504], help="judged days")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="LightGBM seeds (random_state)")
    ap.add_argument("--trees", type=int, default=1000, help="at most this many trees per task (early stopping)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gbdt_sequence.md"))
    args = ap.parse_args()
    os.chdir(ROOT)  # the configs' side-table paths are relative to the project root

    from features.logs import read_log, time_split
    from features.spec import load_config
    from ranking.baselines.gbdt import fit_gbdt, predict_gbdt
    from ranking.judging import judge, judged_report

    started = time.perf_counter()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    tasks = sorted({t for t, _ in FIGURES})
    results: dict = {"days": {}, "seconds": {}}
    for name, path in CONFIGS.items():
        base = load_config(path, tasks=tasks)
        t0 = time.perf_counter()
        frame = read_log(base.data, LOGS)  # history lists and statistics are point-in-time: one read for every day
        results["seconds"][f"{name}: read"] = round(time.perf_counter() - t0, 1)
        col = base.data.time_column
        for day in args.days:
            config = base.model_copy(update={"data": base.data.model_copy(update={"until": day_before(day)})})
            train_df, val_df = time_split(frame, config)
            judged_rows = frame[frame[col] == day].reset_index(drop=True)
            for seed in args.seeds:
                t0 = time.perf_counter()
                fitted = fit_gbdt(config, train_df, val_df, args.trees, seed, threads=args.threads, verbose=False)
                report = judged_report(config, judge(config, judged_rows, predict_gbdt(fitted, config, judged_rows)))
                got = {f"{t} {m}": report[t][m] for t, m in FIGURES}
                got.update({f"{t} trees": n for t, n in fitted.trees.items()})
                results["days"].setdefault(str(day), {}).setdefault(name, {})[str(seed)] = got
                results["seconds"][f"{name} {day} s{seed}"] = round(time.perf_counter() - t0, 1)
                print(f"{day} {name} s{seed} ({time.perf_counter() - t0:.0f} s): {json.dumps(got)}", flush=True)
    results["seconds"]["total"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    command = "PYTHONPATH=$PWD .venv/bin/python scripts/gbdt_sequence_eval.py " + " ".join(sys.argv[1:])
    out.write_text(report_md(results, command, commit, args))
    print(out.read_text())


def report_md(results: dict, command: str, commit: str, args: argparse.Namespace) -> str:
    names = [f"{t} {m}" for t, m in FIGURES]
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# LightGBM with the behaviour sequence as counts, judged on a day no model saw", "",
             f"Run {date}, commit `{commit}`, {args.threads} LightGBM threads, at most {args.trees} trees per task, "
             f"{results['seconds']['total'] / 60:.1f} min in all.", "", "```bash", command, "```", "",
             "Trained through the day before the judged day (that day its validation day: early stopping on click "
             "GAUC), judged on the next day; mean over LightGBM seeds, then each seed's value.", ""]
    for day, per in sorted(results["days"].items()):
        lines += [f"### judged on {day}", "", "| LightGBM | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        lines += [seed_row(name, [r for _, r in sorted(by_seed.items())], names) for name, by_seed in per.items()]
        diff = [np.mean([per["sequence as counts"][s][n] - per["no sequence"][s][n] for s in per["no sequence"]])
                for n in names] if len(per) == 2 else []
        if diff:
            lines.append("| difference (mean) | " + " | ".join(f"{d:+.4f}" for d in diff) + " |")
        trees = {name: {s: {k.split()[0]: v for k, v in r.items() if k.endswith(" trees")} for s, r in by.items()}
                 for name, by in per.items()}
        lines += ["", f"Trees kept per task and seed: `{json.dumps(trees)}`", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
