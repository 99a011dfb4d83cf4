"""Training: time split, negative down-sampling, fit with early stopping, validation metrics, optional refit.

A run directory holds everything export needs:
    config.yaml  stats.json  artifacts.json  model.weights.h5  metrics.json  history.json  tensorboard/
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
import yaml

from calibration.outputs import correct_outputs
from evaluation import metrics
from features.logs import evaluation_labels, raw_inputs, read_log, task_labels, time_split
from features.spec import ConfigError, RankstageConfig, TaskSpec, load_config
from features.statistics import write_snapshot
from features.vocab import FeatureStats, build_stats, load_stats, save_stats
from ranking.model import RankingModels, build_models
from ranking.tasks import (
    pairwise_bce_from_logits,
    prepare_targets,
    watch_time_weight_scale,
    weighted_bce_from_logits,
)


@dataclass
class TrainingArtifacts:
    """What training learned besides weights; shipped with the model as metadata."""

    sampling: dict[str, dict]  # task -> {"kept_fraction": a, "method": ...}
    weight_scales: dict[str, float]
    priors: dict[str, float]  # task -> initial logit
    train_periods: list
    validation_periods: list
    best_epoch: int | None = None
    refit: bool = False
    rows: dict[str, int] = field(default_factory=dict)


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def sample_negatives(labels: dict[str, np.ndarray], config: RankstageConfig, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, dict]]:
    """Keep rows whose sampling-task label is 0 with probability a -> (keep (N,) bool, row weight (N,), rates).

    Only the sampled task (``training.negative_sampling.task``) trains unweighted on the thinned rows and is corrected
    at serving, p = a q / ((1 - q) + a q) (method "correct_downsampling", kept fraction a). Every other task, binary
    or not, weights the kept negatives of the sampled task by 1/a (importance weighting), so its served value needs
    no correction (method "importance_weighted"). A task conditioned on the sampled task only sees its positives,
    which are never thinned, so the weight is 1 on every row it counts.
    """
    ns = config.training.negative_sampling
    n = len(next(iter(labels.values())))
    rate = ns.keep_fraction if ns.task is not None else 1.0
    neg = labels[ns.task] == 0 if ns.task is not None else np.zeros(n, dtype=bool)
    rng = np.random.default_rng(seed)
    keep = ~neg | (rng.random(n) < rate)
    inv = np.where(neg, 1.0 / rate, 1.0)
    sampling = {}
    for t in config.tasks:
        if t.name == ns.task:
            sampling[t.name] = {"kept_fraction": rate, "method": "correct_downsampling"}
        else:
            sampling[t.name] = {"kept_fraction": 1.0, "method": "importance_weighted",
                                "negative_weight": 1.0 / rate}
    return keep, inv[keep], sampling


def targets(config: RankstageConfig, labels: dict[str, np.ndarray], row_weight: np.ndarray,
            weight_scales: dict[str, float]) -> dict[str, np.ndarray]:
    """Per task (N, 2) [target, weight] arrays; the sampled task ignores ``row_weight`` (it is corrected instead)."""
    sampled = config.training.negative_sampling.task
    ones = np.ones_like(row_weight)
    return {t.name: prepare_targets(t, labels[t.name], ones if t.name == sampled else row_weight,
                                    labels[t.condition] if t.condition else None,
                                    weight_scales.get(t.name, 1.0)) for t in config.tasks}


def initial_logits(config: RankstageConfig, labels: dict[str, np.ndarray], row_weight: np.ndarray | None = None
                   ) -> dict[str, float]:
    """Start each logit at its base rate (log-odds; log mean seconds for watch time) so rare tasks train at once.

    ``labels`` (N,) per task, ``row_weight`` (N,) the importance weights ``targets`` gives every task but the
    sampled one (None: 1). Rows count where the label is finite and, for a conditioned task, its condition is 1.
    """
    sampled = config.training.negative_sampling.task
    out = {}
    for t in config.tasks:
        rows = np.isfinite(labels[t.name])
        if t.condition:
            rows &= labels[t.condition] == 1
        y = labels[t.name][rows]
        w = np.ones(len(y)) if row_weight is None or t.name == sampled else row_weight[rows]
        m = float(np.average(y, weights=w)) if len(y) else 0.5
        if t.type == "watch_time":
            out[t.name] = float(np.log(max(m, 1e-3)))
        else:
            m = min(max(m, 1e-4), 1 - 1e-4)
            out[t.name] = float(np.log(m / (1 - m)))
    return out


def list_ids(frame: pd.DataFrame, config: RankstageConfig) -> np.ndarray:
    """(N,) int64 id of each row's user-day list (user column x time column); ``with_list_ids`` checks that it
    fits a float32 exactly."""
    keys = frame[[config.data.user_column, config.data.time_column]]
    return keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy().astype(np.int64)


def with_list_ids(config: RankstageConfig, y: dict[str, np.ndarray], lists: np.ndarray) -> dict[str, np.ndarray]:
    """``training.pairwise_task``'s (N, 2) targets -> (N, 3) [target, weight, list id]; others unchanged."""
    task = config.training.pairwise_task
    if task is None:
        return y
    if len(lists) and lists.max() >= 2**24:
        raise ValueError(f"training.pairwise_task: {lists.max() + 1} user-day lists exceed float32's exact ints")
    return {**y, task: np.concatenate([y[task], lists[:, None].astype(np.float32)], axis=1)}


def make_list_dataset(x: dict[str, np.ndarray], y: dict[str, np.ndarray], lists: np.ndarray, batch_size: int,
                      seed: int = 0) -> tf.data.Dataset:
    """Batches of whole lists: rows grouped by ``lists`` (N,), the lists' order reshuffled each epoch, cut into
    batches of ``batch_size`` rows (a list may straddle two batches)."""
    order = np.argsort(lists, kind="stable")
    _, starts, lengths = np.unique(lists[order], return_index=True, return_counts=True)
    xs = {k: tf.constant(v[order]) for k, v in x.items()}
    ys = {k: tf.constant(v[order]) for k, v in y.items()}
    spans = tf.data.Dataset.from_tensor_slices((starts.astype(np.int64), lengths.astype(np.int64)))
    rows = spans.shuffle(len(starts), seed=seed, reshuffle_each_iteration=True).flat_map(
        lambda s, n: tf.data.Dataset.range(s, s + n))
    return rows.batch(batch_size).map(lambda i: ({k: tf.gather(v, i) for k, v in xs.items()},
                                                 {k: tf.gather(v, i) for k, v in ys.items()})
                                      ).prefetch(tf.data.AUTOTUNE)


def make_dataset(x: dict[str, np.ndarray], y: dict[str, np.ndarray] | None, batch_size: int,
                 shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    tensors = {k: tf.constant(v) for k, v in x.items()}
    ds = tf.data.Dataset.from_tensor_slices((tensors, y) if y is not None else tensors)
    if shuffle:
        ds = ds.shuffle(len(next(iter(x.values()))), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compile_model(models: RankingModels, config: RankstageConfig, priors: dict[str, float]) -> None:
    for t in config.tasks:
        models.train.get_layer(f"{t.name}_logit").bias.assign([priors[t.name]])
    pairwise = config.training.pairwise_task
    models.train.compile(
        optimizer=keras.optimizers.Adam(config.training.learning_rate),
        loss={t.name: pairwise_bce_from_logits(config.training.pairwise_weight, config.training.list_loss)
              if t.name == pairwise
              else weighted_bce_from_logits for t in config.tasks},
        loss_weights={t.name: t.loss_weight for t in config.tasks},
    )


def predict(models: RankingModels, x: dict[str, np.ndarray], batch_size: int = 4096) -> dict[str, np.ndarray]:
    """Served values per task through the serving model: (N,) each."""
    parts: dict[str, list] = {}
    serve_x = {k: x[k] for k in models.serve.input}
    for batch in make_dataset(serve_x, None, batch_size):
        for k, v in models.serve(batch, training=False).items():
            parts.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in parts.items()}


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
    labels = evaluation_labels(frame, config)
    users = frame[config.data.user_column].to_numpy()
    days = frame[config.data.time_column].to_numpy()
    out: Judged = {}
    for t in config.tasks:
        y, p = labels[t.name], np.asarray(pred[t.name], np.float64)
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


class _Progress(keras.callbacks.Callback):
    """One line per epoch with every loss, for logs that are not a terminal."""

    def on_epoch_end(self, epoch, logs=None):
        shown = " ".join(f"{k}={v:.4f}" for k, v in (logs or {}).items() if k.endswith("loss") or "/" in k)
        print(f"epoch {epoch + 1}: {shown}", flush=True)


class _ValidationMetric(keras.callbacks.Callback):
    """Puts ``val_<task>/<metric>`` (e.g. ``val_click/gauc``) into each epoch's logs: the metric of the served
    predictions on the validation rows, for EarlyStopping and the history. Down-sampling is not corrected: the
    correction is monotone per task, so AUC, GAUC and NDCG do not change."""

    def __init__(self, models: RankingModels, config: RankstageConfig, frame: pd.DataFrame, metric: str):
        super().__init__()
        self.ranking_models, self.config, self.frame = models, config, frame
        self.task, self.metric = metric.split("/")
        self.key = f"val_{metric}"
        self.x = raw_inputs(frame, config.features)

    def on_epoch_end(self, epoch, logs=None):
        y, p, users, days = judge(self.config, self.frame, predict(self.ranking_models, self.x))[self.task]
        if logs is not None:
            logs[self.key] = metrics.ranking_metric(self.metric, y, p, users, days)


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


def fit(config: RankstageConfig, frame: pd.DataFrame, stats: dict[str, FeatureStats], epochs: int,
        validation: pd.DataFrame | None, log_dir: Path | None, verbose: bool = True
        ) -> tuple[RankingModels, dict, TrainingArtifacts]:
    """Build and train on ``frame`` (down-sampled as configured); early-stop on ``validation`` if given, following
    ``training.early_stopping_metric``."""
    monitor, mode = early_stopping_monitor(config)
    seed = config.training.seed
    keras.utils.set_random_seed(seed)
    labels = task_labels(frame, config.tasks)
    keep, row_weight, sampling = sample_negatives(labels, config, seed)
    kept_labels = {k: v[keep] for k, v in labels.items()}
    scales = {t.name: watch_time_weight_scale(kept_labels[t.name]) for t in config.tasks if t.type == "watch_time"}
    priors = initial_logits(config, kept_labels, row_weight)
    kept = frame[keep].reset_index(drop=True)
    x = raw_inputs(kept, config.features)
    y = targets(config, kept_labels, row_weight, scales)
    if config.training.pairwise_task is None:
        train_ds = make_dataset(x, y, config.training.batch_size, shuffle=True, seed=seed)
    else:
        lists = list_ids(kept, config)
        train_ds = make_list_dataset(x, with_list_ids(config, y, lists), lists, config.training.batch_size, seed)
    models = build_models(config, stats)
    compile_model(models, config, priors)
    callbacks: list = []
    val_ds = None
    if validation is not None:
        vlab = task_labels(validation, config.tasks)
        vx = raw_inputs(validation, config.features)
        vy = with_list_ids(config, targets(config, vlab, np.ones(len(validation)), scales),
                           list_ids(validation, config))
        val_ds = make_dataset(vx, vy, 4096)
        if monitor != "val_loss":  # before EarlyStopping and TensorBoard, which read the logs it writes
            callbacks.append(_ValidationMetric(models, config, validation, config.training.early_stopping_metric))
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, mode=mode,
                                                       patience=config.training.early_stopping_patience,
                                                       restore_best_weights=True))
    if log_dir is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(log_dir)))
    interactive = verbose and sys.stdout.isatty()
    if verbose and not interactive:
        callbacks.append(_Progress())
    hist = models.train.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks,
                            verbose=1 if interactive else 0)
    history = {k: [float(v) for v in vs] for k, vs in hist.history.items()}
    if monitor in history and np.isfinite(history[monitor]).any():
        followed = np.asarray(history[monitor])
        best = int(np.nanargmin(followed) if mode == "min" else np.nanargmax(followed)) + 1
    else:
        best = epochs
    periods = sorted(frame[config.data.time_column].unique().tolist())
    art = TrainingArtifacts(sampling=sampling, weight_scales=scales, priors=priors, train_periods=periods,
                            validation_periods=[], best_epoch=best, rows={"train": int(keep.sum()),
                                                                          "train_before_sampling": len(frame)})
    return models, history, art


def write_statistics_snapshot(config: RankstageConfig, log: str | Path | None = None,
                              replace_newer: bool = False, path: str | Path | None = None) -> list[Path]:
    """Write ``data.statistics``' newest snapshot (as of the day after the last log day up to ``data.until``) to
    ``path`` (default ``data.statistics.path``, the one serving reads: ``rankstage statistics``); the written files
    (none without statistics). A newer snapshot already there is kept unless ``replace_newer``
    (``features.statistics.write_snapshot``, which publishes each table by rename)."""
    if config.data.statistics is None:
        return []
    window = read_log(config.data, log, statistics=False)
    if config.data.until is not None:
        window = window[window[config.data.time_column] <= config.data.until]
    return write_snapshot(window, config.data, path=path, replace_newer=replace_newer)


PREDICTIONS = "validation_predictions.npz"  # the non-refit model's judged validation predictions
STATISTICS = "statistics"  # the run's statistics snapshot, <key>.parquet (not the one serving reads)


def train(config: RankstageConfig, out_dir: str | Path, log: str | Path | None = None, refit: bool = False,
          verbose: bool = True, publish_statistics: bool = False) -> Path:
    """Train, validate on the last period(s), optionally refit on the whole window; write the run directory.

    The newest statistics snapshot goes into the run directory (``statistics/``), never over the one a running
    service reads, unless ``publish_statistics`` (then to ``data.statistics.path``, as ``rankstage statistics``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    df = read_log(config.data, log)
    train_df, val_df = time_split(df, config)
    df = pd.concat([train_df, val_df], ignore_index=True)  # the window: without rows after data.until
    stats = build_stats(raw_inputs(train_df, config.features), config.features)
    if verbose:
        print(f"{len(train_df)} training rows, {len(val_df)} validation rows "
              f"({config.data.time_column} >= {val_df[config.data.time_column].min()})", flush=True)
    models, history, art = fit(config, train_df, stats, config.training.epochs, val_df, out / "tensorboard",
                               verbose)
    art.validation_periods = sorted(val_df[config.data.time_column].unique().tolist())
    judged = judged_predictions(config, models, val_df, art.sampling)
    save_judged(judged, out / PREDICTIONS)
    val_metrics = judged_report(config, judged)
    art.rows["validation"] = len(val_df)
    if refit:
        if verbose:
            print(f"refit on the whole window for {art.best_epoch} epoch(s)", flush=True)
        stats = build_stats(raw_inputs(df, config.features), config.features)
        best, val_periods, rows = art.best_epoch, art.validation_periods, art.rows
        models, refit_history, art = fit(config, df, stats, best, None, out / "tensorboard_refit", verbose)
        art.best_epoch, art.refit, art.validation_periods = best, True, val_periods
        art.rows = {**rows, "refit": art.rows["train"]}
        history["refit_loss"] = refit_history["loss"]
    models.train.save_weights(out / "model.weights.h5")
    save_stats(stats, out / "stats.json")
    written = write_statistics_snapshot(config, log, path=None if publish_statistics else out / STATISTICS)
    if verbose and written:
        print(f"statistics snapshot written: {', '.join(map(str, written))}", flush=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.model_dump(), sort_keys=False))
    (out / "artifacts.json").write_text(json.dumps(art.__dict__, indent=2, default=_jsonable))
    (out / "history.json").write_text(json.dumps(history, indent=2))
    report = {"tasks": val_metrics, "validation_periods": art.validation_periods, "best_epoch": art.best_epoch,
              "refit": refit, "seconds": round(time.perf_counter() - t0, 1), "config": config.name,
              "num_experts": config.model.num_experts}
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    if verbose:
        print(format_metrics(val_metrics), flush=True)
        print(f"run written to {out}", flush=True)
    return out


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


@dataclass
class LoadedRun:
    config: RankstageConfig
    stats: dict[str, FeatureStats]
    artifacts: dict
    models: RankingModels
    metrics: dict


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild the models of a run directory and load its weights."""
    run = Path(run_dir)
    for name in ("config.yaml", "stats.json", "artifacts.json", "model.weights.h5"):
        if not (run / name).exists():
            raise FileNotFoundError(f"--run {run}: missing {name}; is this a finished training run?")
    config = load_config(run / "config.yaml")
    stats = load_stats(run / "stats.json")
    models = build_models(config, stats)
    models.train.load_weights(run / "model.weights.h5")
    metrics_path = run / "metrics.json"
    return LoadedRun(config, stats, json.loads((run / "artifacts.json").read_text()), models,
                     json.loads(metrics_path.read_text()) if metrics_path.exists() else {})


def task_by_name(config: RankstageConfig) -> dict[str, TaskSpec]:
    return {t.name: t for t in config.tasks}
