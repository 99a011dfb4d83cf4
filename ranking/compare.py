"""Model comparison on one time split: default MMoE, shared-bottom, one single-task model per task, LightGBM.

Every neural variant goes through ``ranking.train.train`` (same reader, split, sampling, metrics); only the config
differs. Writes ``compare.json`` and a markdown table ``compare.md`` with the headline metric per task
(AUC for binary tasks, Spearman for watch time and completion) and its bootstrap 95% interval.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from features.spec import RankstageConfig
from ranking.baselines.gbdt import run_gbdt
from ranking.train import train


def headline(m: dict) -> tuple[float, list[float]]:
    return (m["auc"], m["auc_ci95"]) if "auc" in m else (m["spearman"], m["spearman_ci95"])


def compare(config: RankstageConfig, out: str | Path, log: str | None = None, single_task: bool = True,
            gbdt: bool = True) -> dict[str, dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}

    def run(name: str, cfg: RankstageConfig) -> dict:
        run_dir = out / "runs" / name
        done = run_dir / "metrics.json"
        if done.exists() and yaml.safe_load((run_dir / "config.yaml").read_text()) == cfg.model_dump():
            print(f"== {name}: reusing {done}", flush=True)  # same config already trained: resume
        else:
            print(f"== {name}", flush=True)
            train(cfg, run_dir, log=log, verbose=False)
        return json.loads(done.read_text())["tasks"]

    results["mmoe"] = run("mmoe", config)
    results["shared_bottom"] = run("shared_bottom", config.with_model(num_experts=0))
    if single_task:
        single: dict[str, dict] = {}
        for t in config.tasks:
            single.update(run(f"single_{t.name}", config.with_tasks([t.name]).with_model(num_experts=0)))
        results["single_task"] = single
    if gbdt:
        print("== lightgbm", flush=True)
        results["lightgbm"] = run_gbdt(config, out / "runs" / "lightgbm", log=log, verbose=False)
    (out / "compare.json").write_text(json.dumps(results, indent=2))
    (out / "compare.md").write_text(markdown_table(results, [t.name for t in config.tasks]))
    print(markdown_table(results, [t.name for t in config.tasks]))
    return results


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
