"""Training examples as TFRecord shards of ``tf.train.Example``: the one schema the feature pipeline writes and
training, judging and replay read.

One record per impression, every value a scalar:

    <feature name>   every raw input of ``config.features`` (int64 / bytes / float32), as serving receives it
    label/<task>     the evaluation label (``features.logs.evaluation_labels``: watch time in uncapped seconds,
                     completion NaN where undefined); training caps watch time at ``max_value`` itself
    key/user         ``data.user_column``, key/day ``data.time_column``, key/order ``data.history.order`` (or
                     the row id when there is none): the keys of user-day lists and the logged order
    key/row          the row's id in the log (``row_ids``): unique, and in log order within one file

Encoding is vectorised (``tf.io.encode_proto`` over whole columns, no Python loop per row): about 30 µs per row of
~90 columns on these machines against 440 µs for building ``tf.train.Example`` objects in Python. Shards are
GZIP-compressed (the repeated column names compress well). N rows throughout.

The same columns can also be written as one Parquet file per shard (``write_parquet``: ``part-<bucket>.parquet``
beside ``part-<bucket>.tfrecord.gz``, the same rows in the same order; int64, float32 and UTF-8 string columns named
as in ``schema.json``, zstd). Training reads the TFRecords; the Beam replay reads Parquet when it is there: decoding
it into numpy columns costs ~1.5 µs of CPU a row against ~13 µs for parsing the GZIP records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from features.logs import evaluation_labels, raw_inputs
from features.spec import ConfigError, RankstageConfig

LABEL = "label/"
USER, DAY, ORDER, ROW = "key/user", "key/day", "key/order", "key/row"
COMPRESSION = "GZIP"
SUFFIX = ".tfrecord.gz"
PARQUET_SUFFIX = ".parquet"
PARQUET_COMPRESSION = "zstd"  # 1M synthetic rows in 160 shards: 72 MB, beside 181 MB of GZIP TFRecords
TFRECORD, PARQUET = "tfrecord", "parquet"
FORMATS = (TFRECORD, PARQUET)  # the shard formats the feature pipeline writes (features build --formats)
FILE_BITS = 40  # row id = file index << FILE_BITS | row within the file


@dataclass(frozen=True)
class Column:
    """One scalar field of the record: its name and kind ("int", "float" or "string")."""

    name: str
    kind: str


def _kind(values: np.ndarray) -> str:
    if values.dtype.kind in "iub":
        return "int"
    if values.dtype.kind == "f":
        return "float"
    return "string"


def schema(config: RankstageConfig, key_kinds: dict[str, str]) -> list[Column]:
    """The record's columns in a fixed order: features, labels, keys (``key_kinds`` from ``key_kinds_of``)."""
    cols = [Column(f.name, f.raw_dtype) for f in config.features]
    cols += [Column(LABEL + t.name, "float") for t in config.tasks]
    return cols + [Column(k, key_kinds[k]) for k in (USER, DAY, ORDER, ROW)]


def order_column(config: RankstageConfig) -> str | None:
    """The column that orders a user's impressions within a day (``data.history.order``), if the spec names one."""
    return config.data.history.order if config.data.history is not None else None


def row_ids(file_index: int, start: int, n: int) -> np.ndarray:
    """(n,) int64 ids of rows ``start .. start + n - 1`` of the log's file number ``file_index``."""
    return (np.int64(file_index) << FILE_BITS) + np.arange(start, start + n, dtype=np.int64)


def frame_columns(frame: pd.DataFrame, config: RankstageConfig, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The record's columns of a joined frame (side tables, history lists and statistics attached, as
    ``features.logs.read_log`` returns it); ``rows`` (N,) the rows' ids. Each (N,)."""
    out: dict[str, np.ndarray] = dict(raw_inputs(frame, config.features))
    for task, y in evaluation_labels(frame, config).items():
        out[LABEL + task] = y.astype(np.float32)
    d = config.data
    out[USER] = frame[d.user_column].to_numpy()
    out[DAY] = frame[d.time_column].to_numpy()
    order = order_column(config)
    out[ORDER] = frame[order].to_numpy() if order is not None and order in frame.columns else rows
    out[ROW] = np.asarray(rows, np.int64)
    for k in (USER, DAY, ORDER):
        if out[k].dtype == object:
            out[k] = out[k].astype(str).astype(object)
    return out


def key_kinds_of(columns: dict[str, np.ndarray]) -> dict[str, str]:
    return {k: _kind(columns[k]) for k in (USER, DAY, ORDER, ROW)}


_LISTS = {"int": ("tensorflow.Int64List", "int64_list"), "float": ("tensorflow.FloatList", "float_list"),
          "string": ("tensorflow.BytesList", "bytes_list")}


def _string_bytes(values: np.ndarray) -> np.ndarray:
    """A string column's bytes as both formats store them: objects as ``str(v)`` in UTF-8, other arrays as bytes."""
    return np.asarray([str(v).encode() for v in values], dtype=object) if values.dtype == object \
        else values.astype(bytes)


def _tensor(values: np.ndarray, kind: str):
    import tensorflow as tf

    if kind == "int":
        return tf.constant(np.asarray(values, np.int64))
    if kind == "float":
        return tf.constant(np.asarray(values, np.float32))
    return tf.constant(_string_bytes(values))


def encode(columns: dict[str, np.ndarray], cols: list[Column]) -> np.ndarray:
    """(N,) serialized ``tf.train.Example`` records of ``columns`` (name -> (N,) values) in ``cols``' order."""
    import tensorflow as tf

    n = len(columns[cols[0].name])
    if n == 0:
        return np.zeros(0, dtype=object)

    def one_field(message: str, field: str, values):
        return tf.io.encode_proto(tf.ones([tf.shape(values)[0], 1], tf.int32), [values[:, None]], [field], message)

    entries = []
    for kind in ("int", "float", "string"):
        group = [c.name for c in cols if c.kind == kind]
        if not group:
            continue
        missing = [g for g in group if g not in columns]
        if missing:
            raise ConfigError(f"examples: columns {missing} missing")
        values = tf.reshape(tf.stack([_tensor(columns[g], kind) for g in group], axis=1), [-1])  # (N * C,) by row
        message, field = _LISTS[kind]
        feature = one_field("tensorflow.Feature", field, one_field(message, "value", values))
        keys = tf.tile(tf.constant(group), [n])
        entry = tf.io.encode_proto(tf.ones([n * len(group), 2], tf.int32), [keys[:, None], feature[:, None]],
                                   ["key", "value"], "tensorflow.Features.FeatureEntry")
        entries.append(tf.reshape(entry, [n, len(group)]))
    every = tf.concat(entries, axis=1)
    features = tf.io.encode_proto(tf.fill([n, 1], every.shape[1]), [every], ["feature"], "tensorflow.Features")
    return one_field("tensorflow.Example", "features", features).numpy()


def parse_spec(cols: list[Column]) -> dict:
    """``tf.io.parse_example`` features of ``cols``: every column a scalar ``FixedLenFeature``."""
    import tensorflow as tf

    dtypes = {"int": tf.int64, "float": tf.float32, "string": tf.string}
    return {c.name: tf.io.FixedLenFeature([], dtypes[c.kind]) for c in cols}


def write_shard(path: str | Path, records: np.ndarray) -> Path:
    """Write serialized records to one GZIP TFRecord file (a temporary name, renamed when complete)."""
    import tensorflow as tf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tf.io.TFRecordWriter(str(tmp), tf.io.TFRecordOptions(compression_type=COMPRESSION)) as w:
        for r in records:
            w.write(r)
    tmp.replace(path)
    return path


def read_columns(files: list[str | Path], cols: list[Column], batch_size: int = 65536, limit: int | None = None
                 ) -> dict[str, np.ndarray]:
    """Every record of ``files`` parsed back into (N,) numpy columns (strings as str objects, decoded from UTF-8),
    file order kept; with ``limit``, the first ``limit`` records of the files read interleaved (one record of each
    file in turn), so that they span every file. For tests and small reads; training streams the files with tf.data
    instead."""
    import tensorflow as tf

    names = [str(f) for f in files]
    if limit is None:
        ds = tf.data.TFRecordDataset(names, compression_type=COMPRESSION)
    else:
        ds = tf.data.Dataset.from_tensor_slices(names).interleave(
            lambda f: tf.data.TFRecordDataset(f, compression_type=COMPRESSION), cycle_length=len(names)).take(limit)
    spec = parse_spec(cols)
    parts: dict[str, list] = {c.name: [] for c in cols}
    for batch in ds.batch(batch_size):
        for k, v in tf.io.parse_example(batch, spec).items():
            parts[k].append(v.numpy())
    out = {}
    for c in cols:
        arr = np.concatenate(parts[c.name]) if parts[c.name] else np.zeros(0)
        out[c.name] = np.array([b.decode("utf-8") for b in arr], dtype=object) if c.kind == "string" else arr
    return out


# ---------------------------------------------------------------- Parquet shards


def arrow_schema(cols: list[Column]):
    """The Parquet shards' Arrow schema: ``cols`` in order, int64 / float32 / UTF-8 string."""
    import pyarrow as pa

    types = {"int": pa.int64(), "float": pa.float32(), "string": pa.string()}
    return pa.schema([pa.field(c.name, types[c.kind]) for c in cols])


def arrow_table(columns: dict[str, np.ndarray], cols: list[Column]):
    """``columns`` (name -> (N,) values, what ``encode`` takes) as an Arrow table of ``arrow_schema(cols)``: the
    same values ``encode`` writes (strings as ``_string_bytes``, checked to be UTF-8 by the cast)."""
    import pyarrow as pa

    missing = [c.name for c in cols if c.name not in columns]
    if missing:
        raise ConfigError(f"examples: columns {missing} missing")
    arrays = []
    for c in cols:
        v = columns[c.name]
        if c.kind == "int":
            arrays.append(pa.array(np.asarray(v, np.int64)))
        elif c.kind == "float":
            arrays.append(pa.array(np.asarray(v, np.float32)))
        else:
            arrays.append(pa.array(_string_bytes(v), pa.binary()).cast(pa.string()))
    return pa.Table.from_arrays(arrays, schema=arrow_schema(cols))


def write_parquet(path: str | Path, columns: dict[str, np.ndarray], cols: list[Column]) -> Path:
    """Write ``columns`` as one Parquet file of ``arrow_schema(cols)`` (a temporary name, renamed when complete)."""
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(arrow_table(columns, cols), tmp, compression=PARQUET_COMPRESSION)
    tmp.replace(path)
    return path


def parquet_schema_error(where: str, schema, cols: list[Column]) -> str | None:
    """One line naming ``where`` and the first column of ``cols`` that the Arrow ``schema`` lacks or holds with
    another type; None when every column is there as ``arrow_schema`` has it (other columns may be present)."""
    want = arrow_schema(cols)
    for field in want:
        i = schema.get_field_index(field.name)
        if i < 0:
            return f"{where}: no column {field.name!r} (schema.json has it as {field.type})"
        if not schema.field(i).type.equals(field.type):
            return f"{where}: column {field.name!r} is {schema.field(i).type}, schema.json says {field.type}"
    return None


def parquet_nulls_error(where: str, metadata, cols: list[Column]) -> str | None:
    """One line naming ``where`` and the first column of ``cols`` whose row groups' statistics (Parquet
    ``FileMetaData``) count nulls, which the records cannot hold; None otherwise (or without statistics)."""
    index = {metadata.schema.column(j).path: j for j in range(metadata.num_columns)}
    for c in cols:
        j = index.get(c.name)
        for g in range(metadata.num_row_groups) if j is not None else ():
            stats = metadata.row_group(g).column(j).statistics
            if stats is not None and stats.has_null_count and stats.null_count:
                return f"{where}: column {c.name!r} has nulls (the examples have none)"
    return None


def table_columns(table, cols: list[Column], text: set[str] | frozenset = frozenset(), where: str = "parquet"
                  ) -> dict[str, np.ndarray]:
    """An Arrow table of ``arrow_schema``'s columns -> (N,) numpy columns of ``cols``: int64, float32, the string
    columns in ``text`` as str objects and the others as fixed-width bytes (what ``ReadExampleShards`` makes of the
    records). A null, which the records cannot hold, is an error naming ``where`` and the column."""
    import pyarrow as pa

    out = {}
    for c in cols:
        col = table.column(c.name)
        if col.null_count:
            raise ConfigError(f"{where}: column {c.name!r} has {col.null_count} nulls (the examples have none)")
        if c.kind != "string":
            out[c.name] = col.to_numpy()
        elif c.name in text:
            out[c.name] = col.to_numpy(zero_copy_only=False)
        else:
            out[c.name] = col.cast(pa.binary()).to_numpy(zero_copy_only=False).astype(bytes)
    return out


def read_parquet_columns(files: list[str | Path], cols: list[Column]) -> dict[str, np.ndarray]:
    """Every row of the Parquet ``files`` as ``read_columns`` gives the records: (N,) columns, strings as str
    objects, file order kept. For tests and small reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for f in files:
        table = pq.read_table(f, columns=[c.name for c in cols])
        error = parquet_schema_error(str(f), table.schema, cols)
        if error:
            raise ConfigError(error)
        tables.append(table)
    table = pa.concat_tables(tables) if tables else arrow_schema(cols).empty_table()
    return table_columns(table, cols, {c.name for c in cols if c.kind == "string"})
