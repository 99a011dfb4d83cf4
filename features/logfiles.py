"""A log as a dataset of files: a directory of Parquet shards partitioned by day (``date=YYYYMMDD/part-*.parquet``),
a glob, one file (CSV or Parquet), or a list of any of these (``data.log``). A directory holding ``date=`` partitions
is the files in them (a synthetic log keeps its side tables in ``DIR/side/``); any other directory is all its files.

Files are listed in a fixed order (partition day, then name), which defines the row ids of ``features.examples``:
file number i, row r within it. Readers stream record batches (``iter_batches``); nothing here holds a whole log.

``import_csv`` (`rankstage logs import`) turns CSV files into such a directory, streaming CSV blocks, with every
column the config reads checked and typed (``needed_columns``): ids and other integers int64, numbers float64, the
time column a date (an integer YYYYMMDD, or a string of ``statistics.date_format``); a column the config does not
read keeps the type pyarrow infers from the file's first rows. The day of a row's partition is its time column's.
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from features.spec import ConfigError, RankstageConfig

PARTITION = re.compile(r"^date=(\d{8})$")
FORMATS = (".parquet", ".pq", ".csv", ".csv.gz")


def _format(path: Path) -> str | None:
    name = path.name
    return next((f for f in FORMATS if name.endswith(f)), None)


def partition_day(path: str | Path) -> str | None:
    """``YYYYMMDD`` of a file under a ``date=YYYYMMDD`` directory, else None."""
    m = PARTITION.match(Path(path).parent.name)
    return m.group(1) if m else None


def _one(spec: str, field: str) -> list[Path]:
    path = Path(spec)
    if any(ch in spec for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if _format(Path(p)))
        if not found:
            raise ConfigError(f"{field}: glob {spec!r} matches no .csv/.parquet file")
        return found
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) and not p.name.startswith("."))
        if any(map(partition_day, found)):  # a partitioned log: its date= shards (side tables may sit beside them)
            found = [p for p in found if partition_day(p)]
        if not found:
            raise ConfigError(f"{field}: directory {spec} holds no .csv/.parquet file")
        return found
    if not path.exists():
        raise ConfigError(f"{field}: file not found: {spec}")
    if _format(path) is None:
        raise ConfigError(f"{field}: {spec}: unknown format (expected {', '.join(FORMATS)})")
    return [path]


def log_files(log: str | Path | list, field: str = "data.log") -> list[Path]:
    """The files of a log spec in reading order: partition day (files outside a partition first, in the order
    given), then path. Each file once."""
    specs = [log] if isinstance(log, str | Path) else list(log)
    if not specs:
        raise ConfigError(f"{field}: empty list of log files")
    files: list[Path] = []
    for s in specs:
        files.extend(p for p in _one(str(s), field) if p not in files)
    return sorted(files, key=lambda p: (partition_day(p) or "", str(p))) if any(map(partition_day, files)) \
        else files


def file_rows(path: Path) -> int | None:
    """Row count of a Parquet file from its footer (None for CSV: unknown without reading it)."""
    return pq.ParquetFile(path).metadata.num_rows if _format(path) in (".parquet", ".pq") else None


def iter_batches(files: list[Path], columns: list[str] | None = None, batch_rows: int = 65536
                 ) -> Iterator[tuple[int, int, pa.RecordBatch]]:
    """Yield (file index, first row within the file, record batch of at most about ``batch_rows`` rows) over
    ``files`` in order. ``columns`` restricts the columns read (all if None)."""
    for i, path in enumerate(files):
        start = 0
        if _format(path) in (".parquet", ".pq"):
            batches = pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)
        else:
            opts = pacsv.ConvertOptions(include_columns=columns) if columns else None
            batches = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=max(1 << 20, batch_rows * 200)),
                                     convert_options=opts)
        for batch in batches:
            yield i, start, batch
            start += batch.num_rows


def rss_gb() -> float:
    """This process's resident memory now (Linux ``/proc/self/status``), GB; NaN elsewhere. For progress lines."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    except OSError:
        pass
    return float("nan")


def count_rows(files: list[Path]) -> int:
    """Rows of ``files``: Parquet from the footers, CSV as newlines less the header (an estimate if a quoted field
    holds a newline); for choosing how many passes a pipeline makes, not for results."""
    total = 0
    for path in files:
        if _format(path) in (".parquet", ".pq"):
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with open(path, "rb") as f:
                total += max(0, sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1)
    return total


# --- import: CSV files -> a day-partitioned directory of Parquet shards, schema-checked against a config ---------

KINDS = ("any", "number", "int", "time")  # how a needed column is checked; a later kind is stricter
# a column the config does not need keeps the type pyarrow infers from the file's first rows ("inferred")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _header(path: Path) -> list[str]:
    """Column names of a CSV or Parquet file, without reading its rows."""
    if _format(path) in (".parquet", ".pq"):
        return pq.read_schema(path).names
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        return next(csv.reader(f), [])


def needed_columns(config: RankstageConfig) -> dict[str, str]:
    """The log columns ``config`` reads, each with its check (``KINDS``): the time column (a date), the user and item
    columns, the label columns of the tasks (numbers), the source columns of the features (by raw dtype: int ->
    integral, float -> numeric, string -> any) and the columns of ``data.history`` and ``data.statistics``. Columns
    the spec derives itself (statistics features, history lists) are left out; side-table columns are filtered by
    ``import_csv``, which reads the side tables' headers."""
    d = config.data
    derived = {x.name for x in d.history.lists} if d.history else set()
    derived |= {s["name"] for s in d.statistics.feature_specs()} if d.statistics else set()
    by_dtype = {"int": "int", "float": "number", "string": "any"}
    out: dict[str, str] = {}

    def need(col: str, kind: str) -> None:
        if col not in out or KINDS.index(kind) > KINDS.index(out[col]):
            out[col] = kind

    feature_kind = {f.source: by_dtype[f.raw_dtype] for f in config.features if f.source not in derived}
    need(d.time_column, "time")
    need(d.user_column, feature_kind.get(d.user_column, "any"))
    need(d.item_column, feature_kind.get(d.item_column, "any"))
    for col, kind in feature_kind.items():
        need(col, kind)
    for t in config.tasks:
        for col in [t.label] if IDENT.fullmatch(t.label) else IDENT.findall(t.label):
            need(col, "number")
    if d.history:
        need(d.history.order, "number")
        for x in d.history.lists:
            for c in x.columns:
                for col in [c] if IDENT.fullmatch(c) else IDENT.findall(c):  # an expression reads numbers
                    need(col, feature_kind.get(col, "any") if col == c else "number")
            for w in x.wheres:
                need(w, "number")
    if d.statistics:
        for col in d.statistics.events.values():
            need(col, "number")
        if d.statistics.watch_time:
            need(d.statistics.watch_time.column, "number")
        for key in d.statistics.keys:
            for col in key.columns:
                need(col, feature_kind.get(col, "any"))
    return out


class _BadValue(ValueError):
    pass


def _to_int(a: pa.Array) -> pa.Array:
    try:
        return pc.cast(a, pa.int64())
    except pa.ArrowInvalid:  # "3.0" is integral: through float64 (a safe cast refuses 1.5, inf and overflow)
        return pc.cast(pc.cast(a, pa.float64()), pa.int64())


def _to_date_int(a: pa.Array) -> pa.Array:
    v = _to_int(a)
    days = np.unique(v.drop_null().to_numpy())
    bad = pd.isna(pd.to_datetime(pd.Series(days.astype(str)), format="%Y%m%d", errors="coerce")).to_numpy()
    if bad.any():
        raise _BadValue
    return v


def _first_failure(a: pa.Array, convert) -> int:
    """Index of the first element ``convert`` refuses (it refuses the whole of ``a``): a binary search on slices."""
    lo, hi = 0, len(a)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            convert(a.slice(lo, mid - lo))
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, _BadValue):
            hi = mid
    return lo


class _Converter:
    """Turns a block of strings into the column's type, or names the first bad value."""

    def __init__(self, column: str, kind: str, inferred: pa.DataType, date_format: str | None,
                 required: bool = False):
        self.column, self.kind, self.date_format, self.required = column, kind, date_format, required
        if kind == "time":
            self.convert, self.what = _to_date_int, "a date (an integer YYYYMMDD)"
            if not pa.types.is_integer(inferred) and date_format:  # dates as strings of data.statistics.date_format
                self.convert, self.what = self._to_date_str, f"a date ({date_format!r})"
        elif kind == "int":
            self.convert, self.what = _to_int, "an integer"
        elif kind == "number":
            self.convert, self.what = (lambda a: pc.cast(a, pa.float64())), "a number"
        else:
            target = pa.string() if pa.types.is_null(inferred) else inferred
            self.convert = lambda a: pc.cast(a, target)
            self.what = f"of type {target} (as the column's first rows)"

    def _to_date_str(self, a: pa.Array) -> pa.Array:
        values = pd.Series(a.drop_null().unique().to_pylist(), dtype=object)
        if pd.isna(pd.to_datetime(values, format=self.date_format, errors="coerce")).any():
            raise _BadValue
        return a

    def __call__(self, a: pa.Array, file: Path, first_row: int) -> pa.Array:
        if self.required and a.null_count:
            i = int(np.flatnonzero(a.is_null().to_numpy(zero_copy_only=False))[0])
            raise ConfigError(f"{file}: row {first_row + i}, column {self.column!r}: value '' is not {self.what}")
        try:
            return self.convert(a)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, _BadValue):
            i = _first_failure(a, self.convert)
            raise ConfigError(f"{file}: row {first_row + i}, column {self.column!r}: value {a[i].as_py()!r} is not "
                              f"{self.what}") from None


class DayWriters:
    """Parquet writers per day under ``root/date=YYYYMMDD/part-NNNNN.parquet``: a day's part is rolled to the next at
    ``part_rows``, and at most ``max_open`` writers stay open (the least recently written is closed; that day's next
    rows start its next part), so memory does not grow with the number of days."""

    def __init__(self, root: Path, schema: pa.Schema, part_rows: int, max_open: int = 4):
        self.root, self.schema, self.part_rows, self.max_open = root, schema, part_rows, max_open
        self.open: dict[str, tuple[pq.ParquetWriter, int]] = {}  # day -> (writer, rows in its part); LRU order
        self.parts: dict[str, int] = {}  # day -> its newest part number
        self.files = 0

    def write(self, day: str, table: pa.Table) -> None:
        while table.num_rows:
            writer, rows = self.open.pop(day, (None, self.part_rows))
            if rows >= self.part_rows:
                if writer is not None:
                    writer.close()
                self.parts[day] = self.parts.get(day, -1) + 1
                path = self.root / f"date={day}" / f"part-{self.parts[day]:05d}.parquet"
                path.parent.mkdir(parents=True, exist_ok=True)
                writer, rows = pq.ParquetWriter(path, self.schema), 0
                self.files += 1
            take = min(table.num_rows, self.part_rows - rows)
            writer.write_table(table.slice(0, take))
            self.open[day] = (writer, rows + take)  # now the most recently written
            table = table.slice(take)
        while len(self.open) > self.max_open:
            oldest = next(iter(self.open))
            self.open.pop(oldest)[0].close()

    def close(self) -> None:
        for writer, _ in self.open.values():
            writer.close()
        self.open = {}


def import_csv(config: RankstageConfig, files: list[Path], out: str | Path, overwrite: bool = False,
               part_rows: int = 1_000_000, block_mb: float = 16.0, progress: bool = True,
               append: bool = False) -> dict:
    """Convert CSV ``files`` into ``out/date=YYYYMMDD/part-NNNNN.parquet`` (day from ``data.time_column``), checking
    every value of the columns ``config`` needs (``needed_columns``) and typing them (int64, float64; the other
    columns keep the type pyarrow infers from the first rows). Streams CSV blocks of ``block_mb``: memory does not
    grow with the files. Rows keep their order within a day. Writes into a temporary directory beside ``out`` and
    renames it at the end: a bad value (a ``ConfigError`` naming the file, the 1-based data row, the column and the
    value) leaves nothing behind. ``append`` adds the new days to an existing ``out`` instead (a new day is a new
    partition: a day already there is refused, nothing written is rewritten). Returns {"rows", "days", "files",
    "seconds"}."""
    out = Path(out)
    if append and overwrite:
        raise ConfigError("--append and --overwrite exclude each other")
    if append and not out.is_dir():
        raise ConfigError(f"--append: {out} is not a directory")
    if out.exists() and not overwrite and not append:
        raise FileExistsError(f"--out {out} exists (pass --overwrite to replace it, --append to add new days)")
    files = [Path(f) for f in files]
    for f in files:
        if not f.exists():
            raise ConfigError(f"{f}: file not found")
        if _format(f) not in (".csv", ".csv.gz"):
            raise ConfigError(f"{f}: not a CSV file (logs import converts CSV)")
    needed = needed_columns(config)
    side = set()
    for join in config.data.joins:
        side |= set(join.columns or _header(Path(join.path)))
    d = config.data
    date_format = d.statistics.date_format if d.statistics else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    names: list[str] | None = None
    writers = None
    t0, total = time.perf_counter(), 0
    last = t0
    try:
        for file in files:
            header = _header(file)
            absent = [c for c in needed if c not in header and c not in side]
            if absent:
                raise ConfigError(f"{file}: column {absent[0]!r} missing (the config needs it; the file has "
                                  f"{header})")
            if names is None:
                names = header
                first = next(_csv_blocks(file, names, 1 << 20, pacsv.ParseOptions(
                    invalid_row_handler=lambda row: "skip"), None), pa.table({c: pa.nulls(0) for c in names})).schema
                keys = (d.time_column, d.user_column, d.item_column)  # never empty
                converters = {c: _Converter(c, needed.get(c, "inferred"), first.field(c).type, date_format,
                                            required=c in keys) for c in names}
            elif sorted(header) != sorted(names):
                raise ConfigError(f"{file}: columns {header} differ from those of {files[0]} ({names})")
            invalid: list = []

            def on_invalid(row, invalid=invalid):
                invalid.append(row)
                return "skip"

            reader = _csv_blocks(file, header, int(block_mb * 2**20),
                                 pacsv.ParseOptions(invalid_row_handler=on_invalid),
                                 pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                      strings_can_be_null=True))
            row = 1
            for batch in reader:
                if invalid:
                    raise _parse_error(file, invalid[0])
                cols = [converters[c](batch.column(c), file, row) for c in names]
                table = pa.Table.from_arrays(cols, names=names)
                if writers is None:
                    writers = DayWriters(tmp, table.schema, part_rows)
                elif table.schema != writers.schema:
                    table = table.cast(writers.schema)
                _write_days(writers, table, d.time_column, date_format)
                row += batch.num_rows
                total += batch.num_rows
                now = time.perf_counter()
                if progress and now - last >= 1.0:
                    last = now
                    print(f"logs import: {file.name}: {total:,} rows, {total / (now - t0):,.0f} rows/s",
                          file=sys.stderr)
            if invalid:
                raise _parse_error(file, invalid[0])
        n_files = writers.files if writers else 0
        days = len({p.parent.name for p in tmp.rglob("*.parquet")})
        if writers:
            writers.close()
    except BaseException:
        if writers:
            writers.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if append:
        _append_days(tmp, out)
    elif out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    seconds = time.perf_counter() - t0
    if progress:
        print(f"logs import: {total:,} rows in {seconds:.1f} s ({total / max(seconds, 1e-9):,.0f} rows/s)",
              file=sys.stderr)
    return {"rows": total, "days": days, "files": n_files, "seconds": seconds}


def _append_days(tmp: Path, out: Path) -> None:
    """Move the day partitions of ``tmp`` into ``out``: refused (and ``tmp`` removed) if a day is there already or
    the schema differs from ``out``'s; each day lands by one rename."""
    new = sorted(p for p in tmp.iterdir() if PARTITION.match(p.name))
    try:
        clash = [p.name for p in new if (out / p.name).exists()]
        if clash:
            raise ConfigError(f"--append: {out / clash[0]} exists (a new day is a new partition; --overwrite "
                              f"rewrites the whole directory)")
        old = next((f for f in log_files(str(out)) if _format(f) in (".parquet", ".pq")), None) \
            if any(out.rglob("*.parquet")) else None
        if old is not None and new:
            have, got = pq.read_schema(old), pq.read_schema(next(new[0].glob("*.parquet")))
            if not have.equals(got, check_metadata=False):
                raise ConfigError(f"--append: the new files' schema differs from {old}'s: {got} vs {have}")
        for p in new:
            p.rename(out / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _csv_blocks(file: Path, names: list[str], block_bytes: int, parse: pacsv.ParseOptions,
                convert: pacsv.ConvertOptions | None) -> Iterator[pa.Table]:
    """The data rows of a CSV file as tables of about ``block_bytes`` each, cut at newlines and parsed one at a time
    (pyarrow's streaming reader reads the file ahead of its parsing without bound: its peak memory grew with the file,
    +150 MB per 150 MB of CSV). A quoted value holding a newline is not supported."""
    opener = gzip.open if file.name.endswith(".gz") else open
    read = pacsv.ReadOptions(column_names=names, use_threads=True)
    with opener(file, "rb") as f:
        f.readline()  # the header
        carry = b""
        while True:
            buf = f.read(block_bytes)
            data = carry + buf
            if not data:
                return
            cut = data.rfind(b"\n") + 1 if buf else len(data)
            if cut == 0:  # no newline yet: read on
                carry = data
                continue
            data, carry = data[:cut], data[cut:]
            if data.strip():
                yield pacsv.read_csv(pa.py_buffer(data), read_options=read, parse_options=parse,
                                     convert_options=convert)


def _parse_error(file: Path, bad) -> ConfigError:
    """A row with the wrong number of values; its number is counted in the file (error path)."""
    opener = gzip.open if file.name.endswith(".gz") else open
    with opener(file, "rt", newline="") as f:
        row = next((i for i, cells in enumerate(csv.reader(f)) if i and len(cells) != bad.expected_columns), 0)
    return ConfigError(f"{file}: row {row}: {bad.actual_columns} values, expected {bad.expected_columns}: "
                       f"{bad.text!r}")


def _write_days(writers: DayWriters, table: pa.Table, time_column: str, date_format: str | None) -> None:
    """Split a typed block by day, keeping row order within each day, and append each piece to its day's part."""
    times = table.column(time_column).combine_chunks()
    uniq, inverse = np.unique(np.asarray(times.to_numpy(zero_copy_only=False)), return_inverse=True)
    if pa.types.is_integer(times.type):
        keys = [str(int(u)) for u in uniq]
    else:
        keys = list(pd.to_datetime(pd.Series(uniq), format=date_format).dt.strftime("%Y%m%d"))
    first_seen = np.unique(inverse, return_index=True)[1]
    for k in np.argsort(first_seen, kind="stable"):
        writers.write(keys[k], table.take(pa.array(np.flatnonzero(inverse == k))))
