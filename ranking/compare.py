"""Model comparison on one time split: default MMoE, shared-bottom, PLE, the plain MMoE peer (DeepCTR's), one
single-task model per task, LightGBM.

Every neural variant goes through ``ranking.train.train`` (same reader, split, sampling, metrics); only the config
differs. Writes ``compare.json`` and ``compare.md``: per model and task the global metric (AUC for binary tasks,
Spearman for watch time and completion), GAUC (binary tasks) and NDCG@5 over user-day lists, each with its bootstrap
95% interval; then, for the same three, paired differences of the MMoE against each other model on the same
validation rows, resampling rows (AUC, Spearman), users (GAUC) or lists (NDCG) jointly.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import metrics
from features.logs import read_log, time_split
from features.spec import RankstageConfig, load_config, parse_config
from ranking.baselines.gbdt import run_gbdt
from ranking.judging import Judged, judged_predictions, judged_report, load_judged, save_judged
from ranking.runs import PREDICTIONS, load_run
from ranking.train import train

NDCG = f"ndcg@{metrics.NDCG_K}"


def metric_names(m: dict) -> list[str]:
    """The metrics a task's report holds, in table order: global (AUC or Spearman), GAUC, NDCG@5."""
    return [k for k in ("auc", "spearman", "gauc", NDCG) if k in m]


def _label(metric: str) -> str:
    return {"auc": "AUC", "spearman": "Spearman", "gauc": "GAUC"}.get(metric, metric.upper())


PLAIN_EMBEDDING_DIM = 16


def plain_mmoe(config: RankstageConfig) -> RankstageConfig:
    """The plain MMoE peer (DeepCTR's ``MMOE`` with its defaults) on ``config``'s log, split and tasks: every
    categorical and multi-valued feature as a 16-d embedding, the numeric ones as they are, no statistics, no
    history lists, match or sequence features, no bias tower; no shared bottom, 4 experts of 256-128 under one
    softmax gate per task (no gate dropout), towers of 64; every task's loss weight 1; 2 epochs at batch 512, Adam at
    1e-3, no early stopping (the second epoch's weights: patience 2 never stops within 2 epochs, and the best of the
    two by the validation metric is kept, as the default is)."""
    data = config.model_dump()
    stat_names = {f["name"] for f in config.data.statistics.feature_specs()} if config.data.statistics else set()
    features = []
    for f in data["features"]:
        if f["name"] in stat_names or f["kind"] in ("match", "sequence") or f.get("bias"):
            continue
        if f["kind"] in ("categorical", "multi_valued"):
            f["embedding_dim"] = PLAIN_EMBEDDING_DIM
        f["towers"] = None
        features.append(f)
    data["features"] = features
    data["data"]["statistics"] = None
    data["data"]["history"] = None
    for t in data["tasks"]:
        t["loss_weight"] = 1.0
    data["model"].update(embedding_dim=PLAIN_EMBEDDING_DIM, bottom_units=[], num_experts=4, expert_units=[256, 128],
                         gate_dropout=0.0, ple=None, tower_units=[64], dropout=0.0,
                         bias_tower={"tasks": [], "position": None, "device": None})
    data["training"].update(epochs=2, batch_size=512, learning_rate=1e-3, early_stopping_patience=2,
                            negative_sampling={"task": None, "keep_fraction": 1.0}, pairwise_task=None)
    return parse_config(data, "plain MMoE peer (ranking.compare.plain_mmoe)")


def compare(config: RankstageConfig, out: str | Path, log: str | None = None, single_task: bool = True,
            gbdt: bool = True, ple: bool = True, plain: bool = True) -> dict[str, dict]:
    """Train and judge every variant on ``config``'s split; ``ple``: PLE with its defaults (1 task expert, 2 shared,
    2 levels) unless the config already sets ``model.ple``; ``plain``: the plain MMoE peer (``plain_mmoe``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    judged: dict[str, Judged] = {}
    @functools.cache
    def validation_frame() -> pd.DataFrame:  # read once, only if a run from before predictions were saved needs it
        return time_split(read_log(config.data, log), config)[1]

    def predictions(run_dir: Path) -> Judged:
        path = run_dir / PREDICTIONS
        if not path.exists() or not _has_days(path):
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
        preds = predictions(run_dir)
        judged.setdefault(group or name, {}).update(preds)
        report = json.loads(done.read_text())["tasks"]
        if any(NDCG not in m for m in report.values()):  # a run from before within-user metrics: judge it again
            report = judged_report(cfg, preds)
        return report

    results["mmoe"] = run("mmoe", config)
    results["shared_bottom"] = run("shared_bottom", config.with_model(num_experts=0))
    if ple:
        results["ple"] = run("ple", config if config.model.ple else config.with_model(ple={}))
    if plain:
        results["plain_mmoe"] = run("plain_mmoe", plain_mmoe(config))
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


def compare_runs(runs: dict[str, Path], out: str | Path | None = None) -> str:
    """Finished training runs judged side by side: ``runs`` maps a name to a run directory, the first is the base.
    Their saved validation predictions must cover the same rows (same log and validation days). Returns the markdown
    table and paired differences (base minus each other run), written to ``<out>/compare.md`` / ``compare.json``."""
    names = list(runs)
    config = load_config(Path(runs[names[0]]) / "config.yaml")
    results = {n: json.loads((Path(d) / "metrics.json").read_text())["tasks"] for n, d in runs.items()}
    judged = {n: load_judged(Path(d) / PREDICTIONS) for n, d in runs.items()}
    paired = paired_differences(config, judged, names[0])
    tasks = [t.name for t in config.tasks]
    report = markdown_table(results, tasks) + "\n" + paired_table(paired, tasks, base=names[0])
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.json").write_text(json.dumps({**results, f"paired_vs_{names[0]}": paired}, indent=2))
        (out / "compare.md").write_text(report)
    return report


def _has_days(path: Path) -> bool:
    with np.load(path, allow_pickle=False) as z:
        return any(k.endswith("/day") for k in z.files)


def paired_differences(config: RankstageConfig, judged: dict[str, Judged], base: str) -> dict[str, dict]:
    """Per other model, task and metric: metric(base) - metric(other) on the same rows, with a paired 95% interval
    -> {other: {task: {"auc" | "spearman" | "gauc" | "ndcg@5": {"difference", "ci95"}}}}."""
    out: dict[str, dict] = {}
    for other, preds in judged.items():
        if other == base or not preds:
            continue
        out[other] = {}
        for t in config.tasks:
            if t.name not in preds or t.name not in judged[base]:
                continue
            (y, a, users, days), (y_other, b, _, _) = judged[base][t.name], preds[t.name]
            if not np.array_equal(y, y_other):
                raise ValueError(f"compare: task {t.name!r}: {base} and {other} were judged on different rows "
                                 f"({len(y)} vs {len(y_other)}); were they trained on the same log and split?")
            out[other][t.name] = metrics.paired_report(y, a, b, users, days, binary=t.type == "binary")
    return out


def _interval(v: float, ci: list[float], signed: bool = False) -> str:
    lo, hi = ci
    if signed:
        return f"{v:+.4f} [{lo:+.3f}, {hi:+.3f}]" + ("*" if lo > 0 or hi < 0 else "")
    return f"{v:.4f} [{lo:.3f}, {hi:.3f}]"


def paired_table(paired: dict[str, dict], tasks: list[str], base: str = "mmoe") -> str:
    others = list(paired)
    lines = [f"Paired differences, {base} minus each model on the same validation rows (95% bootstrap interval over "
             "rows for AUC/Spearman, users for GAUC, lists for NDCG; * = excludes 0):", "",
             "| task | metric | " + " | ".join(f"{base} − {o}" for o in others) + " |",
             "|---" * (len(others) + 2) + "|"]
    for t in tasks:
        names = next((list(paired[o][t]) for o in others if t in paired[o]), [])
        for name in names:
            cells = [_interval(paired[o][t][name]["difference"], paired[o][t][name]["ci95"], signed=True)
                     if t in paired[o] and name in paired[o][t] else "-" for o in others]
            lines.append(f"| {t} | {_label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(results: dict[str, dict], tasks: list[str]) -> str:
    """Per task and metric (global, GAUC, NDCG@5) a row, per model a column: value [95% interval]."""
    models = list(results)
    lines = ["| task | metric | " + " | ".join(models) + " |", "|---" * (len(models) + 2) + "|"]
    for t in tasks:
        names = next((metric_names(results[m][t]) for m in models if t in results[m]), [])
        for name in names:
            cells = [_interval(results[m][t][name], results[m][t].get(f"{name}_ci95", [np.nan, np.nan]))
                     if name in results[m].get(t, {}) else "-" for m in models]
            lines.append(f"| {t} | {_label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
