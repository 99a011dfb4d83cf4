"""The feature pipeline on Apache Beam: the whole log read once, side tables joined, same-day history lists and
point-in-time statistics attached, and the training examples written as TFRecord shards, one directory per day,
with the vocabularies and numeric statistics of the training days and the newest statistics snapshot.

    read log batches | join side tables ─┬─ daily sums per (key, day) ── combine per key bucket ─┬─ tables by day
                                         │                      └── day totals (global prior) ──┘   └─ snapshot
                                         └─ rows by user bucket ⋈ user tables: history lists, statistics
                                              └─ rows by <other key> bucket ⋈ its tables ... ─ examples per day
                                                   ├─ TFRecord shards    ├─ feature stats (train, window)
                                                   └─ rows per day

Every feature is the function ``features.logs.read_log`` calls (``join_side_tables``, ``history_lists``,
``daily_sums`` / ``tables_by_day`` / ``join_statistics``, ``frame_columns``), applied to a pandas batch: a user's
rows all land in one group (hash bucket of the user), a statistics key's daily sums in one group (hash bucket of
its first column), and the smoothing prior's global rates come from a combine over all keys as a side input, so the
examples equal ``frame_columns(read_log(...))`` row for row (``tests/test_feature_pipeline.py``).

Output (``build_features``), all of it or nothing (built beside ``out_dir`` and renamed into place)::

    examples/date=<time value>/part-<bucket>.tfrecord.gz   features.examples records of that day
    schema.json                                            [{name, kind}] of the records
    stats/train.json, stats/window.json                    features.vocab.save_stats of the training days / all
    statistics/<key>.parquet                               the newest snapshot (features.statistics.snapshot_tables)
    manifest.json                                          config, log files, rows per day, split, runner, seconds
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from features import examples
from features.history import attach_history
from features.logfiles import iter_batches, log_files
from features.logs import join_side_tables, load_side_tables, time_split
from features.spec import ConfigError, RankstageConfig
from features.statistics import (
    AS_OF,
    DAY,
    after_warmup,
    as_of_label,
    attach_statistics,
    daily_sums,
    day_numbers,
    day_totals,
    join_statistics,
    publish_table,
    sum_columns,
    table_as_of,
    tables_by_day,
)
from features.vocab import (
    FeatureStats,
    match_counts,
    numeric_stats,
    save_stats,
    split_multi,
    transform_numeric,
    value_counts,
    vocabulary_from_counts,
)

ROW = "_rankstage_row"  # a batch's row ids (features.examples.row_ids) while it passes through the pipeline
TRAIN, WINDOW = "train", "window"
SUMMARY = ".summary.json"


def bucket_of(values: pd.Series, buckets: int) -> np.ndarray:
    """(N,) int64 hash bucket in [0, buckets) of each value, the same in every process and for 3 and 3.0."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        arr = values.to_numpy(dtype=np.float64)
    else:
        arr = values.astype(str).to_numpy(dtype=object)
    return (pd.util.hash_array(arr) % np.uint64(buckets)).astype(np.int64)


def split_by_bucket(frame: pd.DataFrame, column: str, buckets: int):
    """Yield (bucket, rows of ``frame`` in it)."""
    for b, part in frame.groupby(bucket_of(frame[column], buckets), sort=False):
        yield int(b), part


def required_columns(config: RankstageConfig) -> list[str]:
    d = config.data
    return [d.time_column, d.user_column, d.item_column]


def check_columns(columns: list[str], where: str, config: RankstageConfig) -> None:
    """The one-line error ``read_log`` gives for a log without its time, user or item column."""
    for col in required_columns(config):
        if col not in columns:
            raise ConfigError(f"data: column {col!r} not in log {where} (has {list(columns)})")


def joined_batch(batch, file_index: int, start: int, sides, config: RankstageConfig, where: str) -> pd.DataFrame:
    """One record batch of the log as pandas, with its row ids (``ROW``) and the side tables joined."""
    frame = batch.to_pandas()
    check_columns(list(frame.columns), where, config)
    frame[ROW] = examples.row_ids(file_index, start, len(frame))
    return join_side_tables(frame, sides)


def split_days(times: list, config: RankstageConfig) -> dict[str, list]:
    """The training and validation time values among ``times`` (the distinct values of the kept rows), chosen by
    ``features.logs.time_split`` itself."""
    col = config.data.time_column
    train, val = time_split(pd.DataFrame({col: sorted(times)}), config)
    return {TRAIN: train[col].tolist(), "validation": val[col].tolist()}


# ---- feature statistics as mergeable partials -------------------------------------------------------------------

def feature_partial(columns: dict[str, np.ndarray], feature):
    """What rows ``columns`` contribute to one feature's ``FeatureStats``: value counts (vocabularies) or
    (n, sum, M2) of the transformed values (numeric and match features); None for features without statistics."""
    x = columns[feature.name]
    if feature.kind in ("numeric", "match"):
        t = transform_numeric(match_counts(x, columns[feature.match], feature) if feature.kind == "match" else x,
                              feature)
        return ("moments", len(t), float(t.sum()), float(((t - t.mean()) ** 2).sum()) if len(t) else 0.0)
    if feature.kind == "categorical" and feature.vocab is not None:
        return ("counts", value_counts(x, feature))
    if feature.kind == "multi_valued" and feature.vocab is not None:
        return ("counts", value_counts(split_multi(x, feature), feature))
    return None


def merge_partials(a, b):
    if a is None or b is None:
        return b if a is None else a
    if a[0] == "counts":
        return ("counts", a[1] + b[1])
    (_, na, sa, ma), (_, nb, sb, mb) = a, b
    if na == 0 or nb == 0:
        return a if nb == 0 else b
    delta = sb / nb - sa / na  # Chan et al.: M2 of the union from the parts' counts, means and M2
    return ("moments", na + nb, sa + sb, ma + mb + delta * delta * na * nb / (na + nb))


def finish_partial(partial, feature) -> FeatureStats:
    if partial is None:
        return FeatureStats()
    if partial[0] == "counts":
        return FeatureStats(vocabulary=vocabulary_from_counts(partial[1], feature))
    _, n, s, m2 = partial
    return numeric_stats(s / n, math.sqrt(m2 / n)) if n else numeric_stats(0.0, 0.0)


def build_features(config: RankstageConfig, out_dir: str | Path, runner: str = "DirectRunner",
                   pipeline_args=(), log: str | Path | list | None = None, verbose: bool = True,
                   buckets: int = 32, batch_rows: int = 65536) -> dict:
    """Run the feature pipeline over ``log`` (default ``config.data.log``) on ``runner`` into ``out_dir``; the
    manifest. ``pipeline_args`` are Beam pipeline options (``--direct_num_workers 2`` ...). ``out_dir`` must not
    exist; it appears whole when the run succeeds and not at all when it fails."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"--out {out}: already exists (the pipeline writes a new directory)")
    files = log_files(config.data.log if log is None else log)
    say = (lambda msg: print(f"features build: {msg}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    say(f"{len(files)} log file(s), first {files[0]}")
    cols = preflight(config, files)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / "schema.json").write_text(json.dumps([asdict(c) for c in cols], indent=1))
        say(f"running on {runner} {' '.join(pipeline_args)}".rstrip())
        run_pipeline(config, files, tmp, cols, runner, list(pipeline_args), buckets, batch_rows, verbose)
        summary = json.loads((tmp / SUMMARY).read_text())
        (tmp / SUMMARY).unlink()
        manifest = {"config": config.name, "log_files": [str(f) for f in files],
                    "rows_per_day": summary["rows_per_day"], "rows": sum(summary["rows_per_day"].values()),
                    "train_days": summary["train"], "validation_days": summary["validation"],
                    "runner": runner, "pipeline_args": list(pipeline_args), "buckets": buckets,
                    "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"{manifest['rows']} rows in {manifest['seconds']} s -> {out}")
    return manifest


def preflight(config: RankstageConfig, files: list[Path], sample_rows: int = 2000) -> list[examples.Column]:
    """Check the log on the driver before any worker starts (every file has the first file's columns; a sample
    of the first file goes through the same steps as ``read_log``, so a missing column fails here with
    ``read_log``'s one-line error) and return the record schema."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    def names(path: Path) -> list[str]:
        if path.name.endswith((".parquet", ".pq")):
            return pq.read_schema(path).names
        with pacsv.open_csv(path) as reader:
            return reader.schema.names

    first = names(files[0])
    check_columns(first, str(files[0]), config)
    for f in files[1:]:
        absent = [c for c in first if c not in names(f)]
        if absent:
            raise ConfigError(f"data.log: {f} lacks columns {absent} of {files[0]}")
    _, start, batch = next(iter_batches(files[:1], batch_rows=sample_rows))
    sample = joined_batch(batch.slice(0, sample_rows), 0, start, load_side_tables(config.data), config,
                          str(files[0]))
    sample = attach_statistics(attach_history(sample, config.data), config.data)
    columns = examples.frame_columns(sample, config, sample[ROW].to_numpy())
    return examples.schema(config, examples.key_kinds_of(columns))


def run_pipeline(config: RankstageConfig, files: list[Path], tmp: Path, cols: list[examples.Column], runner: str,
                 pipeline_args: list[str], buckets: int, batch_rows: int, verbose: bool) -> None:
    d = config.data
    stats = d.statistics
    options = PipelineOptions(pipeline_args, runner=runner)
    # the user's rows meet in one group (history lists, statistics keyed by user first); each other first column of
    # a statistics key regroups the rows once more
    stage_columns = [d.user_column] + list(dict.fromkeys(
        k.columns[0] for k in (stats.keys if stats else []) if k.columns[0] != d.user_column))
    try:
        with beam.Pipeline(options=options) as p:
            frames = p | "ReadJoinedLog" >> ReadJoinedLog(config, files, batch_rows)
            times = (frames | "TimeValues" >> beam.Map(lambda f: set(f[d.time_column].unique().tolist()))
                     | "AllTimeValues" >> beam.CombineGlobally(_union))
            if stats is not None:
                first_day = times | "FirstDay" >> beam.Map(
                    lambda ts: int(day_numbers(pd.Series(sorted(ts)), stats.date_format).min()))
                days = times | "DayNumbers" >> beam.Map(
                    lambda ts: np.unique(day_numbers(pd.Series(sorted(ts)), stats.date_format)))
                kept = (times | "KeptTimeValues" >> beam.Map(
                    lambda ts, first: [t for t in ts if after_warmup(
                        day_numbers(pd.Series([t]), stats.date_format), first, stats)[0]],
                    first=beam.pvalue.AsSingleton(first_day)))
                tables = frames | "Statistics" >> StatisticsTables(config, buckets, days, tmp / "statistics")
            else:
                first_day, kept, tables = None, times | "KeptTimeValues" >> beam.Map(sorted), None
            split = kept | "SplitDays" >> beam.Map(split_days, config)
            for i, column in enumerate(stage_columns):
                keys = [k for k in (stats.keys if stats else []) if k.columns[0] == column]
                frames = frames | f"JoinBy_{column}" >> JoinByBucket(config, column, buckets, keys, tables,
                                                                     history=i == 0)
            written = frames | "WriteExamples" >> beam.ParDo(
                _WriteExamples(config, cols, str(tmp / "examples"), verbose),
                beam.pvalue.AsSingleton(first_day) if first_day is not None else None,
                beam.pvalue.AsSingleton(split)).with_outputs("stats", main="rows")
            rows_per_day = written.rows | "RowsPerDay" >> beam.CombinePerKey(sum) | "AllDays" >> beam.combiners.ToDict()
            by_feature = {f.name: f for f in config.features}
            (written.stats | "FeatureStats" >> beam.CombinePerKey(_MergePartials())
             | "BySplit" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], finish_partial(kv[1], by_feature[kv[0][1]]))))
             | "GroupSplits" >> beam.GroupByKey()
             | "SaveStats" >> beam.Map(_save_split, [f.name for f in config.features], str(tmp / "stats")))
            (rows_per_day | "Summary" >> beam.Map(_save_summary, beam.pvalue.AsSingleton(split), str(tmp / SUMMARY)))
    except ConfigError:
        raise
    except Exception as err:  # a runner wraps a worker's ConfigError in its own exception: give back the one line
        text = str(err)
        marker = "ConfigError: "
        if marker in text:
            raise ConfigError(text[text.rindex(marker) + len(marker):].strip().splitlines()[0]) from None
        raise


def _union(sets) -> set:
    out: set = set()
    for s in sets:
        out |= s
    return out


def _save_split(kv, names: list[str], out: str) -> None:
    split, per_feature = kv
    got = dict(per_feature)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_stats({n: got.get(n, FeatureStats()) for n in names}, Path(out) / f"{split}.json")


def _save_summary(rows_per_day: dict, split: dict, path: str) -> None:
    Path(path).write_text(json.dumps({"rows_per_day": {str(k): int(v) for k, v in sorted(rows_per_day.items())},
                                      TRAIN: split[TRAIN], "validation": split["validation"]}, default=int))


class _ReadFile(beam.DoFn):
    """(file index, path) -> the file's record batches as joined pandas frames (side tables loaded once)."""

    def __init__(self, config: RankstageConfig, batch_rows: int):
        self.config, self.batch_rows = config, batch_rows

    def setup(self):
        self.sides = load_side_tables(self.config.data)

    def process(self, element):
        index, path = element
        for _, start, batch in iter_batches([Path(path)], batch_rows=self.batch_rows):
            yield joined_batch(batch, index, start, self.sides, self.config, path)

class ReadJoinedLog(beam.PTransform):
    """The log's files -> pandas frames of joined rows (``ROW`` ids, side tables)."""

    def __init__(self, config: RankstageConfig, files: list[Path], batch_rows: int):
        super().__init__()
        self.config, self.files, self.batch_rows = config, [str(f) for f in files], batch_rows

    def expand(self, p):
        return (p | "Files" >> beam.Create(list(enumerate(self.files))) | "SpreadFiles" >> beam.Reshuffle()
                | "ReadBatches" >> beam.ParDo(_ReadFile(self.config, self.batch_rows)))

class _SumFrames(beam.CombineFn):
    """Sums of frames by their index: per (key columns, ``DAY``) daily sums or per ``DAY`` totals."""

    def create_accumulator(self):
        return None

    def add_input(self, acc, frame):
        return frame if acc is None else pd.concat([acc, frame]).groupby(level=list(range(frame.index.nlevels)),
                                                                         sort=False).sum()

    def merge_accumulators(self, accs):
        acc = None
        for a in accs:
            if a is not None:
                acc = self.add_input(acc, a)
        return acc

    def extract_output(self, acc):
        return acc

class StatisticsTables(beam.PTransform):
    """Joined frames -> ((first key column, bucket), (key name, ``tables_by_day`` of the bucket's keys)); the
    newest snapshot of every key written to ``snapshot_dir/<key>.parquet`` as a side effect."""

    def __init__(self, config: RankstageConfig, buckets: int, days, snapshot_dir: Path):
        super().__init__()
        self.config, self.buckets, self.days, self.snapshot_dir = config, buckets, days, str(snapshot_dir)

    def expand(self, frames):
        data, buckets = self.config.data, self.buckets
        stats = data.statistics
        keys = {k.name: k for k in stats.keys}

        def sums(frame):
            frame = frame.assign(**{DAY: day_numbers(frame[data.time_column], stats.date_format)})
            for key in stats.keys:
                daily = daily_sums(frame, stats, key)
                for b, part in split_by_bucket(daily, key.columns[0], buckets):
                    yield (key.name, b), part.set_index([*key.columns, DAY])

        per_bucket = (frames | "DailySums" >> beam.FlatMap(sums)
                      | "SumPerKeyBucket" >> beam.CombinePerKey(_SumFrames())
                      | "AsDaily" >> beam.MapTuple(lambda kb, f: (kb, f.reset_index())))
        totals = beam.pvalue.AsDict(
            per_bucket | "BucketTotals" >> beam.MapTuple(lambda kb, f: (kb[0], day_totals(f, stats)))
            | "DayTotals" >> beam.CombinePerKey(_SumFrames()))

        def by_day(element, days, totals):
            (name, b), daily = element
            key = keys[name]
            yield (key.columns[0], b), (name, tables_by_day(daily, stats, key, days, totals[name]))

        def newest(element, days, totals):
            kb, daily = element
            key = keys[kb[0]]
            day = int(days.max()) + 1
            yield kb[0], table_as_of(daily, stats, key, day, totals[kb[0]]).assign(**{AS_OF: as_of_label(day,
                                                                                                        stats)})

        def publish(name, parts):
            key = keys[name]
            table = pd.concat(list(parts), ignore_index=True).sort_values(key.columns, kind="stable")
            publish_table(table.reset_index(drop=True), Path(self.snapshot_dir) / f"{name}.parquet")

        days = beam.pvalue.AsSingleton(self.days)
        (per_bucket | "Newest" >> beam.FlatMap(newest, days, totals)
         | "GroupSnapshot" >> beam.GroupByKey() | "PublishSnapshot" >> beam.MapTuple(publish))
        return per_bucket | "TablesByDay" >> beam.FlatMap(by_day, days, totals)

class _JoinGroup(beam.DoFn):
    """(bucket, {rows, tables}) -> (bucket, the rows with history lists and these keys' statistics)."""

    def __init__(self, config: RankstageConfig, keys, history: bool):
        self.config, self.keys, self.history = config, keys, history

    def process(self, element):
        bucket, group = element
        parts = list(group["rows"])
        if not parts:
            return
        rows = pd.concat(parts, ignore_index=True).sort_values(ROW, kind="stable").reset_index(drop=True)
        if self.history:
            rows = attach_history(rows, self.config.data)
        if self.keys:
            got: dict[str, list] = {}
            for name, table in group["tables"]:
                got.setdefault(name, []).append(table)
            tables = {k.name: pd.concat(got[k.name], ignore_index=True) if k.name in got
                      else _no_table(self.config, k) for k in self.keys}
            rows = join_statistics(rows, tables, self.config.data, self.keys)
        yield bucket, rows

class JoinByBucket(beam.PTransform):
    """Frames -> frames regrouped by a hash bucket of ``column``; there, the history lists (``history``) and
    the statistics of ``keys`` (whose first column is ``column``) are attached."""

    def __init__(self, config: RankstageConfig, column: str, buckets: int, keys, tables, history: bool):
        super().__init__()
        self.config, self.column, self.buckets, self.keys = config, column, buckets, keys
        self.tables, self.history = tables, history

    def expand(self, frames):
        column, buckets = self.column, self.buckets

        def key_rows(element):
            frame = element[1] if isinstance(element, tuple) else element
            yield from split_by_bucket(frame, column, buckets)

        rows = frames | "KeyRows" >> beam.FlatMap(key_rows)
        names = {k.name for k in self.keys}
        if names:
            tables = (self.tables | "KeyTables" >> beam.Filter(lambda kv: kv[0][0] == column and kv[1][0] in names)
                      | "ByBucket" >> beam.MapTuple(lambda cb, t: (cb[1], t)))
        else:
            tables = rows.pipeline | "NoTables" >> beam.Create([])
        return ({"rows": rows, "tables": tables} | "CoGroup" >> beam.CoGroupByKey()
                | "Join" >> beam.ParDo(_JoinGroup(self.config, self.keys, self.history)))

class _WriteExamples(beam.DoFn):
    """(bucket, joined rows) -> one shard per day of the rows' records; outputs (time value, rows) and, tagged
    "stats", ((split, feature), partial) for the training days and the whole window."""

    def __init__(self, config: RankstageConfig, cols, out: str, verbose: bool):
        self.config, self.cols, self.out, self.verbose = config, cols, out, verbose

    def process(self, element, first_day, split):
        bucket, frame = element
        d = self.config.data
        if d.statistics is not None and d.statistics.warmup_days:
            frame = frame[after_warmup(day_numbers(frame[d.time_column], d.statistics.date_format), first_day,
                                       d.statistics)]
        frame = frame.reset_index(drop=True)
        columns = examples.frame_columns(frame, self.config, frame[ROW].to_numpy())
        records = examples.encode(columns, self.cols)  # one call per group: encode's cost is mostly per call
        times = frame[d.time_column].to_numpy()
        for value in pd.unique(times).tolist():  # Python values: deterministic keys
            at = times == value
            path = Path(self.out) / f"date={value}" / f"part-{bucket:05d}{examples.SUFFIX}"
            examples.write_shard(path, records[at])
            yield value, int(at.sum())
        for name, days in ((TRAIN, split[TRAIN]), (WINDOW, split[TRAIN] + split["validation"])):
            rows = np.isin(times, days)
            if rows.any():
                part = {k: v[rows] for k, v in columns.items()}
                for f in self.config.features:
                    yield beam.pvalue.TaggedOutput("stats", ((name, f.name), feature_partial(part, f)))
        if self.verbose:
            print(f"features build: bucket {bucket}: {len(frame)} rows written", file=sys.stderr, flush=True)


class _MergePartials(beam.CombineFn):
    def create_accumulator(self):
        return None

    def add_input(self, acc, partial):
        return merge_partials(acc, partial)

    def merge_accumulators(self, accs):
        acc = None
        for a in accs:
            acc = merge_partials(acc, a)
        return acc

    def extract_output(self, acc):
        return acc


def _no_table(config: RankstageConfig, key) -> pd.DataFrame:
    """The (empty) statistics table of a bucket whose rows have no counted key: every row's statistics missing."""
    stats = config.data.statistics
    empty = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in [*key.columns, DAY, *sum_columns(stats)]})
    return table_as_of(empty, stats, key, 0).assign(**{DAY: pd.Series(dtype=np.int64)})

