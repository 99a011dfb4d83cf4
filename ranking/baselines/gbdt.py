"""Gradient-boosted baseline: LightGBM, one model per task, on the same joined features and time split.

Chosen because LightGBM is the standard strong tabular baseline with native categorical splits; it shares the
ranker's log reader, split and metric code, so the comparison differs only in the model. Like the ranker it stops
early on the validation period(s), following ``training.early_stopping_metric`` (patience ``EARLY_STOPPING_ROUNDS``
trees), and is judged there (``run_gbdt``); ``fit_gbdt`` and ``predict_gbdt`` judge it on a later day.

A behaviour sequence reaches the trees as counts (``sequence_counts``): its length, how many events share the
candidate's video, author or tag (all events and the newest ``RECENT_EVENTS``), the mean and newest play ratio and
age, from the same raw string the ranker's attention reads, so a gain of the attention over this peer is the
attention's, not the data's.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd

from evaluation import metrics
from features.logs import MISSING_INT, evaluation_labels, raw_column, raw_inputs, read_log, task_labels, time_split
from features.spec import FeatureSpec, RankstageConfig, TaskSpec
from features.vocab import match_counts
from ranking.judging import early_stopping_monitor, judge, judged_report, save_judged
from ranking.runs import PREDICTIONS

EARLY_STOPPING_ROUNDS = 50  # trees without a better validation loss before stopping
RECENT_EVENTS = 5  # a sequence's target counts are also taken over its newest this many events


def _candidate_tokens(values: np.ndarray, feature: FeatureSpec) -> np.ndarray:
    """(N,) object: the candidate's value of a sequence field's target as an event stores it (a decimal string for
    an int id, the first value of a multi-valued string), None when missing, so it never matches."""
    if feature.raw_dtype == "int":
        return np.array([None if v == MISSING_INT else str(v) for v in values.tolist()], dtype=object)
    if feature.kind == "multi_valued":
        values = [v.strip().split(feature.separator)[0] if v else "" for v in values]
    return np.array([v if v else None for v in values], dtype=object)


def sequence_counts(texts: np.ndarray, feature: FeatureSpec, candidates: dict[str, np.ndarray],
                    features: dict[str, FeatureSpec], age_field: int | None = None) -> dict[str, np.ndarray]:
    """A sequence feature's raw (N,) strings as (N,) float64 columns a tree can split on, given the candidate's raw
    values of the fields' targets (``candidates``, name -> (N,)).

    Events and fields are split as the ranker's ``SequenceFields`` does (strip, the first ``max_values`` events at
    ",", each stripped and cut into its fields at ":", missing fields ""), and an event counts only if its first
    field is non-empty (the attention's ``valid``). Per row:

    - ``<name>_len``: the number of events;
    - per ``target`` field: ``<name>_<target>_count``, the events whose field equals the candidate's value of the
      target (for a multi-valued target its *first* value, as each event stores its video's first tag; a missing
      candidate value matches nothing), and ``<name>_<target>_recent``, the same over the newest ``RECENT_EVENTS``;
    - per ``boundaries`` field (named ``age`` when it is ``age_field``, else ``field<j>``): ``_mean`` over the
      events whose field is a finite number and ``_newest``, the newest event's value; NaN when there is none.
    """
    assert feature.sequence is not None
    n, name, spec = len(texts), feature.name, feature.sequence
    events = pd.Series(texts, dtype=object).fillna("").astype(str).str.strip().str.split(",").explode()
    row = events.index.to_numpy()
    pos = events.groupby(level=0, sort=False).cumcount().to_numpy()
    keep = pos < feature.max_values
    row, pos = row[keep], pos[keep]
    split = events[keep].fillna("").str.strip().str.split(":", expand=True, n=len(spec.fields))  # (E, <= F + 1)
    tokens = split.reindex(columns=range(len(spec.fields))).to_numpy(dtype=object)  # (E, F), None / NaN if absent
    tokens = np.where(pd.isna(tokens), "", tokens)
    valid = tokens[:, 0] != ""
    row, pos, tokens = row[valid], pos[valid], tokens[valid]

    def per_row(mask: np.ndarray) -> np.ndarray:  # (E,) bool -> (N,) how many of each row's events
        return np.bincount(row[mask], minlength=n).astype(np.float64)

    out = {f"{name}_len": per_row(np.ones(len(row), dtype=bool))}
    newest = np.unique(row, return_index=True)  # rows with events, the index of each one's first (newest) event
    for j, fld in enumerate(spec.fields):
        field = tokens[:, j]  # (E,)
        if fld.target is not None:
            want = _candidate_tokens(candidates[fld.target], features[fld.target])  # (N,)
            hit = pd.notna(want)[row] & (field == want[row])  # (E,)
            out[f"{name}_{fld.target}_count"] = per_row(hit)
            out[f"{name}_{fld.target}_recent"] = per_row(hit & (pos < RECENT_EVENTS))
        else:
            label = "age" if j == age_field else f"field{j}"
            x = pd.to_numeric(pd.Series(field), errors="coerce").to_numpy(dtype=np.float64)  # (E,), NaN if not one
            ok = np.isfinite(x)
            with np.errstate(invalid="ignore"):
                out[f"{name}_{label}_mean"] = np.bincount(row[ok], x[ok], minlength=n) / per_row(ok)
            last = np.full(n, np.nan)
            last[newest[0]] = np.where(ok, x, np.nan)[newest[1]]
            out[f"{name}_{label}_newest"] = last
    return out


def _age_field(feature: FeatureSpec, config: RankstageConfig) -> int | None:
    """The index of a sequence's age field: the last, when a ``data.history`` list with ``age`` builds it."""
    lists = {x.name: x for x in config.data.history.lists} if config.data.history else {}
    made = lists.get(feature.source)
    return made.fields - 1 if made is not None and made.age else None


def gbdt_frame(frame: pd.DataFrame, config: RankstageConfig, categories: dict | None = None
               ) -> tuple[pd.DataFrame, dict]:
    """Serving features as a LightGBM frame: categoricals as pandas categories (first value of multi-valued), match
    features as their counts, each sequence as the counts and means of ``sequence_counts`` (what a tree can use of
    the events the ranker attends over)."""
    feats = {f.name: f for f in config.features}
    features = config.serving_features
    raw = raw_inputs(frame, [f for f in features if f.kind != "sequence"])
    cols, cats = {}, dict(categories or {})
    for f in features:
        if f.kind == "sequence":
            targets = {t.target: raw[t.target] if t.target in raw else raw_column(frame, feats[t.target])
                       for t in f.sequence.fields if t.target is not None}
            cols.update(sequence_counts(raw_column(frame, f), f, targets, feats, _age_field(f, config)))
            continue
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


@dataclass(frozen=True)
class FittedGBDT:
    """LightGBM models fitted per task, with what predicting on other rows needs: the categories of ``gbdt_frame``
    and the number of trees each kept (early stopping; ``predict`` uses that many)."""

    models: dict[str, lgb.LGBMModel]
    categories: dict
    trees: dict[str, int]


def fit_gbdt(config: RankstageConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, num_trees: int = 1000,
             seed: int = 0, threads: int | None = None, verbose: bool = True) -> FittedGBDT:
    """One LightGBM per task on ``train_df``, at most ``num_trees`` trees, stopping early on ``val_df`` (the
    ranker's validation day) as ``stopping_metric`` says; ``threads`` caps LightGBM's threads (None: its default)."""
    x_tr, cats = gbdt_frame(train_df, config)
    x_va, _ = gbdt_frame(val_df, config, cats)
    y_tr = task_labels(train_df, config.tasks)
    y_va = task_labels(val_df, config.tasks)  # as trained (watch time capped), like the ranker's val_loss
    models: dict[str, lgb.LGBMModel] = {}
    trees: dict[str, int] = {}
    for t in config.tasks:
        t0 = time.perf_counter()
        ok, ok_va = _rows(y_tr, t), _rows(y_va, t)
        objective = {"binary": "binary", "watch_time": "regression", "completion": "cross_entropy"}[t.type]
        model = lgb.LGBMRegressor if t.type != "binary" else lgb.LGBMClassifier
        follow = stopping_metric(config, t, ok_va, val_df)
        m = model(n_estimators=num_trees, objective=objective, learning_rate=0.05, num_leaves=63,
                  min_child_samples=50, subsample=0.8, subsample_freq=1, colsample_bytree=0.8,
                  random_state=seed, verbose=-1, **({"n_jobs": threads} if threads else {}),
                  **({"metric": "None"} if follow else {}))  # only ``follow``
        # watch time: fit log1p(seconds) (heavy tail; the stronger baseline for rank metrics), serve expm1
        y, y_val = ((np.log1p(v) if t.type == "watch_time" else v) for v in (y_tr[t.name][ok], y_va[t.name][ok_va]))
        with warnings.catch_warnings():  # eval_set: its successor eval_X/eval_y needs lightgbm >= 4.6 (we allow 4.3)
            warnings.filterwarnings("ignore", message=".*'eval_set' is deprecated")
            m.fit(x_tr[ok], y, eval_set=[(x_va[ok_va], y_val)], eval_metric=follow,
                  callbacks=[lgb.early_stopping(EARLY_STOPPING_ROUNDS, first_metric_only=True, verbose=False)])
        models[t.name], trees[t.name] = m, int(m.best_iteration_ or num_trees)  # predict uses the best iteration
        if verbose:
            print(f"lightgbm {t.name}: {trees[t.name]} trees of at most {num_trees} "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return FittedGBDT(models, cats, trees)


def predict_gbdt(fitted: FittedGBDT, config: RankstageConfig, frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Task -> (N,) predictions on ``frame``'s rows, served as the ranker's are: probabilities for binary tasks,
    seconds for watch time (expm1 of the fitted log1p), a ratio for completion."""
    x, _ = gbdt_frame(frame, config, fitted.categories)
    preds = {}
    for t in config.tasks:
        m = fitted.models[t.name]
        p = m.predict_proba(x)[:, 1] if t.type == "binary" else m.predict(x)
        preds[t.name] = np.expm1(p) if t.type == "watch_time" else p
    return preds


def run_gbdt(config: RankstageConfig, out: str | Path | None = None, log: str | None = None,
             num_trees: int = 1000, seed: int = 0, verbose: bool = True) -> dict[str, dict]:
    """Train one LightGBM per task on the training periods, at most ``num_trees`` trees, stopping early on the
    validation periods (the ranker's validation day); report validation metrics like the ranker's and the number of
    trees kept per task."""
    df = read_log(config.data, log)
    train_df, val_df = time_split(df, config)
    fitted = fit_gbdt(config, train_df, val_df, num_trees, seed, verbose=verbose)
    trees = fitted.trees
    judged = judge(config, val_df, predict_gbdt(fitted, config, val_df))
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
