"""Paired differences between two kinds of finished run, each judged on a later day it has not seen, per seed.

    .venv/bin/python scripts/paired_runs.py --days 20220503 20220504 --seeds 0 1 \
        --a seq=reports/seq_vs_plain/{day}/default@s{seed} --b plain=reports/seq_vs_plain/{day}/plain@s{seed} \
        --out reports/paired_seq_vs_plain

``--a NAME=TEMPLATE`` and ``--b NAME=TEMPLATE`` name run directories (``{day}``: the judged day, ``{until}``: the
day before it, ``{seed}``: the seed), e.g. those ``scripts/default_vs_plain.py`` and ``scripts/daily_chain.py`` keep
(``reports/chain/seed{seed}/warm_{until}``). Each pair of runs (a, b) of one seed is scored on the judged day's rows
of the ten KuaiRand days (``ranking.judging``, as those scripts judge) and compared on the same rows: a - b with a
paired 95% bootstrap interval over rows (AUC, Spearman), users (GAUC) and user-day lists (NDCG@5)
(``evaluation.metrics.paired_report``). Writes ``<out>/paired.json`` and ``paired.md``: per day, task and metric the
mean difference over seeds, then each seed's difference and interval.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import FIGURES, LOGS  # noqa: E402  (scripts/ is on sys.path as the script's directory)


def named(arg: str) -> tuple[str, str]:
    name, sep, template = arg.partition("=")
    if not sep or not name or ("{day}" not in template and "{until}" not in template):
        raise argparse.ArgumentTypeError(f"{arg!r}: expected NAME=TEMPLATE with {{day}} or {{until}} in TEMPLATE")
    return name, template


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", type=named, required=True, help="NAME=run dir template, the minuend")
    ap.add_argument("--b", type=named, required=True, help="NAME=run dir template, the subtrahend")
    ap.add_argument("--days", nargs="+", type=int, required=True, help="judged days (the runs never saw them)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.chdir(ROOT)  # the runs' side-table paths are relative to the project root

    from evaluation.metrics import paired_report
    from features.logs import read_log
    from features.spec import load_config
    from ranking.judging import judged_predictions
    from ranking.runs import load_run

    (name_a, tmpl_a), (name_b, tmpl_b) = args.a, args.b

    def run_dir(template: str, day: int, seed: int) -> Path:
        until = (datetime.strptime(str(day), "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")
        return Path(template.format(day=day, until=until, seed=seed))

    # the log as the run with the most features reads it: every column either needs (a sequence, history lists)
    widest = max((load_config(run_dir(t, args.days[0], args.seeds[0]) / "config.yaml") for t in (tmpl_a, tmpl_b)),
                 key=lambda c: len(c.features))
    data = widest.data.model_copy(update={"log": LOGS})
    frame = read_log(data)
    col = data.time_column
    results: dict[str, dict] = {}
    for day in args.days:
        rows = frame[frame[col] == day].reset_index(drop=True)
        if rows.empty:
            raise SystemExit(f"--days: {day} is not a day of the log {LOGS}")
        for seed in args.seeds:
            judged = []
            for tmpl in (tmpl_a, tmpl_b):
                path = run_dir(tmpl, day, seed)
                run = load_run(path)
                if day in run.artifacts["train_periods"] + run.artifacts["validation_periods"]:
                    raise SystemExit(f"{path}: trained on {day}; judge it on a later day")
                judged.append(judged_predictions(run.config, run.models, rows, run.artifacts["sampling"]))
            paired, types = {}, {t.name: t.type for t in run.config.tasks}
            for task in dict.fromkeys(t for t, _ in FIGURES):  # each task's bootstraps once, for all its metrics
                (y, a, users, days), (y_b, b, _, _) = judged[0][task], judged[1][task]
                if not np.array_equal(y, y_b):
                    raise SystemExit(f"{day} seed {seed} {task}: the runs were judged on different rows")
                paired[task] = paired_report(y, a, b, users, days, binary=types[task] == "binary")
            for task, metric in FIGURES:
                results.setdefault(str(day), {}).setdefault(f"{task} {metric}", {})[str(seed)] = paired[task][metric]
            print(f"{day} seed {seed}: " + ", ".join(f"{k} {v[str(seed)]['difference']:+.4f}"
                                                      for k, v in results[str(day)].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "paired.json").write_text(json.dumps({"a": args.a, "b": args.b, "days": results}, indent=1))
    md = report_md(results, name_a, name_b)
    (out / "paired.md").write_text(md)
    print(md)


def report_md(results: dict, name_a: str, name_b: str) -> str:
    lines = [f"{name_a} minus {name_b} on the same rows of a day neither saw: mean over seeds, then each seed's "
             "difference [paired 95% interval] (* = the interval excludes 0).", ""]
    for day, figures in sorted(results.items()):
        seeds = sorted(next(iter(figures.values())))
        lines += [f"### judged on {day}", "", "| figure | mean | " + " | ".join(f"seed {s}" for s in seeds) + " |",
                  "|---" * (len(seeds) + 2) + "|"]
        for figure, per in figures.items():
            cells = []
            for s in seeds:
                d, (lo, hi) = per[s]["difference"], per[s]["ci95"]
                cells.append(f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" + ("*" if lo > 0 or hi < 0 else ""))
            mean = float(np.mean([per[s]["difference"] for s in seeds]))
            lines.append(f"| {figure} | {mean:+.4f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
