"""Gradient-boosted baseline: LightGBM, one model per task, on the same joined features and time split.

Chosen because LightGBM is the standard strong tabular baseline with native categorical splits; it shares the
ranker's log reader, split and metric code, so the comparison differs only in the model. Like the ranker it stops
early on the validation period(s), following ``training.early_stopping_metric`` (patience ``EARLY_STOPPING_ROUNDS``
trees), and is judged there.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from evaluation import metrics
from features.logs import evaluation_labels, raw_inputs, read_log, task_labels, time_split
from features.spec import RankstageConfig, TaskSpec
from features.vocab import match_counts
from ranking.judging import early_stopping_monitor, judge, judged_report, save_judged
from ranking.runs import PREDICTIONS

EARLY_STOPPING_ROUNDS = 50  # trees without a better validation loss before stopping


def gbdt_frame(frame: pd.DataFrame, config: RankstageConfig, categories: dict | None = None
               ) -> tuple[pd.DataFrame, dict]:
    """Serving features as a LightGBM frame: categoricals as pandas categories (first value of multi-valued), match
    features as their counts; sequences are left out (nothing for a tree to split on without the attention)."""
    features = [f for f in config.serving_features if f.kind != "sequence"]
    raw = raw_inputs(frame, features)
    cols, cats = {}, dict(categories or {})
    for f in features:
        x = raw[f.name]
        if f.kind == "multi_valued":
            x = np.array([v.split(f.separator)[0] if v else "" for v in x], dtype=object)
        if f.kind == "match":  # the count the ranker's graph computes
            x = match_counts(x, raw[f.match], f)
        if f.kind in ("categorical", "multi_valued"):
            if f.name not in cats:
                cats[f.name] = pd.Index(pd.unique(x))
            cols[f.name] = pd.Categorical(x, categories=cats[f.name])
        else:
            cols[f.name] = x
    return pd.DataFrame(cols), cats


def _rows(labels: dict[str, np.ndarray], task) -> np.ndarray:
    """(N,) bool: rows a task trains on, as the ranker's: finite label and, if conditioned, condition positive."""
    ok = np.isfinite(labels[task.name])
    return ok & (labels[task.condition] == 1) if task.condition else ok


def stopping_metric(config: RankstageConfig, task: TaskSpec, rows: np.ndarray, frame: pd.DataFrame):
    """What a task's trees stop on, mirroring the ranker's ``training.early_stopping_metric``: None for "val_loss"
    (LightGBM's own loss of the objective), else a LightGBM eval function computing the named metric ("auc", "gauc",
    "ndcg@5"; NDCG@5 for a watch time or completion task) on the validation rows ``rows`` (N,) bool of ``frame``."""
    if early_stopping_monitor(config)[0] == "val_loss":
        return None
    name = config.training.early_stopping_metric.split("/")[1]
    name = name if task.type == "binary" else f"ndcg@{metrics.NDCG_K}"
    gain = evaluation_labels(frame, config)[task.name][rows]  # real seconds for watch time, as judged
    users = frame[config.data.user_column].to_numpy()[rows]
    days = frame[config.data.time_column].to_numpy()[rows]

    def evaluate(_y: np.ndarray, pred: np.ndarray) -> tuple[str, float, bool]:  # -> (name, value, higher is better)
        return name, metrics.ranking_metric(name, gain, pred, users, days), True

    return evaluate


def run_gbdt(config: RankstageConfig, out: str | Path | None = None, log: str | None = None,
             num_trees: int = 1000, seed: int = 0, verbose: bool = True) -> dict[str, dict]:
    """Train one LightGBM per task on the training periods, at most ``num_trees`` trees, stopping early on the
    validation periods (the ranker's validation day); report validation metrics like the ranker's and the number of
    trees kept per task."""
    df = read_log(config.data, log)
    train_df, val_df = time_split(df, config)
    x_tr, cats = gbdt_frame(train_df, config)
    x_va, _ = gbdt_frame(val_df, config, cats)
    y_tr = task_labels(train_df, config.tasks)
    y_va = task_labels(val_df, config.tasks)  # as trained (watch time capped), like the ranker's val_loss
    preds: dict[str, np.ndarray] = {}
    trees: dict[str, int] = {}
    for t in config.tasks:
        t0 = time.perf_counter()
        ok, ok_va = _rows(y_tr, t), _rows(y_va, t)
        objective = {"binary": "binary", "watch_time": "regression", "completion": "cross_entropy"}[t.type]
        model = lgb.LGBMRegressor if t.type != "binary" else lgb.LGBMClassifier
        follow = stopping_metric(config, t, ok_va, val_df)
        m = model(n_estimators=num_trees, objective=objective, learning_rate=0.05, num_leaves=63,
                  min_child_samples=50, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                  random_state=seed, verbose=-1, **({"metric": "None"} if follow else {}))  # only ``follow``
        # watch time: fit log1p(seconds) (heavy tail; the stronger baseline for rank metrics), serve expm1
        y, y_val = ((np.log1p(v) if t.type == "watch_time" else v) for v in (y_tr[t.name][ok], y_va[t.name][ok_va]))
        with warnings.catch_warnings():  # eval_set: its successor eval_X/eval_y needs lightgbm >= 4.6 (we allow 4.3)
            warnings.filterwarnings("ignore", message=".*'eval_set' is deprecated")
            m.fit(x_tr[ok], y, eval_set=[(x_va[ok_va], y_val)], eval_metric=follow,
                  callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, first_metric_only=True, verbose=False)])
        trees[t.name] = int(m.best_iteration_ or num_trees)  # predict uses the best iteration
        p = m.predict_proba(x_va)[:, 1] if t.type == "binary" else m.predict(x_va)
        preds[t.name] = np.expm1(p) if t.type == "watch_time" else p
        if verbose:
            print(f"lightgbm {t.name}: {trees[t.name]} trees of at most {num_trees} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    judged = judge(config, val_df, preds)
    report = judged_report(config, judged)
    for name, n in trees.items():
        report[name]["num_trees"] = n
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_judged(judged, Path(out) / PREDICTIONS)
        (Path(out) / "metrics.json").write_text(json.dumps(
            {"tasks": report, "model": "lightgbm", "num_trees": trees, "max_trees": num_trees,
             "early_stopping_rounds": EARLY_STOPPING_ROUNDS,
             "early_stopping_metric": config.training.early_stopping_metric}, indent=2))
    return report
