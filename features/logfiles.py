"""A log as a dataset of files: a directory of Parquet shards partitioned by day (``date=YYYYMMDD/part-*.parquet``),
a glob, one file (CSV or Parquet), or a list of any of these (``data.log``).

Files are listed in a fixed order (partition day, then name), which defines the row ids of ``features.examples``:
file number i, row r within it. Readers stream record batches (``iter_batches``); nothing here holds a whole log.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from features.spec import ConfigError

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
