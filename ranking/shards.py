"""Training input as ``tf.data`` over example records (``features.examples``): TFRecord shards written by the feature
pipeline, or the same columns held in memory (``rankstage compare``, baselines, tests), through one map.

    files of the chosen days -> interleave(TFRecordDataset, GZIP) -> shuffle (seeded per epoch) -> batch -> parse
    -> ``TargetMap`` (negative down-sampling by a stateless hash of key/row, per-task [target, weight]) -> rebatch
    -> prefetch

The map is ``ranking.sampling`` + ``ranking.tasks.prepare_targets`` in TF ops (watch time capped at ``max_value`` in
the graph, conditioned tasks, NaN labels weight 0); priors and watch-time weight scales come from one streaming pass
over the label columns (``label_summary``). B rows of a batch; N rows of a source.

The shard layout (``DIR``, written by ``features.pipeline``):

    DIR/schema.json                    [{"name", "kind"}] (``features.examples.Column``)
    DIR/manifest.json                  {"train_days", "validation_days", "rows": {day: rows}}
    DIR/stats/train.json, window.json  ``features.vocab.load_stats`` (training days; training + validation days)
    DIR/examples/date=<day>/part-*.tfrecord.gz
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from features import examples
from features.examples import LABEL, ROW, Column
from features.spec import ConfigError, RankstageConfig
from features.vocab import FeatureStats, load_stats
from ranking.sampling import prior_logit

LIST = "key/list"  # in-memory only: the row's user-day list id (``ranking.datasets.list_ids``) for a pairwise task
HASH_BUCKETS = 2**53  # down-sampling draws u = bucket / 2**53 from a keyed hash of the row id: exact in float64


# --- the shard layout ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """A feature pipeline's output directory, read back."""

    root: Path
    columns: list[Column]
    manifest: dict

    @property
    def kinds(self) -> dict[str, str]:
        return {c.name: c.kind for c in self.columns}

    def stats(self, name: str) -> dict[str, FeatureStats]:
        """``"train"`` (training days) or ``"window"`` (training and validation days)."""
        path = self.root / "stats" / f"{name}.json"
        if not path.exists():
            raise ConfigError(f"--examples {self.root}: missing stats/{name}.json")
        return load_stats(path)

    def files(self, days: list) -> list[str]:
        """The shard files of ``days``, in a fixed order (day, then name); a ConfigError for a day without any."""
        out = []
        for day in days:
            found = sorted((self.root / "examples" / f"date={day}").glob(f"part-*{examples.SUFFIX}"))
            if not found:
                raise ConfigError(f"--examples {self.root}: no examples/date={day}/part-*{examples.SUFFIX}")
            out += [str(p) for p in found]
        return out


def read_layout(root: str | Path) -> Layout:
    root = Path(root)
    for name in ("schema.json", "manifest.json"):
        if not (root / name).exists():
            raise ConfigError(f"--examples {root}: missing {name}; is this a feature pipeline's output?")
    cols = [Column(c["name"], c["kind"]) for c in json.loads((root / "schema.json").read_text())]
    return Layout(root, cols, json.loads((root / "manifest.json").read_text()))


# --- sources: shard files or in-memory columns -------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Example records: shard ``files`` (GZIP TFRecords of ``columns``) or in-memory ``memory`` columns (N,) each."""

    columns: list[Column]
    files: tuple[str, ...] = ()
    memory: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def kinds(self) -> dict[str, str]:
        return {c.name: c.kind for c in self.columns}

    def num_rows(self) -> int | None:
        return len(next(iter(self.memory.values()))) if self.memory is not None else None


def shard_source(layout: Layout, days: list) -> Source:
    return Source(layout.columns, tuple(layout.files(days)))


def memory_source(frame: pd.DataFrame, config: RankstageConfig, rows: np.ndarray | None = None) -> Source:
    """A joined frame's record columns (``features.examples.frame_columns``), plus each row's user-day list id when
    the config has a pairwise task."""
    rows = np.arange(len(frame), dtype=np.int64) if rows is None else rows
    cols = examples.frame_columns(frame, config, rows)
    schema = examples.schema(config, examples.key_kinds_of(cols))
    if config.training.pairwise_task is not None:
        from ranking.datasets import list_ids

        lists = list_ids(frame, config)
        if len(lists) and lists.max() >= 2**24:
            raise ConfigError(f"training.pairwise_task: {lists.max() + 1} user-day lists exceed float32's exact ints")
        cols[LIST] = lists.astype(np.float32)
        schema = [*schema, Column(LIST, "float")]
    return Source(schema, memory=cols)


def _tf_column(values: np.ndarray, kind: str) -> tf.Tensor:
    if kind == "int":
        return tf.constant(np.asarray(values, np.int64))
    if kind == "float":
        return tf.constant(np.asarray(values, np.float32))
    return tf.constant(np.asarray(values, dtype=object).astype(str).astype(object))


def records(source: Source, names: list[str], block: int, shuffle_seed: int | None = None,
            shuffle_buffer: int = 65536, repeat: bool = False, list_order: bool = False) -> tf.data.Dataset:
    """Batches of at most ``block`` parsed records, ``names`` -> (≤block,) tensors. ``shuffle_seed`` (None: file
    order) shuffles the files, then rows with a buffer of ``shuffle_buffer`` (in memory: all rows); ``list_order``
    (in memory only) keeps each user-day list together and shuffles the lists' order instead
    (``ranking.datasets.make_list_dataset``).
    ``repeat``: endlessly, each pass reshuffled."""
    kinds = source.kinds
    missing = [n for n in names if n not in kinds]
    if missing:
        raise ConfigError(f"example records: columns {missing} not in the schema")
    if source.memory is None:
        if list_order:
            raise ConfigError("training.pairwise_task: batches of whole user-day lists need in-memory rows; "
                              "shards are not grouped by list (unset it to train from --examples)")
        files = tf.data.Dataset.from_tensor_slices(list(source.files))
        if shuffle_seed is not None:  # else an epoch runs from the first day's files to the last's
            files = files.shuffle(len(source.files), seed=shuffle_seed, reshuffle_each_iteration=True)
        ds = files.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=examples.COMPRESSION),
                              cycle_length=min(4, len(source.files)) if shuffle_seed is not None else 1,
                              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)  # unshuffled: file order
        if shuffle_seed is not None:
            ds = ds.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
        if repeat:  # after the shuffle: each pass is one epoch's rows, none twice
            ds = ds.repeat()
        spec = examples.parse_spec([c for c in source.columns if c.name in set(names)])
        ds = ds.batch(block).map(lambda r: tf.io.parse_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
        return ds.with_options(options)
    n = source.num_rows()
    tensors = {k: _tf_column(source.memory[k], kinds[k]) for k in names}
    if list_order:
        lists = source.memory[LIST]
        order = np.argsort(lists, kind="stable")
        _, starts, lengths = np.unique(lists[order], return_index=True, return_counts=True)
        tensors = {k: tf.gather(v, order) for k, v in tensors.items()}
        spans = tf.data.Dataset.from_tensor_slices((starts.astype(np.int64), lengths.astype(np.int64)))
        if shuffle_seed is not None:
            spans = spans.shuffle(len(starts), seed=shuffle_seed, reshuffle_each_iteration=True)
        if repeat:
            spans = spans.repeat()
        index = spans.flat_map(lambda s, k: tf.data.Dataset.range(s, s + k))
    else:
        index = tf.data.Dataset.range(n)
        if shuffle_seed is not None:
            index = index.shuffle(n, seed=shuffle_seed, reshuffle_each_iteration=True)
        if repeat:
            index = index.repeat()
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return index.batch(block).map(lambda i: {k: tf.gather(v, i) for k, v in tensors.items()}).with_options(options)


# --- the map: down-sampling and targets ----------------------------------------------------------------------------

def sampling_rates(config: RankstageConfig) -> dict[str, dict]:
    """The metadata's ``sampling`` block (as ``ranking.sampling.sample_negatives`` records it)."""
    ns = config.training.negative_sampling
    rate = ns.keep_fraction if ns.task is not None else 1.0
    return {t.name: {"kept_fraction": rate, "method": "correct_downsampling"} if t.name == ns.task
            else {"kept_fraction": 1.0, "method": "importance_weighted", "negative_weight": 1.0 / rate}
            for t in config.tasks}


def uniform_of_rows(rows: tf.Tensor, seed: int) -> tf.Tensor:
    """(B,) int64 row ids -> (B,) float64 in [0, 1): a keyed hash of the id, the same on every worker and resume."""
    bucket = tf.strings.to_hash_bucket_strong(tf.strings.as_string(rows), HASH_BUCKETS, key=[seed, 0x5EED])
    return tf.cast(bucket, tf.float64) / float(HASH_BUCKETS)


def training_label(task, label: tf.Tensor) -> tf.Tensor:
    """The record's evaluation label (uncapped seconds for watch time) -> the trained one: watch time capped at
    ``max_value`` (``features.logs.task_label``)."""
    if task.type == "watch_time" and task.max_value is not None:
        return tf.minimum(label, task.max_value)  # NaN stays NaN
    return label


class TargetMap:
    """Parsed records (B,) per column -> (features, {task: (B', 2) [target, weight]}), B' ≤ B the rows kept.

    ``sample``: keep a negative of ``training.negative_sampling.task`` where ``uniform_of_rows`` < a; every task
    but the sampled one weights kept negatives by 1/a. Without ``sample`` (validation) every row, weight 1. A pairwise
    task's target gains the list id column (B', 3) when the records carry ``key/list``."""

    def __init__(self, config: RankstageConfig, weight_scales: dict[str, float], sample: bool = True):
        self.config, self.scales, self.sample = config, dict(weight_scales), sample
        self.features = [f.name for f in config.features]
        ns = config.training.negative_sampling
        self.sampled = ns.task
        self.rate = ns.keep_fraction if ns.task is not None else 1.0

    def columns(self, with_lists: bool = False) -> list[str]:
        """The record columns the map reads."""
        cols = self.features + [LABEL + t.name for t in self.config.tasks] + [ROW]
        return cols + [LIST] if with_lists else cols

    def keep(self, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """(B,) bool kept, (B,) float32 importance weight (1/a on the sampled task's negatives)."""
        n = tf.shape(batch[ROW])[0]
        if not self.sample or self.sampled is None or self.rate >= 1.0:
            return tf.ones([n], tf.bool), tf.ones([n], tf.float32)
        neg = tf.equal(batch[LABEL + self.sampled], 0.0)
        kept = tf.logical_or(tf.logical_not(neg), uniform_of_rows(batch[ROW], self.config.training.seed) < self.rate)
        return kept, tf.where(neg, tf.constant(1.0 / self.rate, tf.float32), 1.0)

    def targets(self, batch: dict[str, tf.Tensor], row_weight: tf.Tensor) -> dict[str, tf.Tensor]:
        """``ranking.sampling.targets`` in TF: per task (B, 2) [target, weight]."""
        out = {}
        for t in self.config.tasks:
            label = training_label(t, batch[LABEL + t.name])
            valid = tf.math.is_finite(label)
            y = tf.where(valid, label, 0.0)
            w = (tf.ones_like(row_weight) if t.name == self.sampled else row_weight) * tf.cast(valid, tf.float32)
            if t.condition:
                w = w * tf.cast(tf.equal(batch[LABEL + t.condition], 1.0), tf.float32)
            if t.type == "watch_time":
                y, w = y / (1.0 + y), w * (1.0 + y) * self.scales.get(t.name, 1.0)
            out[t.name] = tf.stack([y, w], axis=1)
            if t.name == self.config.training.pairwise_task and LIST in batch:
                out[t.name] = tf.concat([out[t.name], batch[LIST][:, None]], axis=1)
        return out

    def __call__(self, batch: dict[str, tf.Tensor]):
        kept, row_weight = self.keep(batch)
        batch = {k: tf.boolean_mask(v, kept) for k, v in batch.items()}
        return {k: batch[k] for k in self.features}, self.targets(batch, tf.boolean_mask(row_weight, kept))


def training_dataset(source: Source, target_map: TargetMap, batch_size: int, epoch_seed: int,
                     shuffle_buffer: int = 65536, list_order: bool = False) -> tf.data.Dataset:
    """Endless full batches of ``batch_size`` kept rows, shuffled with ``epoch_seed`` (deterministic: the same seed
    gives the same batches on every run, so a resumed epoch can skip the steps it already did)."""
    block = max(batch_size, 1024)
    ds = records(source, target_map.columns(with_lists=list_order), block, epoch_seed, shuffle_buffer,
                 repeat=True, list_order=list_order)
    return ds.map(target_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True) \
        .rebatch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def evaluation_batches(source: Source, names: list[str], block: int = 4096) -> tf.data.Dataset:
    """``names`` of every record in file order, in batches (validation, judging)."""
    return records(source, names, block).prefetch(tf.data.AUTOTUNE)


# --- label summaries: one streaming pass over the label columns -----------------------------------------------------

@dataclass
class LabelSummary:
    """What priors, weight scales and step counts need, summed over a source's kept rows (float64)."""

    rows: int = 0  # before down-sampling
    kept: int = 0
    weighted_sum: dict[str, float] = field(default_factory=dict)  # task -> sum w y over its counted rows
    weight: dict[str, float] = field(default_factory=dict)  # task -> sum w
    watch_sum: dict[str, float] = field(default_factory=dict)  # watch-time task -> sum (1 + t) over kept rows
    days: list = field(default_factory=list)

    def priors(self, config: RankstageConfig) -> dict[str, float]:
        """``ranking.sampling.initial_logits`` from the sums."""
        out = {}
        for t in config.tasks:
            w = self.weight.get(t.name, 0.0)
            out[t.name] = prior_logit(t.type, self.weighted_sum[t.name] / w if w > 0 else 0.5)
        return out

    def weight_scales(self) -> dict[str, float]:
        """``ranking.tasks.watch_time_weight_scale``: 1 / mean(1 + t) over kept rows."""
        return {k: float(self.kept / s) if s > 0 else 1.0 for k, s in self.watch_sum.items()}


def label_summary(source: Source, config: RankstageConfig, block: int = 65536) -> LabelSummary:
    """One pass over ``label/*``, ``key/row`` and ``key/day`` (no feature column is parsed)."""
    tm = TargetMap(config, {}, sample=True)
    names = [LABEL + t.name for t in config.tasks] + [ROW, examples.DAY]
    out = LabelSummary(weighted_sum={t.name: 0.0 for t in config.tasks}, weight={t.name: 0.0 for t in config.tasks},
                       watch_sum={t.name: 0.0 for t in config.tasks if t.type == "watch_time"})
    days: set = set()

    @tf.function
    def kept_of(batch):
        return tm.keep(batch)

    for batch in records(source, names, block):
        kept, row_weight = (a.numpy() for a in kept_of(batch))
        labels = {t.name: batch[LABEL + t.name].numpy().astype(np.float64)[kept] for t in config.tasks}
        w = row_weight.astype(np.float64)[kept]
        out.rows += len(kept)
        out.kept += int(kept.sum())
        days.update(np.unique(batch[examples.DAY].numpy()).tolist())
        for t in config.tasks:
            y = labels[t.name]
            if t.type == "watch_time" and t.max_value is not None:
                y = np.minimum(y, t.max_value)
            counted = np.isfinite(y) & ((labels[t.condition] == 1) if t.condition else True)
            wt = np.ones(int(counted.sum())) if t.name == tm.sampled else w[counted]
            out.weighted_sum[t.name] += float(np.sum(wt * y[counted]))
            out.weight[t.name] += float(np.sum(wt))
            if t.type == "watch_time":
                out.watch_sum[t.name] += float(np.sum(1.0 + y))
    out.days = sorted(d.decode() if isinstance(d, bytes) else d for d in days)
    return out
