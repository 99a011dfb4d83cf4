"""Next-day levels of finished runs before and after ``training.recenter_biases``: each run's binary logit biases
recentred on the last day it trained on, then judged on the next day of the ten KuaiRand days. For runs
trained before the option existed (or with it off); a run trained with it is already recentred.

    .venv/bin/python scripts/recenter_levels.py --runs 'reports/chain_seq/seed*/full_2022050[1-3]' \
        'reports/early_seq/*/default@s*' 'reports/seq_vs_plain/20220504/default@s*' \
        --out benchmarks/results/recenter_levels

Level = predicted / observed mean on the judged day, per binary task with ≥ 100 positives there. AUC and GAUC are
printed too: a shift of one task's logit must leave them as they were. Nothing is trained or written but ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import LOGS  # noqa: E402  (scripts/ is on sys.path as the script's directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="run directories or globs")
    ap.add_argument("--out", help="write OUT.md and OUT.json")
    args = ap.parse_args()

    from features.logs import read_log
    from features.spec import parse_config
    from ranking.judging import judged_predictions, judged_report
    from ranking.recenter import recenter_biases
    from ranking.runs import load_run

    runs = sorted({p for pattern in args.runs for p in (glob.glob(pattern) or [pattern])})
    frames: dict = {}
    results = []
    for path in runs:
        run = load_run(path)
        d = run.config.model_dump()
        d["data"]["log"], d["data"]["until"] = LOGS, None
        data = parse_config(d, "recenter_levels").data
        key = json.dumps(data.model_dump(), sort_keys=True, default=str)
        if key not in frames:
            frames[key] = read_log(data)
        frame, col = frames[key], data.time_column
        last = max(run.artifacts["train_periods"])  # after a refit: the whole window's
        later = sorted(v for v in frame[col].unique() if v > last)
        if not later:
            print(f"{path}: no day after {last} in the log; skipped", flush=True)
            continue
        day = later[0]
        judged_rows = frame[frame[col] == day].reset_index(drop=True)
        sampling = run.artifacts["sampling"]

        def figures() -> dict:
            report = judged_report(run.config, judged_predictions(run.config, run.models, judged_rows, sampling))
            return {t.name: {"level": report[t.name]["predicted_mean"] / report[t.name]["observed_rate"],
                             "auc": report[t.name]["auc"], "gauc": report[t.name].get("gauc"),
                             "positives": report[t.name]["positives"]}
                    for t in run.config.tasks if t.type == "binary" and report[t.name]["positives"] >= 100}

        before = figures()
        shifts = recenter_biases(run.models, run.config, frame[frame[col] == last].reset_index(drop=True), sampling)
        after = figures()
        results.append({"run": path, "recentred_on": int(last), "judged": int(day), "shifts": shifts,
                        "before": before, "after": after})
        print(f"{path} (judged {day}): " + ", ".join(
            f"{t} {before[t]['level']:.3f} -> {after[t]['level']:.3f} (AUC {before[t]['auc']:.4f} -> "
            f"{after[t]['auc']:.4f})" for t in after), flush=True)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(results, indent=1, default=float))
        tasks = sorted({t for r in results for t in r["after"]})
        lines = ["| run | judged | " + " | ".join(f"{t} level before → after" for t in tasks) + " |",
                 "|---|---|" + "---|" * len(tasks)]
        for r in results:
            cells = [f"{r['before'][t]['level']:.3f} → {r['after'][t]['level']:.3f}" if t in r["after"] else "-"
                     for t in tasks]
            lines.append(f"| `{r['run']}` | {r['judged']} | " + " | ".join(cells) + " |")
        Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
