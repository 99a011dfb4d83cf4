"""Gradient-boosted baseline: LightGBM, one model per task, on the same joined features and time split.

Chosen because LightGBM is the standard strong tabular baseline with native categorical splits; it shares the
ranker's log reader, split and metric code, so the comparison differs only in the model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from features.logs import raw_inputs, read_log, task_labels, time_split
from features.spec import RankstageConfig
from ranking.train import PREDICTIONS, judge, judged_report, save_judged


def gbdt_frame(frame: pd.DataFrame, config: RankstageConfig, categories: dict | None = None
               ) -> tuple[pd.DataFrame, dict]:
    """Serving features as a LightGBM frame: categoricals as pandas categories (first value of multi-valued)."""
    raw = raw_inputs(frame, config.serving_features)
    cols, cats = {}, dict(categories or {})
    for f in config.serving_features:
        x = raw[f.name]
        if f.kind == "multi_valued":
            x = np.array([v.split(f.separator)[0] if v else "" for v in x], dtype=object)
        if f.kind in ("categorical", "multi_valued"):
            if f.name not in cats:
                cats[f.name] = pd.Index(pd.unique(x))
            cols[f.name] = pd.Categorical(x, categories=cats[f.name])
        else:
            cols[f.name] = x
    return pd.DataFrame(cols), cats


def run_gbdt(config: RankstageConfig, out: str | Path | None = None, log: str | None = None,
             num_trees: int = 300, seed: int = 0, verbose: bool = True) -> dict[str, dict]:
    """Train one LightGBM per task on the training periods; report validation metrics like the ranker's."""
    df = read_log(config.data, log)
    train_df, val_df = time_split(df, config)
    x_tr, cats = gbdt_frame(train_df, config)
    x_va, _ = gbdt_frame(val_df, config, cats)
    y_tr = task_labels(train_df, config.tasks)
    preds: dict[str, np.ndarray] = {}
    for t in config.tasks:
        t0 = time.perf_counter()
        ok = np.isfinite(y_tr[t.name])
        objective = {"binary": "binary", "watch_time": "regression", "completion": "cross_entropy"}[t.type]
        model = lgb.LGBMRegressor if t.type != "binary" else lgb.LGBMClassifier
        m = model(n_estimators=num_trees, objective=objective, learning_rate=0.05, num_leaves=63,
                  min_child_samples=50, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                  random_state=seed, verbose=-1)
        # watch time: fit log1p(seconds) (heavy tail; the stronger baseline for rank metrics), serve expm1
        y = np.log1p(y_tr[t.name][ok]) if t.type == "watch_time" else y_tr[t.name][ok]
        m.fit(x_tr[ok], y)
        p = m.predict_proba(x_va)[:, 1] if t.type == "binary" else m.predict(x_va)
        preds[t.name] = np.expm1(p) if t.type == "watch_time" else p
        if verbose:
            print(f"lightgbm {t.name}: trained ({time.perf_counter() - t0:.1f} s)", flush=True)
    judged = judge(config, val_df, preds)
    report = judged_report(config, judged)
    if verbose:
        for name, m in report.items():
            print(f"lightgbm {name}: {m.get('auc', m.get('spearman')):.4f}", flush=True)
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        save_judged(judged, Path(out) / PREDICTIONS)
        (Path(out) / "metrics.json").write_text(json.dumps({"tasks": report, "model": "lightgbm",
                                                            "num_trees": num_trees}, indent=2))
    return report
