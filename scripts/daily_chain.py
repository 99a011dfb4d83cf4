"""The daily chain on the ten KuaiRand days: stale / full retrain / warm start, each judged on the next day.

    .venv/bin/python scripts/daily_chain.py [--seeds 0 1] [--out reports/daily_chain]
    .venv/bin/python scripts/daily_chain.py --reuse reports/daily_chain --warm-lr 3e-4 --warm-buffer 1 --out ...

Start: the default config trained through Apr 30 with ``--refit`` (the stale model, and the first parent). For each
day D of May 1-3: a full retrain through D (``data.until=D``, validated on D, refit through D) and a warm start
through D from the previous day's warm start (``ranking.warm_start``: trained on D only, or with ``--warm-buffer``
earlier days too; ``training.epochs`` = ``--warm-epochs``, at ``--warm-lr``, updating the ``--warm-update``
weights), both timed; then the stale model, the full retrain and the warm start are judged on D+1 (May 2, 3, 4) on
the same rows: click AUC and GAUC, like AUC, long view AUC, watch time Spearman, and each binary task's predicted /
observed mean. Writes
``<out>/daily_chain.json`` and ``<out>/daily_chain.md`` (per judged day and model: the mean over seeds and each
seed's value). About 22 min on 2 cores for two seeds; with ``--reuse`` (the warm starts only) about 4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import seed_row, through_day  # noqa: E402  (scripts/ is on sys.path as the script's directory)

CHAIN = [20220501, 20220502, 20220503]
FIGURES = [("click", "auc"), ("click", "gauc"), ("like", "auc"), ("long_view", "auc"), ("watch_time", "spearman")]
LEVELS = ["click", "like", "long_view"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "kuairand.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--warm-epochs", type=int, default=1)
    ap.add_argument("--warm-lr", type=float, help="the warm starts' learning rate (default: the config's)")
    ap.add_argument("--warm-buffer", type=int, default=0,
                    help="a replay buffer: each warm start on D also trains on the N days before D")
    ap.add_argument("--reuse", help="a previous chain's --out: its stale models and full retrains are linked, not "
                                    "trained again (only the warm starts run)")
    ap.add_argument("--train-stale", action="store_true",
                    help="with --reuse: train the stale models again (a run before optimizer.npz kept no Adam state)")
    ap.add_argument("--warm-update", choices=["all", "embeddings"], default="all",
                    help="what the warm starts update (training.warm_start_update)")
    ap.add_argument("--warm-blend", type=float, default=0.25,
                    help="the fraction of its update a warm start's dense weights keep (training.warm_start_blend)")
    ap.add_argument("--no-recenter", action="store_true",
                    help="the warm starts keep their updated logit biases (training.recenter_biases: false)")
    ap.add_argument("--fresh-adam", action="store_true",
                    help="warm starts start Adam fresh (training.warm_start_optimizer: false)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "daily_chain"))
    args = ap.parse_args()
    os.chdir(ROOT)  # the config's side-table paths are relative to the project root

    from features.logs import read_log
    from ranking.judging import judged_predictions, judged_report
    from ranking.runs import load_run
    from ranking.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = through_day(args.config, out / "stats", "daily chain")
    data = config(0, 20220504).data
    frame = read_log(data)
    col = data.time_column
    results: dict = {"seeds": args.seeds, "warm_epochs": args.warm_epochs, "warm_lr": args.warm_lr,
                     "warm_buffer": args.warm_buffer, "reuse": args.reuse,
                     "train_stale": args.train_stale, "fresh_adam": args.fresh_adam,
                     "warm_update": args.warm_update, "warm_blend": args.warm_blend,
                     "recenter": not args.no_recenter, "days": {}, "seconds": {}}
    warm_training = {"epochs": args.warm_epochs, "warm_start_optimizer": not args.fresh_adam,
                     "warm_start_update": args.warm_update, "warm_start_blend": args.warm_blend,
                     "recenter_biases": not args.no_recenter,
                     **({"learning_rate": args.warm_lr} if args.warm_lr else {})}
    chain_days = sorted({int(d) for d in frame[col].unique()})

    def reuse(run_dir: Path) -> None:
        """Link ``run_dir`` to the same run of ``--reuse`` (stale and full retrains do not depend on the warm
        settings)."""
        if args.reuse and not run_dir.exists():
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run_dir.symlink_to(Path(args.reuse).resolve() / run_dir.parent.name / run_dir.name)

    def judge(run_dir: Path, day: int) -> dict:
        run = load_run(run_dir)
        rows = frame[frame[col] == day].reset_index(drop=True)
        report = judged_report(run.config, judged_predictions(run.config, run.models, rows, run.artifacts["sampling"]))
        got = {f"{t} {m}": report[t][m] for t, m in FIGURES}
        for t in LEVELS:
            got[f"{t} level"] = report[t]["predicted_mean"] / report[t]["observed_rate"]
        return got

    for seed in args.seeds:
        runs = out / f"seed{seed}"
        t0 = time.perf_counter()
        stale = runs / "through_20220430"
        if not args.train_stale:
            reuse(stale)
        if not (stale / "metrics.json").exists():
            train(config(seed, 20220430), stale, refit=True, verbose=False)
        if not args.reuse or args.train_stale:
            results["seconds"].setdefault("stale (through Apr 30, refit)", []).append(time.perf_counter() - t0)
        parent = stale
        for day in CHAIN:
            judged_day = day + 1
            full, warm = runs / f"full_{day}", runs / f"warm_{day}"
            reuse(full)
            days = chain_days[max(0, chain_days.index(day) - args.warm_buffer):chain_days.index(day) + 1]
            t0 = time.perf_counter()
            if not (full / "metrics.json").exists():
                train(config(seed, day), full, refit=True, verbose=False)
            if not args.reuse:
                results["seconds"].setdefault(f"full retrain through {day}", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            if not (warm / "metrics.json").exists():
                train(config(seed, day, **warm_training), warm, verbose=False, warm_start=parent, days=days)
            results["seconds"].setdefault(f"warm start on {day}", []).append(time.perf_counter() - t0)
            parent = warm
            per = results["days"].setdefault(str(judged_day), {})
            for name, run_dir in (("stale", stale), ("full retrain", full), ("warm start", warm)):
                per.setdefault(name, []).append(judge(run_dir, judged_day))
            print(f"seed {seed}: judged {judged_day}: " + json.dumps({k: v[-1] for k, v in per.items()}), flush=True)
            (out / "daily_chain.json").write_text(json.dumps(results, indent=1))
    (out / "daily_chain.md").write_text(report_md(results))
    print(report_md(results))


def report_md(results: dict) -> str:
    names = [f"{t} {m}" for t, m in FIGURES] + [f"{t} level" for t in LEVELS]
    lines = [f"Daily chain, seeds {results['seeds']} (mean, then each seed); level = predicted / observed mean.", ""]
    for day, per in results["days"].items():
        lines += [f"### judged on {day}", "", "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [seed_row(model, rows, names) for model, rows in per.items()]
        lines.append("")
    lines += ["| step | seconds per seed |", "|---|---|"]
    lines += [f"| {k} | {', '.join(f'{v:.0f}' for v in vals)} |" for k, vals in results["seconds"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
