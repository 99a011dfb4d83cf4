"""A TEST FIXTURE, not the feature pipeline: writes the layout ``features.pipeline.build_features`` will write
(``ranking.shards``: examples/date=<day>/part-*.tfrecord.gz, schema.json, stats/train.json and window.json,
manifest.json) from a frame ``read_log`` returned, with ``features.examples`` and ``features.vocab.build_stats``, so
training from shards can be tested before the pipeline lands. Holds the whole frame in memory; small logs only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from features import examples
from features.logs import raw_inputs, time_split
from features.spec import RankstageConfig
from features.vocab import build_stats, save_stats


def write_examples(frame: pd.DataFrame, config: RankstageConfig, out: Path, parts_per_day: int = 2) -> Path:
    """``frame`` (joined, as ``read_log`` returns it) split by ``data.time_column`` into ``parts_per_day`` shard
    files per day under ``out``; the training / validation days of ``time_split``."""
    out = Path(out)
    train, val = time_split(frame, config)
    window = pd.concat([train, val], ignore_index=True)
    cols = examples.frame_columns(window, config, examples.row_ids(0, 0, len(window)))
    schema = examples.schema(config, examples.key_kinds_of(cols))
    day_col = config.data.time_column
    days = window[day_col].to_numpy()
    rows = {}
    for day in sorted(np.unique(days).tolist()):
        idx = np.flatnonzero(days == day)
        rows[str(day)] = len(idx)
        for part, chunk in enumerate(np.array_split(idx, parts_per_day)):
            records = examples.encode({k: v[chunk] for k, v in cols.items()}, schema)
            examples.write_shard(out / "examples" / f"date={day}" / f"part-{part:05d}{examples.SUFFIX}", records)
    (out / "schema.json").write_text(json.dumps([{"name": c.name, "kind": c.kind} for c in schema]))
    (out / "stats").mkdir(parents=True, exist_ok=True)
    save_stats(build_stats(raw_inputs(train, config.features), config.features), out / "stats" / "train.json")
    save_stats(build_stats(raw_inputs(window, config.features), config.features), out / "stats" / "window.json")
    (out / "manifest.json").write_text(json.dumps({
        "train_days": [str(d) for d in sorted(train[day_col].unique().tolist())],
        "validation_days": [str(d) for d in sorted(val[day_col].unique().tolist())], "rows_per_day": rows,
        "rows": sum(rows.values())}))
    return out
