"""Log readers (CSV, Parquet), side-table joins, raw model inputs and task labels.

N rows throughout. Raw inputs are what serving receives: int64 ids, strings, float32 numerics
(NaN allowed: the exported graph fills the feature's default).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from features.history import attach_history
from features.logfiles import log_files
from features.spec import ConfigError, DataConfig, FeatureSpec, JoinSpec, RankstageConfig, TaskSpec
from features.statistics import attach_statistics

MISSING_INT = -1
MISSING_STRING = ""


def read_table(path: str | Path | list, columns: list[str] | None = None) -> pd.DataFrame:
    """Read a CSV or Parquet file with pyarrow (multi-threaded, typed) into pandas; or a log spec of several files
    (a day-partitioned directory, a glob, a list: ``features.logfiles.log_files``), concatenated in reading order."""
    if isinstance(path, list | tuple) or any(ch in str(path) for ch in "*?[") or Path(path).is_dir():
        tables = [_read_file(p, columns) for p in log_files(path if isinstance(path, list | tuple) else str(path))]
        return pa.concat_tables(tables, promote_options="permissive").to_pandas()
    return _read_file(Path(path), columns).to_pandas()


def _read_file(path: Path, columns: list[str] | None) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"data file not found: {path}")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".parquet", ".pq"):
        return pq.read_table(path, columns=columns)
    if suffix in (".csv", ".csv.gz"):
        opts = pacsv.ConvertOptions(include_columns=columns) if columns else None
        return pacsv.read_csv(path, convert_options=opts)
    raise ConfigError(f"data file {path}: unknown format {suffix!r} (expected .csv, .csv.gz or .parquet)")


def read_log(data: DataConfig, log: str | Path | list | None = None, statistics: bool = True) -> pd.DataFrame:
    """Read the impression log, left-join every side table the spec names, add the history lists of
    ``data.history`` and the point-in-time statistics features of ``data.statistics`` (dropping its warmup days)."""
    log = log or data.log
    df = read_table(log)
    for col in (data.time_column, data.user_column, data.item_column):
        if col not in df.columns:
            raise ConfigError(f"data: column {col!r} not in log {log} (has {list(df.columns)})")
    df = attach_history(join_side_tables(df, load_side_tables(data)), data)  # after the joins: author is a side column
    return attach_statistics(df, data) if statistics else df  # after the joins: keys may be side columns (author)


def load_side_tables(data: DataConfig, joins: list[JoinSpec] | None = None
                     ) -> list[tuple[str | list[str], pd.DataFrame]]:
    """The spec's side tables (``joins``, default ``data.joins``) as (key, table): selected columns, one row per key,
    missing markers as NaN. A composite key is a list of columns."""
    sides = []
    for join in data.joins if joins is None else joins:
        side = read_table(join.path)
        absent_keys = [k for k in join.keys if k not in side.columns]
        if absent_keys:
            raise ConfigError(f"data.joins: key {absent_keys[0]!r} missing in {join.path}")
        if join.columns:
            absent = [c for c in join.columns if c not in side.columns]
            if absent:
                raise ConfigError(f"data.joins: columns {absent} not in {join.path}")
            side = side[[*join.keys, *join.columns]]
        side = side.drop_duplicates(join.keys)
        if join.missing_values:
            side = side.replace({v: np.nan for v in join.missing_values})
        sides.append((join.key, side))
    return sides


def join_side_tables(df: pd.DataFrame, sides: list[tuple[str | list[str], pd.DataFrame]]) -> pd.DataFrame:
    """Left-join each side table onto the log (or a chunk of it); log columns win where names overlap."""
    for key, side in sides:
        keys = [key] if isinstance(key, str) else key
        absent = [k for k in keys if k not in df.columns]
        if absent:
            raise ConfigError(f"data.joins: key {absent[0]!r} not in the log")
        overlap = [c for c in side.columns if c in df.columns and c not in keys]
        df = df.merge(side.drop(columns=overlap), on=key, how="left")
    return df


def _as_int(values: pd.Series, feature: str) -> np.ndarray:
    num = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & ~(num % 1 == 0)  # non-numbers, fractions (1.5 would truncate to id 1) and inf
    if bad.any():
        raise ConfigError(f"feature {feature!r}: value {values[bad].tolist()[0]!r} is not an integer id")
    return num.fillna(MISSING_INT).to_numpy().astype(np.int64)


def raw_column(df: pd.DataFrame, feature: FeatureSpec) -> np.ndarray:
    """One feature's raw values as serving would send them: (N,) int64, str (object) or float32."""
    if feature.source not in df.columns:
        raise ConfigError(f"feature {feature.name!r}: column {feature.source!r} not in data")
    values = df[feature.source]
    kind = feature.raw_dtype
    if kind == "int":
        return _as_int(values, feature.name)
    if kind == "string":
        if pd.api.types.is_float_dtype(values):  # e.g. 3.0 -> "3", NaN -> ""
            as_int = values.dropna().astype(np.int64)
            if (as_int == values.dropna()).all():
                values = values.astype("Int64")
        out = values.astype(object).where(values.notna(), MISSING_STRING)
        return out.astype(str).to_numpy(dtype=object)
    num = pd.to_numeric(values, errors="coerce")
    bad = values.notna() & num.isna()
    if bad.any():
        raise ConfigError(f"feature {feature.name!r}: value {values[bad].iloc[0]!r} is not a number")
    return num.to_numpy(dtype=np.float32)


def raw_inputs(df: pd.DataFrame, features: list[FeatureSpec]) -> dict[str, np.ndarray]:
    """Raw model inputs keyed by feature name, each (N,)."""
    return {f.name: raw_column(df, f) for f in features}


def task_label(df: pd.DataFrame, task: TaskSpec) -> np.ndarray:
    """A task's label per row, (N,) float64, checked by type: binary in {0, 1}; watch time >= 0 seconds
    (clipped at ``max_value``); completion clipped to [0, 1] with non-finite ratios as NaN (not trained on)."""
    try:
        raw = df[task.label] if task.label in df.columns else df.eval(task.label)
    except Exception as err:  # pandas raises many kinds for a bad expression
        raise ConfigError(f"task {task.name!r}: label {task.label!r} is not a column or expression: {err}") from None
    y = pd.to_numeric(pd.Series(raw), errors="coerce").to_numpy(dtype=np.float64)
    if task.type == "binary":
        bad = ~np.isin(y, (0.0, 1.0))
        if bad.any():
            raise ConfigError(f"task {task.name!r}: binary label {task.label!r} has value {float(y[bad][0])!r} (row "
                              f"{int(np.flatnonzero(bad)[0])}); expected 0 or 1")
    elif task.type == "watch_time":
        bad = ~np.isfinite(y) | (y < 0)
        if bad.any():
            raise ConfigError(f"task {task.name!r}: watch time {task.label!r} has value {float(y[bad][0])!r} (row "
                              f"{int(np.flatnonzero(bad)[0])}); expected a finite number >= 0")
        y = y * task.scale
        if task.max_value is not None:
            y = np.minimum(y, task.max_value)
    else:  # completion
        y = np.where(np.isfinite(y), np.clip(y, 0.0, 1.0), np.nan)
    return y


def task_labels(df: pd.DataFrame, tasks: list[TaskSpec]) -> dict[str, np.ndarray]:
    return {t.name: task_label(df, t) for t in tasks}


def evaluation_labels(frame: pd.DataFrame, config: RankstageConfig) -> dict[str, np.ndarray]:
    """Labels to judge predictions by: as trained, except watch time in real, uncapped seconds (``max_value`` only
    shapes training), so models with different caps, baselines and replays are measured on the same truth."""
    return task_labels(frame, [t.model_copy(update={"max_value": None}) for t in config.tasks])


def up_to_until(times: pd.Series, data: DataConfig) -> np.ndarray:
    """(N,) bool: the time values up to ``data.until`` (all when unset); a ConfigError when they cannot be
    compared with it."""
    if data.until is None:
        return np.ones(len(times), dtype=bool)
    try:
        return (times <= data.until).to_numpy()
    except TypeError as e:
        raise ConfigError(f"data.until: {data.until!r} cannot be compared with column {data.time_column!r} "
                          f"(dtype {times.dtype})") from e


def time_split(df: pd.DataFrame, config: RankstageConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on all but the last ``validation_periods`` distinct time values; validate on those. Never random.

    Rows later than ``data.until`` (when set) are dropped first, so days kept for testing never reach training.
    """
    col = config.data.time_column
    df = df[up_to_until(df[col], config.data)]
    periods = np.sort(df[col].unique())
    n_val = config.data.validation_periods
    if len(periods) <= n_val:
        raise ConfigError(f"data.validation_periods: {n_val} leaves no training data ({len(periods)} distinct "
                          f"{col!r} values)")
    first_val = periods[-n_val]
    return df[df[col] < first_val].reset_index(drop=True), df[df[col] >= first_val].reset_index(drop=True)


def iter_log_chunks(path: str | Path | list, chunk_mb: float = 8.0) -> Iterator[pd.DataFrame]:
    """Yield the log (one file or a log spec: ``features.logfiles.log_files``) as pandas chunks of roughly
    ``chunk_mb`` MB (CSV blocks / Parquet record batches), file after file in the order ``read_table`` concatenates
    them."""
    for file in log_files(path if isinstance(path, list | tuple) else str(path), field="--logs"):
        if file.suffix in (".parquet", ".pq"):
            pf = pq.ParquetFile(file)
            row_bytes = max(1, pf.metadata.serialized_size // max(1, pf.metadata.num_rows)) * 8
            for batch in pf.iter_batches(batch_size=max(1024, int(chunk_mb * 2**20 / row_bytes))):
                yield batch.to_pandas()
        else:
            reader = pacsv.open_csv(file, read_options=pacsv.ReadOptions(block_size=int(chunk_mb * 2**20)))
            for batch in reader:
                yield batch.to_pandas()
