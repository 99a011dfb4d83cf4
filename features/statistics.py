"""Point-in-time statistics features: per key (user, item, user x author) and past window, counts and smoothed rates.

For an impression on day d, a window of w days covers days d - w .. d - 1: nothing of day d or later counts, so a
statistic never sees the label it helps predict. Per key and window the table holds

    impressions n, per event e its count k_e and rate (k_e + m p_e) / (n + m), the mean watch (s + m t) / (n + m)

where p_e and t are the global rate and mean watch seconds of the same window (all keys) and m =
``prior_strength``: additive (Beta-prior) smoothing, so an id with few impressions sits near the global rate and one
with many near its own. A key with no impression in a window has n = 0, counts 0 and rate / mean missing (NaN), as a
key absent from the table has every column missing: the same rule in training and serving, where NaN takes the
feature's default.

One function (``table_as_of``) computes a table as of a day; training applies it to every day of the log (a loop
over days, vectorised within a day) and merges by (key, day) (``join_statistics``, per chunk in replay); the
newest snapshot (as of the day after the last log day) is published as ``<path>/<key>.parquet`` for serving, which
joins it like a side table (``serving_joins``). Publishing writes each table beside its target and renames it into
place (``publish_table``), so a reader sees the old table or the new one, never half of one; ``rankstage statistics``
publishes to ``data.statistics.path``, while training, benchmarks and sweeps write into their own run directories.

Notation: N log rows, K keys of a table, W windows.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from features.spec import ConfigError, DataConfig, JoinSpec, StatisticsConfig, StatisticsKey

DAY = "_stat_day"  # days since 1970-01-01 of a row (int64), added to the log while statistics are computed
AS_OF = "as_of"  # the snapshot's day in the format of data.time_column, a column of the written tables


def day_numbers(times: pd.Series, fmt: str) -> np.ndarray:
    """(N,) int64 days since the epoch of the time column's values, read with ``statistics.date_format``."""
    parsed = pd.to_datetime(times.astype(str), format=fmt, errors="coerce")
    if parsed.isna().any():
        bad = times[parsed.isna()].iloc[0]
        raise ConfigError(f"data.statistics.date_format: {fmt!r} does not read time value {bad!r}")
    return parsed.to_numpy().astype("datetime64[D]").astype(np.int64)


def sum_columns(stats: StatisticsConfig) -> list[str]:
    return ["impressions", *stats.events, *(["watch_s"] if stats.watch_time else [])]


def daily_sums(log: pd.DataFrame, stats: StatisticsConfig, key: StatisticsKey) -> pd.DataFrame:
    """Per (key, day): impressions, the count of each event and the watch seconds summed; rows with a missing key
    part are not counted. Needs the ``DAY`` column."""
    missing = [c for c in [*key.columns, *stats.events.values()] if c not in log.columns]
    if stats.watch_time is not None and stats.watch_time.column not in log.columns:
        missing.append(stats.watch_time.column)
    if missing:
        raise ConfigError(f"data.statistics (key {key.name!r}): columns {missing} not in the log")
    frame = pd.DataFrame({c: log[c] for c in [*key.columns, DAY]})
    frame["impressions"] = 1.0
    for name, column in stats.events.items():
        frame[name] = pd.to_numeric(log[column], errors="coerce").fillna(0.0).to_numpy(np.float64)
    if stats.watch_time is not None:
        secs = pd.to_numeric(log[stats.watch_time.column], errors="coerce").fillna(0.0)
        frame["watch_s"] = secs.to_numpy(np.float64) * stats.watch_time.scale
    return frame.groupby([*key.columns, DAY], sort=False).sum().reset_index()


def smoothed(total: np.ndarray, n: np.ndarray, prior: float, strength: float) -> np.ndarray:
    """(K,) additive smoothing (total + m prior) / (n + m); NaN where n = 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (total + strength * prior) / (n + strength), np.nan)


def day_totals(daily: pd.DataFrame, stats: StatisticsConfig) -> pd.DataFrame:
    """Per day (index ``DAY``): the sums of ``daily_sums``' table over every key, the global figures that the
    smoothing prior of ``table_as_of`` reads. Sums of disjoint parts of a log add up to the whole log's."""
    return daily.groupby(DAY, sort=True)[sum_columns(stats)].sum()


def table_as_of(daily: pd.DataFrame, stats: StatisticsConfig, key: StatisticsKey, day: int,
                totals: pd.DataFrame | None = None) -> pd.DataFrame:
    """The statistics of every key of ``daily`` with an impression in some window before ``day``: key columns then
    ``stat_<key>_<measure>_<w>d`` per window (K rows, sorted by key). ``daily`` is ``daily_sums``' table, for every
    key or for a part of the keys when ``totals`` (``day_totals`` of every key) gives the global rates of the
    smoothing prior; by default they are ``daily``'s own."""
    totals = day_totals(daily, stats) if totals is None else totals
    parts = []
    for w in stats.windows:
        past = daily[(daily[DAY] >= day - w) & (daily[DAY] < day)]
        agg = past.drop(columns=DAY).groupby(key.columns, sort=True).sum()
        window = totals[(totals.index >= day - w) & (totals.index < day)].sum()
        n_all = float(window["impressions"])
        n = agg["impressions"].to_numpy()
        out = {"impressions": n}
        for e in stats.events:
            prior = float(window[e]) / n_all if n_all > 0 else 0.0
            out[e] = agg[e].to_numpy()
            out[f"{e}_rate"] = smoothed(agg[e].to_numpy(), n, prior, stats.prior_strength)
        if stats.watch_time is not None:
            prior = float(window["watch_s"]) / n_all if n_all > 0 else 0.0
            out["watch_s"] = smoothed(agg["watch_s"].to_numpy(), n, prior, stats.prior_strength)
        parts.append(pd.DataFrame({f"stat_{key.name}_{m}_{w}d": out[m] for m, _ in stats.measures()},
                                  index=agg.index))
    # a key absent from a window: counts 0, rates missing; sorted by key, so tables of disjoint sets of keys
    # concatenated and sorted are the table of their union
    table = pd.concat(parts, axis=1, join="outer", sort=True)
    counts = [f"stat_{key.name}_{m}_{w}d" for w in stats.windows for m in ("impressions", *stats.events)]
    table[counts] = table[counts].fillna(0.0)
    return table.astype(np.float32).reset_index()


def tables_by_day(daily: pd.DataFrame, stats: StatisticsConfig, key: StatisticsKey, days: np.ndarray,
                  totals: pd.DataFrame | None = None) -> pd.DataFrame:
    """``table_as_of`` for each of ``days`` stacked, with a ``DAY`` column (``totals`` as there)."""
    return pd.concat([table_as_of(daily, stats, key, int(d), totals).assign(**{DAY: int(d)}) for d in days],
                     ignore_index=True)


def statistics_by_day(log: pd.DataFrame, stats: StatisticsConfig, days: np.ndarray
                      ) -> dict[str, pd.DataFrame]:
    """Per key name: ``tables_by_day`` of the whole ``log`` (which needs ``DAY``)."""
    return {key.name: tables_by_day(daily_sums(log, stats, key), stats, key, days) for key in stats.keys}


def statistics_tables(log: pd.DataFrame, data: DataConfig) -> dict[str, pd.DataFrame]:
    """Per key name, the statistics of every day of ``log`` (the joined log without statistics), keyed by (key
    columns, ``DAY``), for ``join_statistics``."""
    assert data.statistics is not None
    log = log.assign(**{DAY: day_numbers(log[data.time_column], data.statistics.date_format)})
    return statistics_by_day(log, data.statistics, np.unique(log[DAY].to_numpy()))


def join_statistics(rows: pd.DataFrame, tables: dict[str, pd.DataFrame], data: DataConfig,
                    keys: list[StatisticsKey] | None = None) -> pd.DataFrame:
    """``rows`` (the whole log or a chunk of it, row order kept) with the statistics columns of ``tables`` for
    ``keys`` (default: every key of ``data.statistics``)."""
    assert data.statistics is not None
    rows = rows.assign(**{DAY: day_numbers(rows[data.time_column], data.statistics.date_format)})
    for key in data.statistics.keys if keys is None else keys:
        rows = rows.merge(tables[key.name], on=[*key.columns, DAY], how="left")
    return rows.drop(columns=DAY)


def attach_statistics(log: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """The log with every statistics feature column (point-in-time: each row's day sees only earlier days), rows of
    the first ``warmup_days`` days dropped (they have no history). A no-op without ``data.statistics``."""
    stats = data.statistics
    if stats is None:
        return log
    out = join_statistics(log, statistics_tables(log, data), data)
    if stats.warmup_days:
        days = day_numbers(log[data.time_column], stats.date_format)
        out = out[after_warmup(days, int(days.min()), stats)]
    return out.reset_index(drop=True)


def after_warmup(days: np.ndarray, first_day: int, stats: StatisticsConfig) -> np.ndarray:
    """(N,) bool: rows of ``days`` (``DAY`` numbers) past the first ``warmup_days`` days of a log that starts on
    ``first_day``; the rows that keep their statistics features."""
    return days >= first_day + stats.warmup_days


def as_of_label(day: int, stats: StatisticsConfig) -> str:
    """A day number (``DAY``) written in ``statistics.date_format``: the ``AS_OF`` value of a snapshot."""
    return pd.Timestamp(np.datetime64(day, "D")).strftime(stats.date_format)


def snapshot_tables(log: pd.DataFrame, data: DataConfig) -> dict[str, pd.DataFrame]:
    """Per key name, the newest snapshot: statistics as of the day after the last day of ``log`` (the joined log
    without statistics: ``read_log(data, statistics=False)``), with an ``AS_OF`` column."""
    stats = data.statistics
    if stats is None:
        return {}
    log = log.assign(**{DAY: day_numbers(log[data.time_column], stats.date_format)})
    day = int(log[DAY].max()) + 1
    as_of = as_of_label(day, stats)
    return {name: t.drop(columns=DAY).assign(**{AS_OF: as_of})
            for name, t in statistics_by_day(log, stats, np.array([day])).items()}


def snapshot_as_of(path: str | Path) -> str | None:
    """The ``AS_OF`` day of a written snapshot table, or None if there is no readable table with one."""
    import pyarrow.parquet as pq

    try:
        column = pq.read_table(path, columns=[AS_OF]).column(AS_OF)
    except (OSError, KeyError, ValueError):  # absent, unreadable, or a table without the column
        return None
    return str(column[0].as_py()) if len(column) else None


def write_snapshot(log: pd.DataFrame, data: DataConfig, path: str | Path | None = None,
                   replace_newer: bool = False) -> list[Path]:
    """Publish ``snapshot_tables`` as ``<path>/<key>.parquet`` (default ``data.statistics.path``, the one serving
    reads), each with ``publish_table``; the written files.

    Serving joins these files and reloads them when they change, so an older snapshot (e.g. from a run with an
    earlier ``data.until``) never replaces a newer one unless ``replace_newer``: that table is kept and left out
    of the returned list, with a line on stderr saying so."""
    if data.statistics is None:
        return []
    return publish_snapshot(snapshot_tables(log, data), data, path, replace_newer)


def publish_snapshot(tables: dict[str, pd.DataFrame], data: DataConfig, path: str | Path | None = None,
                     replace_newer: bool = False) -> list[Path]:
    """``write_snapshot`` of tables already built (``snapshot_tables``' or the feature pipeline's
    ``statistics/``)."""
    out = Path(path or data.statistics.path)
    out.mkdir(parents=True, exist_ok=True)
    fmt = data.statistics.date_format
    written = []
    for name, table in tables.items():
        new_as_of = str(table[AS_OF].iloc[0]) if len(table) else None
        old_as_of = snapshot_as_of(out / f"{name}.parquet")
        if (not replace_newer and new_as_of is not None and old_as_of is not None
                and pd.to_datetime(old_as_of, format=fmt, errors="coerce") > pd.to_datetime(new_as_of, format=fmt)):
            print(f"statistics snapshot {out / f'{name}.parquet'} kept: it is as of {old_as_of}, newer than this "
                  f"one ({new_as_of}); `rankstage statistics --replace-newer` replaces it", file=sys.stderr)
            continue
        written.append(publish_table(table, out / f"{name}.parquet"))
    return written


def publish_table(table: pd.DataFrame, target: str | Path) -> Path:
    """Write ``table`` as Parquet to a temporary file of its own beside ``target``, then rename it onto ``target``
    (``os.replace``: atomic within a file system). A reader holding or opening ``target`` meanwhile reads the old
    table or the new one, whole; two publishers never share a temporary file; a failed write leaves ``target`` as
    it was and no temporary file behind."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        table.to_parquet(tmp, index=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def serving_joins(data: DataConfig) -> list[JoinSpec]:
    """The side-table joins serving performs: ``data.joins``, then each statistics snapshot on its key columns."""
    stats = data.statistics
    if stats is None:
        return list(data.joins)
    return [*data.joins, *(JoinSpec(path=str(Path(stats.path) / f"{k.name}.parquet"),
                                    key=k.columns[0] if len(k.columns) == 1 else list(k.columns),
                                    columns=None) for k in stats.keys)]
