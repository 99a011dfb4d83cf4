"""Model comparison on one time split: default MMoE, shared-bottom, one single-task model per task, LightGBM.

Every neural variant goes through ``ranking.train.train`` (same reader, split, sampling, metrics); only the config
differs. Writes ``compare.json`` and a markdown table ``compare.md`` with the headline metric per task
(AUC for binary tasks, Spearman for watch time and completion) and its bootstrap 95% interval, and a second table
of paired differences: the MMoE against each other model on the same validation rows, resampled jointly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from features.logs import read_log, time_split
from features.spec import RankstageConfig, load_config
from ranking import metrics
from ranking.baselines.gbdt import run_gbdt
from ranking.train import PREDICTIONS, Judged, judged_predictions, load_judged, load_run, save_judged, train


def headline(m: dict) -> tuple[float, list[float]]:
    return (m["auc"], m["auc_ci95"]) if "auc" in m else (m["spearman"], m["spearman_ci95"])


def compare(config: RankstageConfig, out: str | Path, log: str | None = None, single_task: bool = True,
            gbdt: bool = True) -> dict[str, dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    judged: dict[str, Judged] = {}
    @functools.cache
    def validation_frame() -> pd.DataFrame:  # read once, only if a run from before predictions were saved needs it
        return time_split(read_log(config.data, log), config)[1]

    def predictions(run_dir: Path) -> Judged:
        path = run_dir / PREDICTIONS
        if not path.exists():
            prior = load_run(run_dir)
            save_judged(judged_predictions(prior.config, prior.models, validation_frame(), prior.artifacts["sampling"]),
                        path)
        return load_judged(path)

    def run(name: str, cfg: RankstageConfig, group: str | None = None) -> dict:
        run_dir = out / "runs" / name
        done = run_dir / "metrics.json"
        # parsed again, so fields added since the run have their defaults
        if done.exists() and load_config(run_dir / "config.yaml").model_dump() == cfg.model_dump():
            print(f"== {name}: reusing {done}", flush=True)  # same config already trained: resume
        else:
            print(f"== {name}", flush=True)
            train(cfg, run_dir, log=log, verbose=False)
        judged.setdefault(group or name, {}).update(predictions(run_dir))
        return json.loads(done.read_text())["tasks"]

    results["mmoe"] = run("mmoe", config)
    results["shared_bottom"] = run("shared_bottom", config.with_model(num_experts=0))
    if single_task:
        single: dict[str, dict] = {}
        for t in config.tasks:
            single.update(run(f"single_{t.name}", config.with_tasks([t.name]).with_model(num_experts=0), "single_task"))
        results["single_task"] = single
    if gbdt:
        print("== lightgbm", flush=True)
        results["lightgbm"] = run_gbdt(config, out / "runs" / "lightgbm", log=log, verbose=False)
        judged["lightgbm"] = load_judged(out / "runs" / "lightgbm" / PREDICTIONS)
    paired = paired_differences(config, judged, "mmoe")
    tasks = [t.name for t in config.tasks]
    (out / "compare.json").write_text(json.dumps({**results, "paired_vs_mmoe": paired}, indent=2))
    report = markdown_table(results, tasks) + "\n" + paired_table(paired, tasks)
    (out / "compare.md").write_text(report)
    print(report)
    return results


def paired_differences(config: RankstageConfig, judged: dict[str, Judged], base: str) -> dict[str, dict]:
    """Per other model and task: metric(base) - metric(other) on the same rows, with a paired 95% interval."""
    out: dict[str, dict] = {}
    for other, preds in judged.items():
        if other == base or not preds:
            continue
        out[other] = {}
        for t in config.tasks:
            if t.name not in preds or t.name not in judged[base]:
                continue
            (y, a, _), (y_other, b, _) = judged[base][t.name], preds[t.name]
            if not np.array_equal(y, y_other):
                raise ValueError(f"compare: task {t.name!r}: {base} and {other} were judged on different rows "
                                 f"({len(y)} vs {len(y_other)}); were they trained on the same log and split?")
            metric = metrics.auc if t.type == "binary" else metrics.spearman
            out[other][t.name] = metrics.paired_difference(metric, y, a, b)
    return out


def paired_table(paired: dict[str, dict], tasks: list[str]) -> str:
    others = list(paired)
    lines = ["Paired differences, mmoe minus each model on the same validation rows (95% bootstrap interval; "
             "* = excludes 0):", "", "| task | " + " | ".join(f"mmoe − {o}" for o in others) + " |",
             "|---" * (len(others) + 1) + "|"]
    for t in tasks:
        cells = []
        for o in others:
            d = paired[o].get(t)
            if d is None:
                cells.append("-")
                continue
            lo, hi = d["ci95"]
            star = "*" if lo > 0 or hi < 0 else ""
            cells.append(f"{d['difference']:+.4f} [{lo:+.3f}, {hi:+.3f}]{star}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, dict], tasks: list[str]) -> str:
    models = list(results)
    lines = ["| task (metric) | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    for t in tasks:
        cells = []
        for m in models:
            if t not in results[m]:
                cells.append("-")
                continue
            v, (lo, hi) = headline(results[m][t])
            cells.append(f"{v:.4f} [{lo:.3f}, {hi:.3f}]")
        metric = "AUC" if "auc" in results[models[0]].get(t, {"auc": 0}) else "Spearman"
        lines.append(f"| {t} ({metric}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
