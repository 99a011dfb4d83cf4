"""Fitting one model: down-sample, build and compile, train with early stopping on the validation rows.

N rows of the training frame.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from evaluation import metrics
from features.logs import raw_inputs, task_labels
from features.spec import RankstageConfig
from features.vocab import FeatureStats
from ranking.datasets import list_ids, make_dataset, make_list_dataset, with_list_ids
from ranking.judging import early_stopping_monitor, judge
from ranking.model import RankingModels, build_models
from ranking.predict import predict
from ranking.sampling import initial_logits, sample_negatives, targets
from ranking.tasks import pairwise_bce_from_logits, watch_time_weight_scale, weighted_bce_from_logits


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


def compile_model(models: RankingModels, config: RankstageConfig, priors: dict[str, float]) -> None:
    """Set each task's logit bias to its prior; compile with Adam, the per-task losses and loss weights."""
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
