"""Training inputs as ``tf.data``: shuffled row batches, or batches of whole user-day lists for a pairwise task.

N rows; ``x`` maps each raw input to (N,), ``y`` each task to (N, 2) [target, weight] (``ranking.sampling.targets``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import tensorflow as tf

from features.spec import RankstageConfig


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
    """Row batches of ``x`` (N,) per input and ``y`` (None: inputs only), reshuffled each epoch if ``shuffle``."""
    tensors = {k: tf.constant(v) for k, v in x.items()}
    ds = tf.data.Dataset.from_tensor_slices((tensors, y) if y is not None else tensors)
    if shuffle:
        ds = ds.shuffle(len(next(iter(x.values()))), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
