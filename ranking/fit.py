"""Fitting one model: label summaries (priors, weight scales, rows), models built under the strategy, the custom
training loop (``ranking.loop``) with early stopping on the validation records.

Training and validation rows come as example records (``ranking.shards.Source``: TFRecord shards, or a joined frame's
columns in memory); a frame is turned into in-memory records here, so both take one code path.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features.spec import ConfigError, RankstageConfig
from features.vocab import FeatureStats
from ranking import loop
from ranking.judging import early_stopping_monitor, judge_records
from ranking.model import RankingModels
from ranking.shards import Source, TargetMap, label_summary, memory_source, sampling_rates

DEFAULT_SHUFFLE_BUFFER = 65536  # records; shards only (in memory, rows are shuffled whole as before)


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
    lineage: dict | None = None  # a warm start's parent and days seen (ranking.warm_start.lineage)
    examples: str | None = None  # the example shards trained from (export samples its warmup rows there)
    recentred: dict | None = None  # {"day", "shifts": task -> logit shift} (ranking.recenter, after training)


def compile_model(models: RankingModels, config: RankstageConfig, priors: dict[str, float]) -> None:
    """Keras ``compile`` with the loop's losses (``ranking.loop.task_losses``), loss weights and Adam, each logit's
    bias at its prior: for ``model.fit`` (benchmarks' in-memory baseline, one worker only: Keras 3's ``fit`` fails
    under MultiWorkerMirroredStrategy on TF 2.20)."""
    import keras

    for t in config.tasks:
        models.train.get_layer(f"{t.name}_logit").bias.assign([priors[t.name]])
    models.train.compile(optimizer=keras.optimizers.Adam(config.training.learning_rate),
                         loss=loop.task_losses(config), loss_weights={t.name: t.loss_weight for t in config.tasks})


def as_source(rows: pd.DataFrame | Source, config: RankstageConfig) -> Source:
    return rows if isinstance(rows, Source) else memory_source(rows, config)


def fit(config: RankstageConfig, frame: pd.DataFrame | Source, stats: dict[str, FeatureStats], epochs: int,
        validation: pd.DataFrame | Source | None, log_dir: Path | None, verbose: bool = True, *,
        strategy: tf.distribute.Strategy | None = None, checkpoint_dir: Path | None = None,
        checkpoint_every: int = 0, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        init: Callable[[RankingModels, object], frozenset[str] | None] | None = None
        ) -> tuple[RankingModels, dict, TrainingArtifacts]:
    """Build and train on ``frame`` (down-sampled as configured); early-stop on ``validation`` if given, following
    ``training.early_stopping_metric``. ``checkpoint_dir``: resume from and write checkpoints there. ``init``: sets
    the built models' weights and the built optimizer's state before training (a warm start's parent's; a checkpoint
    still wins) and returns the variable paths training leaves as they are (None: none). The returned models keep
    the optimizer (``models.optimizer``: the run saves its state)."""
    import keras

    strategy = strategy or tf.distribute.get_strategy()
    monitor, mode = early_stopping_monitor(config)
    tr = config.training
    keras.utils.set_random_seed(tr.seed)
    source = as_source(frame, config)
    list_order = tr.pairwise_task is not None
    if list_order and source.memory is None:
        raise ConfigError(f"training.pairwise_task: {tr.pairwise_task!r} needs batches of whole user-day lists, "
                          "which shards (--examples) do not keep together; train it in memory or unset the field")
    if source.memory is None and loop.num_workers(strategy) > len(source.files):
        raise ConfigError(f"--workers {loop.num_workers(strategy)}: file-based sharding needs at least one shard "
                          f"file per worker; the training days have {len(source.files)}")
    summary = label_summary(source, config)
    if summary.kept == 0:
        raise ConfigError("training: no training rows left after negative down-sampling")
    scales = {k: v for k, v in summary.weight_scales().items()}
    priors = summary.priors(config)
    models, optimizer = loop.build(config, stats, priors, strategy)
    frozen = frozenset((init(models, optimizer) if init is not None else None) or ())
    workers = loop.num_workers(strategy)
    global_batch = tr.batch_size
    if global_batch % max(strategy.num_replicas_in_sync, 1):
        raise ConfigError(f"training.batch_size: {global_batch} does not split over "
                          f"{strategy.num_replicas_in_sync} replicas")
    settings = loop.LoopSettings(epochs=epochs, global_batch=global_batch,
                                 steps_per_epoch=max(1, math.ceil(summary.kept / global_batch)),
                                 checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                                 shuffle_buffer=shuffle_buffer, list_order=list_order, log_dir=log_dir,
                                 verbose=verbose, frozen=frozen)
    if verbose:
        print(f"{summary.kept} training rows kept of {summary.rows}; {settings.steps_per_epoch} steps of "
              f"{global_batch} per epoch on {workers} worker(s)", flush=True)
    val = loop.Validation(as_source(validation, config), monitor, mode) if validation is not None else None
    history = loop.run(config, models, optimizer, strategy, source, TargetMap(config, scales), settings, val,
                       scales, judge_records)
    if val is not None and monitor in history and np.isfinite(history[monitor]).any():
        followed = np.asarray(history[monitor])
        best = int(np.nanargmin(followed) if mode == "min" else np.nanargmax(followed)) + 1
    else:
        best = epochs
    art = TrainingArtifacts(sampling=sampling_rates(config), weight_scales=scales, priors=priors,
                            train_periods=summary.days, validation_periods=[], best_epoch=best,
                            rows={"train": summary.kept, "train_before_sampling": summary.rows})
    models.optimizer = optimizer
    return models, history, art
