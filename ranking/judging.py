"""Judging a model on held-out rows: the rows each task is judged on, its metrics report, the saved predictions,
the report's text lines, and the early-stopping monitor that follows one of those metrics.

N rows of a frame; N_t the rows task t is judged on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from calibration.outputs import correct_outputs
from evaluation import metrics
from features.examples import DAY, LABEL, ROW, USER
from features.logs import evaluation_labels, raw_inputs
from features.spec import ConfigError, RankstageConfig
from ranking.model import RankingModels
from ranking.predict import predict

# task -> (label, prediction, user, day), each (N_t,); day = the row's data.time_column value (user-day lists)
Judged = dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
JUDGED_FIELDS = ("y", "p", "user", "day")


def judged_predictions(config: RankstageConfig, models: RankingModels, frame: pd.DataFrame,
                       sampling: dict[str, dict]) -> Judged:
    """The model's served predictions on ``frame``, corrected for down-sampling as ``sampling`` (the metadata block)
    says, as ``judge`` keeps them."""
    pred = correct_outputs(predict(models, raw_inputs(frame, config.features)), sampling)
    return judge(config, frame, pred)


def judge(config: RankstageConfig, frame: pd.DataFrame, pred: dict[str, np.ndarray]) -> Judged:
    """Per task the rows it is judged on (its condition's positives, finite labels; watch time in real seconds)
    with label, prediction ``pred[task]`` (N,), user id and day."""
    return judge_arrays(config, evaluation_labels(frame, config), frame[config.data.user_column].to_numpy(),
                        frame[config.data.time_column].to_numpy(), pred)


def judge_records(config: RankstageConfig, cols: dict[str, np.ndarray]) -> Judged:
    """``judge`` of example-record columns: ``label/<task>`` (the evaluation labels), ``key/user``, ``key/day`` and
    the predictions under each task's name, (N,) each."""
    labels = {t.name: np.asarray(cols[LABEL + t.name], np.float64) for t in config.tasks}
    return judge_arrays(config, labels, _decoded(cols[USER]), _decoded(cols[DAY]), cols)


def _decoded(a: np.ndarray) -> np.ndarray:
    return a.astype(str).astype(object) if a.dtype == object else a


def judged_from_records(config: RankstageConfig, models: RankingModels, source, sampling: dict[str, dict],
                        batch_size: int = 4096) -> Judged:
    """``judged_predictions`` of example records (``ranking.shards.Source``: validation shards), predicted in
    batches over the parsed records, in log order (by ``key/row``: the pipeline writes rows by hash bucket), so a
    run trained from shards is judged on the rows in the order every in-memory judge (LightGBM, compare) uses."""
    from ranking.shards import evaluation_batches

    serve = list(models.serve.input)
    names = serve + [LABEL + t.name for t in config.tasks] + [USER, DAY, ROW]
    call = tf.function(lambda b: models.serve({k: b[k] for k in serve}, training=False))
    parts: dict[str, list] = {}
    for batch in evaluation_batches(source, names, batch_size):
        served = call(batch)
        for k, v in [*served.items(), *((n, batch[n]) for n in names[len(serve):])]:
            parts.setdefault(k, []).append(v.numpy())
    cols = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(cols[ROW], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    pred = correct_outputs({t.name: cols[t.name] for t in config.tasks}, sampling)
    return judge_records(config, {**cols, **pred})


def judge_arrays(config: RankstageConfig, labels: dict[str, np.ndarray], users: np.ndarray, days: np.ndarray,
                 pred: dict[str, np.ndarray]) -> Judged:
    """``judge`` of (N,) evaluation labels per task, users, days and predictions. Labels are judged at float32
    precision, the example records' (``features.examples``), so a run judged from shards and one judged from a
    frame in memory hold the same label arrays."""
    out: Judged = {}
    for t in config.tasks:
        y = np.asarray(labels[t.name], np.float32).astype(np.float64)
        p = np.asarray(pred[t.name], np.float64)
        keep = np.isfinite(y) & (labels[t.condition] == 1 if t.condition else True)
        out[t.name] = (y[keep], p[keep], users[keep], days[keep])
    return out


def judged_report(config: RankstageConfig, judged: Judged) -> dict[str, dict]:
    """Per-task metrics keyed "task" -> {metric: value}: AUC (Spearman for watch time and completion), GAUC (binary
    tasks), NDCG@5 over user-day lists, each with a bootstrap 95% interval; the level and the mean error."""
    out = {}
    for t in config.tasks:
        if t.name not in judged:
            continue
        y, p, u, d = judged[t.name]
        if t.type == "binary":
            out[t.name] = metrics.binary_report(y, p, u, d)
        else:
            out[t.name] = metrics.regression_report(y, p, u, d, "seconds" if t.type == "watch_time" else "ratio")
    return out


def save_judged(judged: Judged, path: Path) -> None:
    """``validation_predictions.npz``: arrays "<task>/y", "<task>/p", "<task>/user", "<task>/day"."""
    np.savez_compressed(path, **{f"{task}/{k}": a for task, arrays in judged.items()
                                 for k, a in zip(JUDGED_FIELDS, arrays, strict=True)})


def load_judged(path: Path) -> Judged:
    """Read ``save_judged``'s file; a file from before days were saved is a ValueError (rescore the run)."""
    with np.load(path, allow_pickle=False) as z:
        tasks = sorted({k.split("/")[0] for k in z.files})
        missing = [f"{t}/{k}" for t in tasks for k in JUDGED_FIELDS if f"{t}/{k}" not in z.files]
        if missing:
            raise ValueError(f"{path}: no arrays {missing}; written by an older version, rescore the run")
        return {t: tuple(z[f"{t}/{k}"] for k in JUDGED_FIELDS) for t in tasks}


def early_stopping_monitor(config: RankstageConfig) -> tuple[str, str]:
    """``training.early_stopping_metric`` as a Keras monitor and its mode: ("val_loss", "min") or
    ("val_<task>/<metric>", "max"); a ConfigError for a task the config lacks or a metric its type has not."""
    metric = config.training.early_stopping_metric
    if metric == "val_loss":
        return metric, "min"
    task, name = metric.split("/")
    types = {t.name: t.type for t in config.tasks}
    if task not in types:
        raise ConfigError(f"training.early_stopping_metric: {metric!r} names task {task!r}; tasks: {list(types)}")
    if types[task] != "binary" and name != f"ndcg@{metrics.NDCG_K}":
        raise ConfigError(f"training.early_stopping_metric: {metric!r}: task {task!r} is {types[task]}, which "
                          f"has no {name}; use {task}/ndcg@{metrics.NDCG_K}")
    return f"val_{metric}", "max"


def _metric_cell(m: dict, key: str, label: str, unit: str | None = None) -> str:
    """One cell of a report line, e.g. ``GAUC 0.6612 [0.651, 0.671] 1234 users``; empty without ``key``."""
    if key not in m:
        return ""
    lo, hi = m.get(f"{key}_ci95", (float("nan"), float("nan")))
    n = m.get(f"{key}_{unit}") if unit else None
    return f"  {label} {m[key]:.4f} [{lo:.3f}, {hi:.3f}]" + (f" {n} {unit}" if n is not None else "")


def format_metrics(report: dict[str, dict]) -> str:
    """One line per task: global AUC (Spearman), within-user GAUC and NDCG@5 with 95% intervals, the level."""
    ndcg = f"ndcg@{metrics.NDCG_K}"
    lines = []
    for task, m in report.items():
        ranking = _metric_cell(m, "gauc", "GAUC", "users") + _metric_cell(m, ndcg, ndcg.upper(), "lists")
        ranking += f"  {m['num_trees']} trees" if "num_trees" in m else ""  # LightGBM: kept by early stopping
        if "auc" in m:
            lines.append(f"{task:>12}  " + _metric_cell(m, "auc", "AUC").strip() + ranking +
                         f"  pos {m['positives']}  pred/obs {m['predicted_mean']:.4f}/{m['observed_rate']:.4f}")
        else:
            unit = "seconds" if "mae_seconds" in m else "ratio"
            lines.append(f"{task:>12}  " + _metric_cell(m, "spearman", "Spearman").strip() + ranking +
                         f"  MAE {m[f'mae_{unit}']:.3f} {unit}  "
                         f"pred/obs mean {m[f'predicted_mean_{unit}']:.3f}/{m[f'observed_mean_{unit}']:.3f}")
    return "\n".join(lines)
