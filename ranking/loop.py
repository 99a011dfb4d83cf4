"""One custom training step under a ``tf.distribute`` strategy, the same for one worker and for N: the epoch loop
with early stopping, checkpoints and resume.

Keras 3's ``model.fit`` fails under ``MultiWorkerMirroredStrategy`` on TF 2.20 (keras-team/keras#20585), so the
step is written out: the Keras model and optimizer are created under ``strategy.scope()`` (``build``), the input goes
through ``strategy.experimental_distribute_dataset``, and ``strategy.run`` runs a ``GradientTape`` step inside a
``tf.function`` whose loss is ``tf.nn.compute_average_loss(per-row loss, global_batch_size)``: the per-task losses of
``ranking.tasks`` (weighted BCE, the pairwise loss) times their ``loss_weight``, as ``compile`` gave Keras.

One worker runs under the default strategy (no ``TF_CONFIG``, or a one-worker cluster): MWMS has to be created
before TensorFlow's first op, which an in-process caller (tests, ``rankstage compare``) has long passed.

Checkpoints (``tf.train.Checkpoint`` + ``CheckpointManager``) hold the model, the optimizer, the epoch counter, the
step within the epoch, the epoch's running loss sums, the best-so-far metric, epoch and weights, the patience count
and the history; every ``checkpoint_every`` steps and at each epoch's end. A restarted job restores the latest and
continues: the epoch counter goes on and the steps already done in the epoch are skipped (each epoch's input is
deterministic: its shuffle seed is the training seed and the epoch). Under MWMS every worker saves (saving may run
collectives); only the chief into ``checkpoint_dir``, the others into a temporary directory of their own, and every
worker restores from the chief's.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from evaluation import metrics
from features.spec import RankstageConfig
from features.vocab import FeatureStats
from ranking.model import RankingModels, build_models
from ranking.shards import Source, TargetMap, evaluation_batches, training_dataset
from ranking.tasks import pairwise_bce_from_logits, weighted_bce_from_logits

# --- strategy and cluster roles --------------------------------------------------------------------------------

def cluster_spec() -> tuple[list[str], str | None, int]:
    """(worker addresses, task type, task index) of ``TF_CONFIG`` (no workers when unset)."""
    tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = tf_config.get("task", {})
    return list(tf_config.get("cluster", {}).get("worker", [])), task.get("type"), int(task.get("index", 0))


def strategy_from_env() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when ``TF_CONFIG`` names more than one worker, else the default strategy.
    Call before any other TensorFlow op in the process."""
    workers, _, _ = cluster_spec()
    if len(workers) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def num_workers(strategy: tf.distribute.Strategy) -> int:
    return strategy.extended._num_workers if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else 1


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """The worker that writes the run directory: task ``chief``, or worker 0 of a cluster without one."""
    workers, task_type, index = cluster_spec()
    return not workers or task_type == "chief" or (task_type == "worker" and index == 0)


# --- the step --------------------------------------------------------------------------------------------------

def task_losses(config: RankstageConfig) -> dict[str, Callable]:
    """Per task its per-row loss (B, 2|3) targets, (B, 1) logit -> (B,)."""
    tr = config.training
    return {t.name: pairwise_bce_from_logits(tr.pairwise_weight, tr.list_loss) if t.name == tr.pairwise_task
            else weighted_bce_from_logits for t in config.tasks}


def build(config: RankstageConfig, stats: dict[str, FeatureStats], priors: dict[str, float],
          strategy: tf.distribute.Strategy) -> tuple[RankingModels, keras.optimizers.Optimizer]:
    """Models and Adam under ``strategy.scope()``, each task's logit bias at its prior, the optimizer built."""
    with strategy.scope():
        models = build_models(config, stats)
        for t in config.tasks:
            models.train.get_layer(f"{t.name}_logit").bias.assign([priors[t.name]])
        optimizer = keras.optimizers.Adam(config.training.learning_rate)
        optimizer.build(models.train.trainable_variables)
    return models, optimizer


def make_train_step(config: RankstageConfig, models: RankingModels, optimizer, strategy, global_batch: int,
                    frozen: frozenset[str] = frozenset()):
    """``step(iterator) -> {"loss", "<task>_loss"}``: one distributed step, the losses summed over replicas (each
    replica's already divided by the global batch, so the sum is the global mean). ``frozen``: variable paths not
    updated (nor their Adam moments)."""
    model, losses = models.train, task_losses(config)
    weights = {t.name: float(t.loss_weight) for t in config.tasks}

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            per_task = {k: fn(y[k], out[k]) for k, fn in losses.items()}  # (B,) each
            per_row = tf.add_n([weights[k] * v for k, v in per_task.items()])
            loss = tf.nn.compute_average_loss(per_row, global_batch_size=global_batch)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        variables = [v for v in model.trainable_variables if v.path not in frozen]
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables, strict=True) if g is not None])
        return {"loss": loss, **{f"{k}_loss": tf.nn.compute_average_loss(v, global_batch_size=global_batch)
                                 for k, v in per_task.items()}}

    @tf.function
    def step(iterator):
        out = strategy.run(replica_step, args=next(iterator))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in out.items()}

    return step


# --- validation ------------------------------------------------------------------------------------------------

@dataclass
class Validation:
    """Held-out records and what to follow on them: ``monitor`` "val_loss" or "val_<task>/<metric>"."""

    source: Source
    monitor: str
    mode: str  # "min" | "max"


def validate(config: RankstageConfig, models: RankingModels, validation: Validation,
             weight_scales: dict[str, float], judge_fn: Callable) -> dict[str, float]:
    """``val_loss``, ``val_<task>_loss`` (every row, weight 1: no down-sampling) and, when followed, the metric of
    the served predictions (uncorrected: the correction is monotone per task, so AUC, GAUC and NDCG keep)."""
    tm = TargetMap(config, weight_scales, sample=False)
    losses = task_losses(config)
    weights = {t.name: float(t.loss_weight) for t in config.tasks}
    serve_names = list(models.serve.input)
    names = sorted(set(tm.columns(with_lists=any(c.name == "key/list" for c in validation.source.columns)))
                   | {"key/user", "key/day"})

    @tf.function
    def one(batch):
        x, y = tm(batch)
        out = models.train(x, training=False)
        per_task = {k: tf.reduce_sum(fn(y[k], out[k])) for k, fn in losses.items()}
        served = models.serve({k: batch[k] for k in serve_names}, training=False)
        return per_task, served

    sums = {t.name: 0.0 for t in config.tasks}
    n = 0
    parts: dict[str, list] = {}
    for batch in evaluation_batches(validation.source, names):
        per_task, served = one(batch)
        n += int(batch["key/row"].shape[0])
        for k, v in per_task.items():
            sums[k] += float(v)
        for k in [*served, *(f"label/{t.name}" for t in config.tasks), "key/user", "key/day"]:
            parts.setdefault(k, []).append((served[k] if k in served else batch[k]).numpy())
    logs = {f"val_{k}_loss": s / max(n, 1) for k, s in sums.items()}
    logs["val_loss"] = sum(weights[k] * v for k, v in sums.items()) / max(n, 1)
    if validation.monitor != "val_loss":
        task, metric = validation.monitor[len("val_"):].split("/")
        cols = {k: np.concatenate(v) for k, v in parts.items()}
        y, p, users, days = judge_fn(config, cols)[task]
        logs[validation.monitor] = metrics.ranking_metric(metric, y, p, users, days)
    return logs


# --- the loop --------------------------------------------------------------------------------------------------

@dataclass
class LoopSettings:
    epochs: int
    global_batch: int
    steps_per_epoch: int
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 0  # steps; 0: at epoch ends only
    shuffle_buffer: int = 65536
    list_order: bool = False  # batches of whole user-day lists (pairwise task, in memory)
    log_dir: Path | None = None
    verbose: bool = True
    max_checkpoints: int = 2
    frozen: frozenset[str] = frozenset()  # variable paths the steps leave as they are (a warm start's dense weights)


class _State(tf.Module):
    """Loop counters, kept in the checkpoint beside the model and optimizer; created outside the strategy's scope
    (local variables: every worker computes the same values, and a string cannot be all-reduced)."""

    def __init__(self, models: RankingModels, num_losses: int):
        super().__init__()
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False)  # epochs completed
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False)  # steps done in the current epoch
        self.loss_sums = tf.Variable(tf.zeros([num_losses], tf.float64), trainable=False)
        self.best = tf.Variable(np.nan, dtype=tf.float64, trainable=False)
        self.best_epoch = tf.Variable(-1, dtype=tf.int64, trainable=False)  # 0-based; -1: none yet
        self.wait = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.done = tf.Variable(False, trainable=False)
        self.history = tf.Variable("{}", dtype=tf.string, trainable=False)
        self.best_weights = [tf.Variable(v.value, trainable=False) for v in models.train.weights]


def _worker_checkpoint_dir(checkpoint_dir: Path) -> Path:
    _, task_type, index = cluster_spec()
    return checkpoint_dir.parent / f".{checkpoint_dir.name}-{task_type}-{index}"


def run(config: RankstageConfig, models: RankingModels, optimizer, strategy: tf.distribute.Strategy,
        source: Source, target_map: TargetMap, settings: LoopSettings, validation: Validation | None = None,
        weight_scales: dict[str, float] | None = None, judge_fn: Callable | None = None) -> dict[str, list[float]]:
    """Train ``settings.epochs`` epochs of ``steps_per_epoch`` steps (early-stopping on ``validation``), resuming
    from the latest checkpoint; the history, keys as Keras' (``loss``, ``<task>_loss``, ``val_loss``, ...). The
    model ends with the best epoch's weights when a validation metric was followed."""
    chief = is_chief(strategy)
    names = ["loss", *(f"{t.name}_loss" for t in config.tasks)]
    state = _State(models, len(names))  # plain local variables: every worker computes the same values
    ckpt = tf.train.Checkpoint(model=models.train, optimizer=optimizer, state=state)
    manager = None
    if settings.checkpoint_dir is not None:
        latest = tf.train.latest_checkpoint(str(settings.checkpoint_dir))
        if latest:
            ckpt.restore(latest).assert_existing_objects_matched()
            if settings.verbose:
                print(f"resumed from {latest}: epoch {int(state.epoch) + 1}, step {int(state.step)} of "
                      f"{settings.steps_per_epoch}", flush=True)
        write_dir = settings.checkpoint_dir if chief else _worker_checkpoint_dir(settings.checkpoint_dir)
        manager = tf.train.CheckpointManager(ckpt, str(write_dir), max_to_keep=settings.max_checkpoints)
    history: dict[str, list[float]] = json.loads(state.history.numpy().decode())
    step_fn = make_train_step(config, models, optimizer, strategy, settings.global_batch, settings.frozen)
    writer = tf.summary.create_file_writer(str(settings.log_dir)) if settings.log_dir is not None and chief else None
    seed = config.training.seed
    while not bool(state.done) and int(state.epoch) < settings.epochs:
        epoch = int(state.epoch)
        t0 = time.perf_counter()
        ds = training_dataset(source, target_map, settings.global_batch, seed * 100_003 + epoch,
                              settings.shuffle_buffer, settings.list_order)
        iterator = iter(strategy.experimental_distribute_dataset(ds))
        for _ in range(int(state.step)):  # a resumed epoch: the same batches, the done ones skipped
            next(iterator)
        done_before = int(state.step)
        while int(state.step) < settings.steps_per_epoch:
            out = step_fn(iterator)
            state.loss_sums.assign_add(tf.cast(tf.stack([out[k] for k in names]), tf.float64))
            state.step.assign_add(1)
            if manager is not None and settings.checkpoint_every and int(state.step) % settings.checkpoint_every == 0:
                manager.save(checkpoint_number=epoch * settings.steps_per_epoch + int(state.step))
        seconds = time.perf_counter() - t0
        logs = dict(zip(names, (state.loss_sums.numpy() / settings.steps_per_epoch).tolist(), strict=True))
        if validation is not None:
            logs.update(validate(config, models, validation, weight_scales or {}, judge_fn))
            _early_stopping(state, models, logs.get(validation.monitor), validation.mode, epoch,
                            config.training.early_stopping_patience)
        for k, v in logs.items():
            history.setdefault(k, []).append(float(v))
        if settings.verbose:
            shown = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if k.endswith("loss") or "/" in k)
            rows = (settings.steps_per_epoch - done_before) * settings.global_batch
            print(f"epoch {epoch + 1}: {shown} ({rows / seconds:.0f} rows/s)", flush=True)
        if writer is not None:
            with writer.as_default(step=epoch):
                for k, v in logs.items():
                    tf.summary.scalar(k, v)
        state.history.assign(json.dumps(history))
        state.epoch.assign_add(1)
        state.step.assign(0)
        state.loss_sums.assign(tf.zeros_like(state.loss_sums))
        if manager is not None:
            manager.save(checkpoint_number=(epoch + 1) * settings.steps_per_epoch)
    state.done.assign(True)
    if int(state.best_epoch) >= 0:  # restore_best_weights
        for v, b in zip(models.train.weights, state.best_weights, strict=True):
            v.assign(b)
    if manager is not None:
        manager.save(checkpoint_number=settings.epochs * settings.steps_per_epoch + 1)
        if not chief:
            shutil.rmtree(_worker_checkpoint_dir(settings.checkpoint_dir), ignore_errors=True)
    if writer is not None:
        writer.close()
    return history


def _early_stopping(state: _State, models: RankingModels, current: float | None, mode: str, epoch: int,
                    patience: int) -> None:
    """Keras' ``EarlyStopping(restore_best_weights=True)`` on the state: a NaN never improves; stop once ``wait``
    reaches ``patience`` after the first epoch."""
    if current is None:
        return
    if int(state.best_epoch) < 0:
        _keep_best(state, models, epoch)
    state.wait.assign_add(1)
    best = float(state.best)
    improved = np.isfinite(current) and (np.isnan(best) or (current > best if mode == "max" else current < best))
    if improved:
        state.best.assign(current)
        _keep_best(state, models, epoch)
        state.wait.assign(0)
    elif int(state.wait) >= patience and epoch > 0:
        state.done.assign(True)


def _keep_best(state: _State, models: RankingModels, epoch: int) -> None:
    state.best_epoch.assign(epoch)
    for b, v in zip(state.best_weights, models.train.weights, strict=True):
        b.assign(v.value)


def clear_checkpoints(checkpoint_dir: Path | None) -> None:
    """After a finished run: its checkpoints are no part of the run directory."""
    if checkpoint_dir is not None:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


def interactive() -> bool:
    return sys.stdout.isatty()
