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
    examples/date=<time value>/part-<bucket>.parquet       the same rows as Parquet (``formats`` with "parquet")
    schema.json                                            [{name, kind}] of the records
    stats/train.json, stats/window.json                    features.vocab.save_stats of the training days / all
    statistics/<key>.parquet                               the newest snapshot (features.statistics.snapshot_tables)
    manifest.json                                          config, log files, rows per day, split, runner, seconds
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import apache_beam as beam
import numpy as np
import pandas as pd
from apache_beam.options.pipeline_options import PipelineOptions

from features import carry, examples
from features.history import attach_history, context_columns, history_lists, history_tail
from features.logfiles import count_rows, iter_batches, log_files, partition_day, rss_gb
from features.logs import join_side_tables, load_side_tables, time_split, up_to_until
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
PLAN, TABLES = ".plan.json", ".tables"  # scratch of a build: the split, the statistics tables by bucket
CONTEXT = "_rankstage_context"  # marks a state's context rows among a group's rows while its lists are built


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


def joined_batch(batch, file_index: int, start: int, sides, config: RankstageConfig, where: str,
                 keep: RowPass | None = None, days: DaySelect | None = None) -> pd.DataFrame:
    """One record batch of the log as pandas, with its row ids (``ROW``) and the side tables joined; with ``keep``,
    only the rows of that pass, with ``days`` only the rows of those days (filtered before the join, row ids
    kept)."""
    check_columns(batch.schema.names, where, config)
    rows = examples.row_ids(file_index, start, batch.num_rows)
    for select in (keep, days):
        if select is not None:
            mine = np.asarray(select.mask(batch.column(select.column).to_pandas()), dtype=bool)
            batch, rows = batch.filter(mine), rows[mine]
    frame = batch.to_pandas()
    frame[ROW] = rows
    return join_side_tables(frame, sides)


@dataclass(frozen=True)
class DaySelect:
    """The rows whose ``column`` (the time column) is after ``after`` (exclusive) and up to ``until``, or in
    ``values``: the days a warm start writes examples for (phase 1 still reads every day for the statistics)."""

    column: str
    after: object = None
    until: object = None
    values: tuple = ()

    def mask(self, times: pd.Series) -> np.ndarray:
        if self.values:
            return times.isin(list(self.values)).to_numpy()
        keep = np.ones(len(times), dtype=bool)
        if self.after is not None:
            keep &= (times > self.after).to_numpy()
        if self.until is not None:
            keep &= (times <= self.until).to_numpy()
        return keep


@dataclass(frozen=True)
class RowPass:
    """Pass ``index`` of ``passes`` over the log: the rows whose ``column`` falls in a hash bucket (of ``buckets``,
    a multiple of ``passes``) congruent to ``index``; the same buckets group the rows and their statistics tables."""

    column: str
    buckets: int
    passes: int
    index: int

    def mask(self, values: pd.Series) -> np.ndarray:
        return bucket_of(values, self.buckets) % self.passes == self.index

    def owns(self, bucket: int) -> bool:
        return bucket % self.passes == self.index


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
                   buckets: int | None = None, batch_rows: int = 65536, passes: int | None = None,
                   rows_per_pass: int = 1_000_000, days: DaySelect | None = None,
                   formats: tuple[str, ...] = (examples.TFRECORD,), state_from: str | Path | None = None) -> dict:
    """Run the feature pipeline over ``log`` (default ``config.data.log``) on ``runner`` into ``out_dir``; the
    manifest. ``pipeline_args`` are Beam pipeline options (``--direct_num_workers 2`` ...). The rows go through in
    ``passes`` passes of disjoint users (default: enough for ``rows_per_pass`` rows each), each grouped into
    ``buckets`` hash buckets of users and keys (default ``default_buckets``). ``days``: examples of
    those days only (the statistics still see every earlier day; feature stats are of those days). ``formats``: the
    shard formats written, of ``features.examples.FORMATS`` (training reads "tfrecord"; the Beam replay reads
    "parquet" when it is there). ``state_from``: a previous build (or its ``state/``, ``features.carry``) whose last
    day the new ``days`` follow: only the log's rows after that day are read, and the examples equal a full build's.
    Every build writes its own ``state/`` as of its last day up to ``data.until``. ``out_dir`` must not exist; it
    appears whole when the run succeeds and not at all when it fails."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    formats = tuple(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in examples.FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats {','.join(formats)}: expected one or more of {','.join(examples.FORMATS)}")
    if out.exists():
        raise FileExistsError(f"--out {out}: already exists (the pipeline writes a new directory)")
    files = log_files(config.data.log if log is None else log)
    say = (lambda msg: print(f"features build: {msg}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    say(f"{len(files)} log file(s), first {files[0]}")
    carried, days = (None, days) if state_from is None else carried_days(config, state_from, days)
    if carried is not None:
        say(f"from the state of {carried.root} (through {config.data.time_column} {carried.last}): only the rows "
            "after it are read")
    cols = preflight(config, files)
    rows = count_rows(files) if passes is None or buckets is None else 0
    if passes is None:
        passes = max(1, math.ceil(rows / rows_per_pass))
    if passes < 1:
        raise ConfigError(f"--passes {passes}: must be at least 1")
    if buckets is None:
        buckets = default_buckets(rows, passes)
    if buckets < 1:
        raise ConfigError(f"--buckets {buckets}: must be at least 1")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / "schema.json").write_text(json.dumps([asdict(c) for c in cols], indent=1))
        say(f"running on {runner} {' '.join(pipeline_args)}".rstrip())
        summary = run_pipeline(config, files, tmp, cols, runner, list(pipeline_args), buckets, batch_rows, verbose,
                               passes, days, formats, carried)
        manifest = {"config": config.name, "log_files": [str(f) for f in files],
                    "rows_per_day": summary["rows_per_day"], "rows": sum(summary["rows_per_day"].values()),
                    "train_days": summary["train"], "validation_days": summary["validation"],
                    "formats": list(formats), "runner": runner, "pipeline_args": list(pipeline_args),
                    "buckets": buckets, "passes": passes,
                    "days": asdict(days) if days is not None else None,
                    "state_from": None if carried is None else str(carried.root),
                    "seconds": round(time.perf_counter() - t0, 2)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"{manifest['rows']} rows in {manifest['seconds']} s -> {out}")
    return manifest


def carried_days(config: RankstageConfig, state_from: str | Path, days: DaySelect | None
                 ) -> tuple[carry.Carried, DaySelect]:
    """The state of ``state_from`` and ``days_after`` it."""
    carried = carry.load(state_from, config)
    return carried, days_after(carried, days, config.data.time_column)


def days_after(carried: carry.Carried, days: DaySelect | None, column: str) -> DaySelect:
    """The days a build from ``carried`` writes (default: every day after the state's); a ConfigError when a
    selected day is not after the state's last day (its rows would need the days before it, which the state has
    summed already)."""
    if days is None:
        return DaySelect(column, after=carried.last)
    early = [v for v in days.values if v <= carried.last]
    if early or (not days.values and (days.after is None or days.after < carried.last)):
        raise ConfigError(f"--days {list(early) or asdict(days)}: not after {carried.last}, the last {column} of "
                          f"the state {carried.root}; build those days from the whole log (without the state)")
    return days


def read_days(select: DaySelect, carried: carry.Carried) -> DaySelect:
    """The rows a build from ``carried`` reads: every day after the state's, up to the last selected day (a day
    between them counts in the statistics and the lists though no example of it is written)."""
    until = max(select.values) if select.values else select.until
    return DaySelect(select.column, after=carried.last, until=until)


ROWS_PER_BUCKET = 65_536  # the default buckets' group size: a bucket's overhead in the runner is per group


def default_buckets(rows: int, passes: int) -> int:
    """Hash buckets per pass for ``rows`` rows in ``passes`` passes: one per ``ROWS_PER_BUCKET`` rows of a pass, at
    least 4, at most 32. Each bucket costs the runner a group per shuffle whatever its size: on the ten bundled days
    (171,671 rows, one pass) 32 buckets took 54.5 s and 8 took 33.0 s; a warm start's one day 21.4 s against 5.7 s
    at 4. At 1M rows per pass this gives the 16 the 10M benchmark ran with."""
    return int(min(32, max(4, math.ceil(rows / max(passes, 1) / ROWS_PER_BUCKET))))


def log_columns(path: Path) -> list[str]:
    """A log file's column names, without reading its rows."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if path.name.endswith((".parquet", ".pq")):
        return pq.read_schema(path).names
    with pacsv.open_csv(path) as reader:
        return reader.schema.names


def preflight(config: RankstageConfig, files: list[Path], sample_rows: int = 2000) -> list[examples.Column]:
    """Check the log on the driver before any worker starts (every file has the first file's columns; a sample
    of the first file goes through the same steps as ``read_log``, so a missing column fails here with
    ``read_log``'s one-line error) and return the record schema."""
    first = log_columns(files[0])
    check_columns(first, str(files[0]), config)
    for f in files[1:]:
        absent = [c for c in first if c not in log_columns(f)]
        if absent:
            raise ConfigError(f"data.log: {f} lacks columns {absent} of {files[0]}")
    _, start, batch = next(iter_batches(files[:1], batch_rows=sample_rows))
    sample = joined_batch(batch.slice(0, sample_rows), 0, start, load_side_tables(config.data), config,
                          str(files[0]))
    sample = attach_statistics(attach_history(sample, config.data), config.data)
    columns = examples.frame_columns(sample, config, sample[ROW].to_numpy())
    return examples.schema(config, examples.key_kinds_of(columns))


def run_pipeline(config: RankstageConfig, files: list[Path], tmp: Path, cols: list[examples.Column], runner: str,
                 pipeline_args: list[str], buckets: int, batch_rows: int, verbose: bool, passes: int = 1,
                 select: DaySelect | None = None, formats: tuple[str, ...] = (examples.TFRECORD,),
                 carried: carry.Carried | None = None) -> dict:
    """Phase 1, one pipeline over the whole log: the day split and the statistics tables by day (combines only:
    memory in keys x days, never in rows), written under ``tmp``. Phase 2, ``passes`` pipelines, each over the rows
    of 1/passes of the users (a user's rows all in one pass): history lists and statistics joined, examples
    written. A runner holds a shuffle's input in memory (DirectRunner does), so a pass's peak memory is in its own
    rows, not in the log's. With ``carried`` (``features.carry``) both phases read only the rows after its last
    day, phase 1 adds its daily sums and phase 2 its users' context rows. Both write the state as of the last day
    up to ``data.until`` under ``tmp/state``. -> the summary (rows per day, train and validation days)."""
    d = config.data
    stats = d.statistics
    options = PipelineOptions(pipeline_args, runner=runner)
    # the user's rows meet in one group (history lists, statistics keyed by user first); each other first column of
    # a statistics key regroups the rows once more
    stage_columns = [d.user_column] + list(dict.fromkeys(
        k.columns[0] for k in (stats.keys if stats else []) if k.columns[0] != d.user_column))
    counts = {c: buckets * passes if c == d.user_column else buckets for c in stage_columns}
    past_lists = d.history is not None and any(lst.scope == "all" for lst in d.history.lists)
    read = None if carried is None else read_days(select, carried)
    state = tmp / carry.STATE
    say = (lambda msg: print(f"features build: {msg}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    t0 = time.perf_counter()
    with one_line_errors():
        with beam.Pipeline(options=options) as p:
            frames = p | "ReadJoinedLog" >> ReadJoinedLog(config, files, batch_rows, columns=aggregated_columns(config),
                                                          days=read)
            times = (frames | "TimeValues" >> beam.Map(lambda f: set(f[d.time_column].unique().tolist()))
                     | "AllTimeValues" >> beam.CombineGlobally(_union))
            if stats is not None:
                days = times | "DayNumbers" >> beam.Map(_table_days, stats.date_format, select)
                snapshot_day = times | "SnapshotDay" >> beam.Map(_snapshot_day, config)
                (frames | "Statistics" >> StatisticsTables(config, counts, days, snapshot_day, tmp / "statistics",
                                                           carried.daily_files() if carried else [],
                                                           state / carry.DAILY)
                 | "SaveTables" >> beam.Map(_save_table, str(tmp / TABLES)))
            times | "SavePlan" >> beam.Map(_save_plan, config, str(tmp / PLAN), carried is not None,
                                           None if carried is None else carried.first_day)
        plan = json.loads((tmp / PLAN).read_text())
        if carried is not None and not plan[TRAIN]:
            raise ConfigError(f"--state-from {carried.root}: the log has no rows after {carried.last}, the state's "
                              f"last {d.time_column}")
        split = {TRAIN: plan[TRAIN], "validation": plan["validation"]}
        rows_per_day: dict[str, int] = {}
        partials: dict = {}
        for index in range(passes):
            say(f"pass {index + 1}/{passes}: history lists, statistics and examples of 1/{passes} of the users "
                f"({time.perf_counter() - t0:.0f} s in, RSS {rss_gb():.2f} GB)")
            keep = RowPass(d.user_column, counts[d.user_column], passes, index) if passes > 1 else None
            with beam.Pipeline(options=options) as p:
                # a scope-all history list holds events of earlier days: those rows are read too, dropped after
                # a scope-all history list holds events of earlier days: those rows are read too (or, from a state,
                # its context rows), dropped after the lists are built
                frames = p | "ReadJoinedLog" >> ReadJoinedLog(config, files, batch_rows, keep, days=read if read else
                                                              None if past_lists else select)
                prefix = f"p{index:03d}-" if passes > 1 else ""
                for i, column in enumerate(stage_columns):
                    keys = [k for k in (stats.keys if stats else []) if k.columns[0] == column]
                    first = i == 0
                    frames = frames | f"JoinBy_{column}" >> JoinByBucket(
                        config, column, counts[column], keys, tmp / TABLES, keep if first else None, history=first,
                        select=select if first else None,
                        context=carried.context_files() if carried and first else (),
                        carry=(str(state / carry.CONTEXT), plan["last"], prefix)
                        if first and d.history is not None and plan["last"] is not None else None)
                written = frames | "WriteExamples" >> beam.ParDo(
                    _WriteExamples(config, cols, str(tmp / "examples"), verbose, prefix, formats),
                    plan["first_day"], split).with_outputs("stats", main="rows")
                (written.rows | "RowsPerDay" >> beam.CombinePerKey(sum) | "AllDays" >> beam.combiners.ToDict()
                 | "SaveRows" >> beam.Map(_save_pickle, str(tmp / f".rows-{index}.pkl")))
                (written.stats | "FeatureStats" >> beam.CombinePerKey(_MergePartials())
                 | "AllStats" >> beam.combiners.ToList() | "SaveStats" >> beam.Map(
                     _save_pickle, str(tmp / f".partials-{index}.pkl")))
            for day, n in _load_pickle(tmp / f".rows-{index}.pkl").items():
                rows_per_day[str(day)] = rows_per_day.get(str(day), 0) + int(n)
            for key, partial in _load_pickle(tmp / f".partials-{index}.pkl"):
                partials[key] = merge_partials(partials.get(key), partial)
    by_feature = {f.name: f for f in config.features}
    for name in (TRAIN, WINDOW):
        got = {f: finish_partial(partial, by_feature[f]) for (n, f), partial in partials.items() if n == name}
        if got:
            (tmp / "stats").mkdir(parents=True, exist_ok=True)
            save_stats({f.name: got.get(f.name, FeatureStats()) for f in config.features},
                       tmp / "stats" / f"{name}.json")
    if carry.carries(config) and plan["last"] is not None:
        carry.write_meta(state, config, plan["last"], plan["first_day"])
    for scratch in [tmp / TABLES, tmp / PLAN, *tmp.glob(".rows-*.pkl"), *tmp.glob(".partials-*.pkl")]:
        shutil.rmtree(scratch) if scratch.is_dir() else scratch.unlink(missing_ok=True)
    return {"rows_per_day": dict(sorted(rows_per_day.items())), **split}


def aggregated_columns(config: RankstageConfig) -> list[str]:
    """What phase 1 reads: the time, user and item columns, the statistics keys' columns, events and watch time."""
    d = config.data
    cols = required_columns(config)
    if d.statistics is not None:
        cols += [c for k in d.statistics.keys for c in k.columns] + list(d.statistics.events.values())
        if d.statistics.watch_time is not None:
            cols.append(d.statistics.watch_time.column)
    return list(dict.fromkeys(cols))


@contextmanager
def one_line_errors():
    """A runner wraps a worker's ConfigError in its own exception: give back the one line."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        text = str(err)
        marker = "ConfigError: "
        if marker in text:
            raise ConfigError(text[text.rindex(marker) + len(marker):].strip().splitlines()[0]) from None
        raise


def _save_plan(times: set, config: RankstageConfig, path: str, from_state: bool = False,
               carried_first: int | None = None) -> None:
    """The kept time values' split, the first day (warm-up; a state's when it is earlier) and the last time value
    up to ``data.until`` (the state's), for the passes."""
    stats = config.data.statistics
    kept, first = sorted(times), None
    values = pd.Series(kept)
    upto = values[up_to_until(values, config.data)].tolist() if kept else []
    if stats is not None:
        first = int(day_numbers(values, stats.date_format).min()) if kept else None
        if carried_first is not None:
            first = int(carried_first) if first is None else min(first, int(carried_first))
        kept = [t for t in kept if after_warmup(day_numbers(pd.Series([t]), stats.date_format), first, stats)[0]]
    # a build from a state (a warm start's) writes only days to train on; the split needs the whole log's days
    split = {TRAIN: kept, "validation": []} if from_state else split_days(kept, config)
    Path(path).write_text(json.dumps({"first_day": first, "last": max(upto) if upto else None, **split},
                                     default=int))


def _snapshot_day(times: set, config: RankstageConfig) -> int | None:
    """The day number the snapshot is as of: the day after the last time value up to ``data.until``."""
    d = config.data
    values = pd.Series(sorted(times))
    values = values[up_to_until(values, d)]
    return int(day_numbers(values, d.statistics.date_format).max()) + 1 if len(values) else None


def _table_days(times: set, date_format: str, select: DaySelect | None) -> np.ndarray:
    """The day numbers whose statistics tables phase 2 joins: every kept time value's, or with ``select`` (a warm
    start) only the selected days' (their rows are the only ones read; the tables still sum every earlier day)."""
    values = pd.Series(sorted(times))
    chosen = select.mask(values) if select is not None else None
    if chosen is not None and chosen.any():
        values = values[chosen]
    return np.unique(day_numbers(values, date_format))


def _save_table(element, root: str) -> None:
    """((first column, bucket), (key, ``tables_by_day`` of the bucket)) -> ``root/<first column>/<bucket>/<key>.pkl``
    (scratch of the build; pickle keeps the dtypes exact)."""
    (column, bucket), (name, table) = element
    path = Path(root) / column / f"{bucket:05d}" / f"{name}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_pickle(path)


def _save_pickle(value, path: str) -> None:
    Path(path).write_bytes(pickle.dumps(value))


def _load_pickle(path: Path):
    return pickle.loads(path.read_bytes())


def _union(sets) -> set:
    out: set = set()
    for s in sets:
        out |= s
    return out


class _ReadFile(beam.DoFn):
    """(file index, path) -> the file's record batches as joined pandas frames (side tables loaded once)."""

    def __init__(self, config: RankstageConfig, batch_rows: int, keep: RowPass | None, columns: list[str] | None,
                 days: DaySelect | None = None):
        self.config, self.batch_rows, self.keep, self.columns, self.days = config, batch_rows, keep, columns, days

    def setup(self):
        sides = load_side_tables(self.config.data)
        self.want = None
        if self.columns is not None:  # only what the columns need: each side table's keys and its wanted columns
            self.want = set(self.columns) | {k for j in self.config.data.joins for k in j.keys}
            sides = [(key, side[[c for c in side.columns if c in self.want]]) for key, side in sides
                     if (set(side.columns) - ({key} if isinstance(key, str) else set(key))) & self.want]
        self.sides = sides

    def process(self, element):
        index, path = element
        # a date= partition of another day is not opened (its row ids are its file index's still)
        opened = self.days is None or _partition_selected(path, self.days)
        read = None if self.want is None or not opened else [c for c in log_columns(Path(path)) if c in self.want]
        for _, start, batch in iter_batches([Path(path)] if opened else [], columns=read,
                                            batch_rows=self.batch_rows):
            frame = joined_batch(batch, index, start, self.sides, self.config, path, self.keep, self.days)
            if len(frame):
                yield frame

def _partition_selected(path: str, days: DaySelect) -> bool:
    """Whether a file's ``date=`` partition day (as a string or a number, as the time column may hold it) is one
    of ``days``'; True for a file outside a partition."""
    day = partition_day(path)
    if day is None:
        return True
    for value in (int(day), day):
        try:
            return bool(days.mask(pd.Series([value]))[0])
        except TypeError:  # the selection's values are of the other type
            continue
    return True


class ReadJoinedLog(beam.PTransform):
    """The log's files -> pandas frames of joined rows (``ROW`` ids, side tables), of one pass's users (``keep``);
    ``columns``: only these (log or side-table columns; the join keys come along), for the passes that aggregate."""

    def __init__(self, config: RankstageConfig, files: list[Path], batch_rows: int, keep: RowPass | None = None,
                 columns: list[str] | None = None, days: DaySelect | None = None):
        super().__init__()
        self.config, self.files, self.batch_rows, self.keep = config, [str(f) for f in files], batch_rows, keep
        self.columns, self.days = columns, days

    def expand(self, p):
        return (p | "Files" >> beam.Create(list(enumerate(self.files))) | "SpreadFiles" >> beam.Reshuffle()
                | "ReadBatches" >> beam.ParDo(_ReadFile(self.config, self.batch_rows, self.keep, self.columns,
                                                        self.days)))

class _SumFrames(beam.CombineFn):
    """Sums of frames by their index: per (key columns, ``DAY``) daily sums or per ``DAY`` totals.

    The accumulator is ``[summed, *pending]``: inputs (and other accumulators' frames) are appended and summed into
    one frame only once the pending rows reach the summed frame's (and ``MIN_PENDING``). Summing on every input cost
    O(keys) per frame, O(rows x keys) in all (phase 1 took 13 s at 1M synthetic rows, 355 s at 10M); summing all of
    a merge's accumulators at once held them all twice. Doubling keeps both linear."""

    MIN_PENDING = 16_384

    def create_accumulator(self):
        return []

    @staticmethod
    def _sum(frames: list[pd.DataFrame]) -> list[pd.DataFrame]:
        if len(frames) < 2:
            return frames
        levels = list(range(frames[0].index.nlevels))
        return [pd.concat(frames).groupby(level=levels, sort=False).sum()]

    def _fold(self, acc: list[pd.DataFrame], frames) -> list[pd.DataFrame]:
        for frame in frames:
            acc.append(frame)
            if sum(len(f) for f in acc[1:]) >= max(len(acc[0]), self.MIN_PENDING):
                acc = self._sum(acc)
        return acc

    def add_input(self, acc, frame):
        return self._fold(acc, [frame])

    def merge_accumulators(self, accs):
        merged: list[pd.DataFrame] = []
        for acc in accs:
            merged = self._fold(merged, acc)
        return merged

    def compact(self, acc):
        return self._sum(acc)

    def extract_output(self, acc):
        summed = self._sum(acc)
        return summed[0] if summed else None

class StatisticsTables(beam.PTransform):
    """Joined frames -> ((first key column, bucket), (key name, ``tables_by_day`` of the bucket's keys)); the
    snapshot of every key as of ``snapshot_day`` (the day after the last one up to ``data.until``; what
    ``features.statistics.snapshot_tables`` gives of those days) written to ``snapshot_dir/<key>.parquet`` as a
    side effect. ``buckets``: the
    bucket count of each first column (the rows' regrouping uses the same)."""

    def __init__(self, config: RankstageConfig, buckets: dict[str, int], days, snapshot_day, snapshot_dir: Path,
                 carried: list[tuple[str, str]] = (), carry_dir: Path | None = None):
        super().__init__()
        self.config, self.buckets, self.days, self.snapshot_dir = config, buckets, days, str(snapshot_dir)
        self.snapshot_day = snapshot_day
        self.carried, self.carry_dir = list(carried), None if carry_dir is None else str(carry_dir)

    def expand(self, frames):
        data, buckets = self.config.data, self.buckets
        stats = data.statistics
        keys = {k.name: k for k in stats.keys}

        def sums(frame):
            frame = frame.assign(**{DAY: day_numbers(frame[data.time_column], stats.date_format)})
            for key in stats.keys:
                daily = daily_sums(frame, stats, key)
                for b, part in split_by_bucket(daily, key.columns[0], buckets[key.columns[0]]):
                    yield (key.name, b), part.set_index([*key.columns, DAY])

        def carried_sums(element):  # a state's daily sums (features.carry), split by this build's buckets
            name, path = element
            key = keys[name]
            for b, part in split_by_bucket(pd.read_parquet(path), key.columns[0], buckets[key.columns[0]]):
                yield (name, b), part.set_index([*key.columns, DAY])

        daily = frames | "DailySums" >> beam.FlatMap(sums)
        if self.carried:
            daily = ((daily, frames.pipeline | "CarriedFiles" >> beam.Create(self.carried)
                      | "SpreadCarried" >> beam.Reshuffle() | "CarriedSums" >> beam.FlatMap(carried_sums))
                     | "WithCarried" >> beam.Flatten())
        per_bucket = (daily
                      | "SumPerKeyBucket" >> beam.CombinePerKey(_SumFrames())
                      | "AsDaily" >> beam.MapTuple(lambda kb, f: (kb, f.reset_index())))
        totals = beam.pvalue.AsDict(
            per_bucket | "BucketTotals" >> beam.MapTuple(lambda kb, f: (kb[0], day_totals(f, stats)))
            | "DayTotals" >> beam.CombinePerKey(_SumFrames()))

        def by_day(element, days, totals):
            (name, b), daily = element
            key = keys[name]
            if len(days):  # none: a build from a state with no new rows (refused after this phase)
                yield (key.columns[0], b), (name, tables_by_day(daily, stats, key, days, totals[name]))

        def newest(element, day, totals):
            kb, daily = element
            key = keys[kb[0]]
            if day is None:  # no day up to data.until
                return
            yield kb[0], table_as_of(daily, stats, key, day, totals[kb[0]]).assign(**{AS_OF: as_of_label(day,
                                                                                                        stats)})

        def publish(name, parts):
            key = keys[name]
            table = pd.concat(list(parts), ignore_index=True).sort_values(key.columns, kind="stable")
            publish_table(table.reset_index(drop=True), Path(self.snapshot_dir) / f"{name}.parquet")

        def save_carry(element, day, root):  # the last max(windows) days' sums up to the snapshot's day
            (name, b), daily = element
            if day is None:
                return
            kept = daily[(daily[DAY] >= day - max(stats.windows)) & (daily[DAY] < day)]
            if len(kept):
                path = Path(root) / name / f"part-{b:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                kept.reset_index(drop=True).to_parquet(path, index=False)

        days = beam.pvalue.AsSingleton(self.days)
        if self.carry_dir is not None:
            per_bucket | "CarryDaily" >> beam.Map(save_carry, beam.pvalue.AsSingleton(self.snapshot_day),
                                                  self.carry_dir)
        (per_bucket | "Newest" >> beam.FlatMap(newest, beam.pvalue.AsSingleton(self.snapshot_day), totals)
         | "GroupSnapshot" >> beam.GroupByKey() | "PublishSnapshot" >> beam.MapTuple(publish))
        return per_bucket | "TablesByDay" >> beam.FlatMap(by_day, days, totals)

class _JoinGroup(beam.DoFn):
    """(bucket, {rows, tables, context}) -> (bucket, the rows with history lists and these keys' statistics).

    With ``history``: the lists are built over the rows and a state's ``context`` rows of the same users
    (``features.carry``), then only the rows of ``select``'s days go on; ``carry`` = (directory, last time value,
    file prefix) writes the bucket's context rows as of that day for the next build."""

    def __init__(self, config: RankstageConfig, keys, history: bool, select: DaySelect | None = None,
                 carry: tuple | None = None):
        self.config, self.keys, self.history, self.select, self.carry = config, keys, history, select, carry

    def process(self, element):
        bucket, group = element
        parts, context = list(group["rows"]), list(group.get("context", ()))
        rows = (pd.concat(parts, ignore_index=True).sort_values(ROW, kind="stable").reset_index(drop=True)
                if parts else None)
        if self.history:
            rows = self._with_history(bucket, rows, pd.concat(context, ignore_index=True) if context else None)
        if rows is None or not len(rows):
            return
        if self.keys:
            got: dict[str, list] = {}
            for name, table in group["tables"]:
                got.setdefault(name, []).append(table)
            tables = {k.name: pd.concat(got[k.name], ignore_index=True) if k.name in got
                      else _no_table(self.config, k) for k in self.keys}
            rows = join_statistics(rows, tables, self.config.data, self.keys)
        yield bucket, rows

    def _with_history(self, bucket: int, rows: pd.DataFrame | None, context: pd.DataFrame | None
                      ) -> pd.DataFrame | None:
        """``rows`` with their history lists (over ``context`` too), of ``select``'s days; the carry written."""
        d = self.config.data
        pool = None
        if d.history is not None and (context is not None or self.carry is not None):
            names = [*context_columns(rows if rows is not None else context, d), ROW]
            parts = ([] if context is None else [context[names].assign(**{CONTEXT: True})]) + \
                    ([] if rows is None else [rows[names].assign(**{CONTEXT: False})])
            pool = pd.concat(parts, ignore_index=True).sort_values(ROW, kind="stable").reset_index(drop=True)
        if rows is not None:
            if context is None:
                rows = attach_history(rows, d)
            else:  # pool's rows of the log are ``rows``, in the same (row id) order
                mine = ~pool[CONTEXT].to_numpy()
                lists = {k: v[mine] for k, v in history_lists(pool.drop(columns=CONTEXT), d).items()
                         if k not in rows.columns}
                rows = rows.assign(**lists)
            if self.select is not None:
                rows = rows[self.select.mask(rows[d.time_column])].reset_index(drop=True)
        if self.carry is not None and pool is not None:
            root, last, prefix = self.carry
            pool = pool[(pool[d.time_column] <= last).to_numpy()].drop(columns=CONTEXT).reset_index(drop=True)
            kept = pool[history_tail(pool, d) | (pool[d.time_column] == last).to_numpy()]
            if len(kept):
                path = Path(root) / f"part-{prefix}{bucket:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                kept.to_parquet(path, index=False)
        return rows

class JoinByBucket(beam.PTransform):
    """Frames -> frames regrouped by a hash bucket of ``column``; there, the history lists (``history``) and
    the statistics of ``keys`` (whose first column is ``column``; their tables read from ``tables`` as
    ``_save_table`` wrote them, only the buckets ``keep`` owns) are attached."""

    def __init__(self, config: RankstageConfig, column: str, buckets: int, keys, tables: Path,
                 keep: RowPass | None, history: bool, select: DaySelect | None = None, context=(),
                 carry: tuple | None = None):
        super().__init__()
        self.config, self.column, self.buckets, self.keys = config, column, buckets, keys
        self.tables, self.keep, self.history = tables, keep, history
        self.select, self.context, self.carry = select, [str(f) for f in context], carry

    def expand(self, frames):
        column, buckets = self.column, self.buckets

        def key_rows(element):
            frame = element[1] if isinstance(element, tuple) else element
            yield from split_by_bucket(frame, column, buckets)

        rows = frames | "KeyRows" >> beam.FlatMap(key_rows)
        paths = sorted(str(f) for k in self.keys for f in (self.tables / column).glob(f"*/{k.name}.pkl")
                       if self.keep is None or self.keep.owns(int(f.parent.name)))
        tables = (rows.pipeline | "TableFiles" >> beam.Create(paths) | "SpreadTables" >> beam.Reshuffle()
                  | "LoadTables" >> beam.Map(lambda f: (int(Path(f).parent.name), (Path(f).stem, pd.read_pickle(f)))))
        keep = self.keep

        def context_rows(path):  # a state's context rows of this pass's users, by this build's buckets
            frame = pd.read_parquet(path)
            if keep is not None:
                frame = frame[keep.mask(frame[column])]
            yield from split_by_bucket(frame, column, buckets)

        groups = {"rows": rows, "tables": tables}
        if self.context:
            groups["context"] = (rows.pipeline | "ContextFiles" >> beam.Create(self.context)
                                 | "SpreadContext" >> beam.Reshuffle() | "ContextRows" >> beam.FlatMap(context_rows))
        return (groups | "CoGroup" >> beam.CoGroupByKey()
                | "Join" >> beam.ParDo(_JoinGroup(self.config, self.keys, self.history, self.select, self.carry)))


class _WriteExamples(beam.DoFn):
    """(bucket, joined rows) -> one shard per day of the rows' records in each of ``formats`` (the Parquet file
    from the same columns the records are encoded from); outputs (time value, rows) and, tagged "stats",
    ((split, feature), partial) for the training days and the whole window."""

    def __init__(self, config: RankstageConfig, cols, out: str, verbose: bool, prefix: str = "",
                 formats: tuple[str, ...] = (examples.TFRECORD,)):
        self.config, self.cols, self.out, self.verbose, self.prefix = config, cols, out, verbose, prefix
        self.formats = formats

    def process(self, element, first_day, split):
        bucket, frame = element
        d = self.config.data
        if d.statistics is not None and d.statistics.warmup_days:
            frame = frame[after_warmup(day_numbers(frame[d.time_column], d.statistics.date_format), first_day,
                                       d.statistics)]
        frame = frame.reset_index(drop=True)
        columns = examples.frame_columns(frame, self.config, frame[ROW].to_numpy())
        # one call per group: encode's cost is mostly per call
        records = examples.encode(columns, self.cols) if examples.TFRECORD in self.formats else None
        times = frame[d.time_column].to_numpy()
        for value in pd.unique(times).tolist():  # Python values: deterministic keys
            at = times == value
            stem = Path(self.out) / f"date={value}" / f"part-{self.prefix}{bucket:05d}"
            if records is not None:
                examples.write_shard(stem.with_name(stem.name + examples.SUFFIX), records[at])
            if examples.PARQUET in self.formats:
                examples.write_parquet(stem.with_name(stem.name + examples.PARQUET_SUFFIX),
                                       {k: v[at] for k, v in columns.items()}, self.cols)
            yield value, int(at.sum())
        for name, days in ((TRAIN, split[TRAIN]), (WINDOW, split[TRAIN] + split["validation"])):
            rows = np.isin(times, days)
            if rows.any():
                part = {k: v[rows] for k, v in columns.items()}
                for f in self.config.features:
                    yield beam.pvalue.TaggedOutput("stats", ((name, f.name), feature_partial(part, f)))
        if self.verbose:
            print(f"features build: {self.prefix}bucket {bucket}: {len(frame)} rows written", file=sys.stderr,
                  flush=True)


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

