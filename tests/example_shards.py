"""Example shards for tests, in the layout the feature pipeline writes (``DIR/examples/date=<day>/part-*.tfrecord.gz``,
with ``parquet`` the same rows in ``part-*.parquet`` beside them, and ``DIR/schema.json``), built from a joined frame
with ``features.examples`` (until the pipeline lands)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from features import examples
from features.spec import RankstageConfig


def write_example_shards(frame: pd.DataFrame, config: RankstageConfig, out: Path, days: list[int],
                         parts: int = 3, parquet: bool = False) -> Path:
    """Rows of ``days`` of ``frame`` (``read_log``'s, in log order: row id = position) as ``parts`` shards per day;
    shard i holds the day's rows i, i + parts, ..., so every list spans several files. -> ``out``."""
    rows = np.arange(len(frame), dtype=np.int64)
    day = frame[config.data.time_column].to_numpy()
    cols = None
    for d in days:
        sel = np.flatnonzero(day == d)
        columns = examples.frame_columns(frame.iloc[sel].reset_index(drop=True), config, rows[sel])
        cols = cols or examples.schema(config, examples.key_kinds_of(columns))
        for i in range(parts):
            part = {k: v[i::parts] for k, v in columns.items()}
            stem = out / "examples" / f"date={d}" / f"part-{i:05d}"
            examples.write_shard(f"{stem}{examples.SUFFIX}", examples.encode(part, cols))
            if parquet:
                examples.write_parquet(f"{stem}{examples.PARQUET_SUFFIX}", part, cols)
    (out / "schema.json").write_text(json.dumps([{"name": c.name, "kind": c.kind} for c in cols]))
    return out
