"""Scoring a logged log through an exported model, once, into a compact ``ScoredLog`` that replay, tuning and
calibration fitting evaluate as often as they like.

The log is read in chunks with pyarrow (``features.logs.iter_log_chunks``): raw feature columns live only for one
chunk, so memory is bounded by the chunk size plus ~100 bytes per row kept (side tables are read once: they are per
user / per item). Predictions are corrected for negative down-sampling (``calibration.outputs``) and not calibrated:
a calibration map is applied by whoever evaluates, with the artifact it was handed. N rows.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from calibration.outputs import correct_outputs
from features.history import history_lists
from features.logs import (
    evaluation_labels,
    iter_log_chunks,
    join_side_tables,
    load_side_tables,
    raw_inputs,
    read_table,
)
from features.spec import ConfigError, RankstageConfig
from features.statistics import join_statistics, statistics_tables


@dataclass
class ScoredLog:
    """N scored rows: list keys, logged order, corrected predictions (C,) per task, labels per task."""

    user: np.ndarray
    day: np.ndarray
    order: np.ndarray
    predictions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    model: dict
    request: np.ndarray | None = None  # list id from --list-column, if any
    truth: dict[str, np.ndarray] = field(default_factory=dict)  # planted truth columns (simulated logs), per row

    def subset(self, mask: np.ndarray) -> ScoredLog:
        return ScoredLog(self.user[mask], self.day[mask], self.order[mask],
                         {k: v[mask] for k, v in self.predictions.items()},
                         {k: v[mask] for k, v in self.labels.items()}, self.model,
                         None if self.request is None else self.request[mask],
                         {k: v[mask] for k, v in self.truth.items()})

    def days(self, days: list[int] | None) -> ScoredLog:
        return self if not days else self.subset(np.isin(self.day, days))

    def __len__(self) -> int:
        return len(self.user)


def score_log(model, log: str | Path | list | None = None, days: list[int] | None = None,
              order_column: str = "time_ms", chunk_mb: float = 8.0, verbose: bool = True,
              list_column: str | None = None, truth_columns: tuple[str, ...] = ()) -> ScoredLog:
    """Stream ``log`` (a file or a log spec: ``features.logfiles``; default: the model's own config log) through
    ``model``; keep rows of ``days`` (all if None).

    ``model`` is a loaded exported version (``ranking.servable.load_servable``; anything with ``signature(name)``,
    ``metadata``, ``config`` and ``version_dir``), called through its serving signature as serving calls it.
    ``list_column`` keeps a request id per row (``--group request``); ``truth_columns`` keeps planted-truth columns
    (simulator logs) to be summed over the top K like watch time."""
    fn = model.signature(model.metadata.get("signature", "serving_default"))
    meta, config = {**model.metadata, "path": str(model.version_dir)}, model.config
    log = log or config.data.log
    sides = load_side_tables(config.data)
    d = config.data
    # statistics and the same-day history lists need the whole log's history, so they are computed once before
    # streaming; the lists are (N,) in file order, cut per chunk by row position
    whole = join_side_tables(read_table(log), sides) if d.statistics or d.history else None
    stat_tables = statistics_tables(whole, d) if d.statistics else None
    lists = history_lists(whole, d) if d.history else {}
    del whole
    keep = {"user": [], "day": [], "order": [], "request": []}
    truth: dict[str, list] = {c: [] for c in truth_columns}
    preds: dict[str, list] = {t.name: [] for t in config.tasks}
    labels: dict[str, list] = {t.name: [] for t in config.tasks}
    t0, seen, offset = time.perf_counter(), 0, 0
    for chunk in iter_log_chunks(log, chunk_mb):
        n_chunk = len(chunk)
        chunk = chunk.reset_index(drop=True)
        lists_here = {k: v[seen:seen + n_chunk] for k, v in lists.items() if k not in chunk.columns}
        chunk = chunk.assign(**lists_here) if lists_here else chunk  # a list the log recorded is kept as logged
        if days:
            chunk = chunk[np.isin(chunk[d.time_column].to_numpy(), days)].reset_index(drop=True)
        seen += n_chunk
        if len(chunk):
            chunk = join_side_tables(chunk, sides)
            if stat_tables is not None:
                chunk = join_statistics(chunk, stat_tables, d)
            _score_chunk(fn, config, chunk, meta["sampling"], preds, labels)
            keep["user"].append(chunk[d.user_column].to_numpy())
            keep["day"].append(chunk[d.time_column].to_numpy())
            order = chunk[order_column].to_numpy() if order_column in chunk.columns \
                else offset + np.arange(len(chunk))  # no time column: file order is the logged order
            keep["order"].append(order)
            for col in [list_column, *truth_columns] if list_column else truth_columns:
                if col not in chunk.columns:
                    raise ConfigError(f"column {col!r} not in log {log} (has {list(chunk.columns)})")
            if list_column:
                keep["request"].append(chunk[list_column].to_numpy())
            for col in truth_columns:
                truth[col].append(chunk[col].to_numpy(dtype=np.float64))
        offset += n_chunk
        if verbose:
            print(f"\r  scored {sum(map(len, keep['user'])):,} of {seen:,} rows read "
                  f"({time.perf_counter() - t0:.1f} s)", end="", flush=True)
    if verbose:
        print()
    if not keep["user"]:
        raise ConfigError(f"--day {days}: no rows of {log} on these days")
    cat = np.concatenate
    return ScoredLog(cat(keep["user"]), cat(keep["day"]), cat(keep["order"]),
                     {k: cat(v) for k, v in preds.items()}, {k: cat(v) for k, v in labels.items()},
                     {"name": meta["model_name"], "version": meta["version"], "path": meta["path"],
                      "training_window": meta.get("training_window"), "tasks": list(preds),
                      "log": [str(x) for x in log] if isinstance(log, list) else str(log),
                      "task_types": {t.name: t.type for t in config.tasks}},
                     cat(keep["request"]) if list_column else None, {k: cat(v) for k, v in truth.items()})


def padded_rows(n: int, steps: int = 8) -> int:
    """The row count a batch of ``n`` rows is padded to: the next of ``steps`` (a power of two) evenly spaced sizes
    between two powers of two (at most ``n / steps`` extra rows), so a signature sees a bounded set of batch shapes
    whatever the sizes asked for. TensorFlow's oneDNN kernels cache their primitives per input shape, and a long
    replay that called the model with a new row count every time grew by those caches (~0.7 MB a shape)."""
    unit = 1 << max(0, (n - 1).bit_length() - 1 - (steps - 1).bit_length())
    return -(-n // unit) * unit


def pad_rows(v: np.ndarray, rows: int) -> np.ndarray:
    """``v`` (n, ...) with its last row repeated up to ``rows`` rows."""
    return v if len(v) == rows else np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)])


def corrected_predictions(fn, inputs: dict[str, np.ndarray], sampling: dict, tasks: list[str],
                          max_batch: int = 65536) -> dict[str, np.ndarray]:
    """(C,) raw inputs per feature -> (C,) float32 corrected predictions per task: ``fn`` (a serving signature)
    called on slices of at most ``max_batch`` rows, each padded to ``padded_rows`` rows (the padding's outputs are
    dropped), outputs through ``correct_outputs``. What a scored row keeps."""
    import tensorflow as tf

    n = len(next(iter(inputs.values())))
    parts: dict[str, list] = {t: [] for t in tasks}
    for start in range(0, n, max_batch):
        rows = min(max_batch, n - start)
        size = padded_rows(rows)
        tensors = {k: tf.constant(pad_rows(v[start:start + rows], size)) for k, v in inputs.items()}
        out = correct_outputs({k: np.asarray(v)[:rows] for k, v in fn(**tensors).items()}, sampling)
        for task in tasks:
            parts[task].append(out[task].astype(np.float32))
    return {t: np.concatenate(p) if p else np.zeros(0, np.float32) for t, p in parts.items()}


def _score_chunk(fn, config: RankstageConfig, chunk: pd.DataFrame, sampling: dict, preds: dict, labels: dict,
                 max_batch: int = 65536) -> None:
    x = raw_inputs(chunk, config.serving_features)  # (C,) packed arrays per feature
    out = corrected_predictions(fn, x, sampling, list(preds), max_batch)
    for task in preds:
        preds[task].append(out[task])
    for task, y in evaluation_labels(chunk, config).items():
        labels[task].append(y.astype(np.float32))


# ---------------------------------------------------------------- a scored log as Parquet shards
# DIR/part-*.parquet with columns user, day, order, row (log position), [request], pred/<task>, label/<task>,
# [truth/<column>], and DIR/scored.json: {"model": ScoredLog.model of the version that scored them, ...}.

SCORED_META = "scored.json"
PRED, LABEL, TRUTH = "pred/", "label/", "truth/"


def scored_table(user, day, order, row, predictions: dict, labels: dict, request=None, truth: dict | None = None):
    """(N,) columns of scored rows -> one Arrow table in the scored-Parquet layout."""
    import pyarrow as pa

    cols = {"user": user, "day": day, "order": order, "row": row}
    if request is not None:
        cols["request"] = request
    cols |= {PRED + t: p for t, p in predictions.items()} | {LABEL + t: y for t, y in labels.items()}
    cols |= {TRUTH + c: v for c, v in (truth or {}).items()}
    return pa.table({k: pa.array(np.asarray(v)) for k, v in cols.items()})


def read_scored_meta(path: str | Path) -> dict:
    meta = Path(path) / SCORED_META
    if not meta.exists():
        raise ConfigError(f"--scored {path}: no {SCORED_META} (expected the output of rankstage replay --scored-out)")
    return json.loads(meta.read_text())


def read_scored(path: str | Path, days: list[int] | None = None, batch_rows: int = 65536) -> ScoredLog:
    """The scored rows of ``days`` (all if None) of a scored-Parquet directory as a ``ScoredLog`` in log order
    (by ``row``), streamed in record batches (only the kept columns are held)."""
    import pyarrow.dataset as ds

    model = read_scored_meta(path)["model"]
    tasks = model["tasks"]
    files = sorted(str(p) for p in Path(path).glob("part-*.parquet"))
    if not files:
        raise ConfigError(f"--scored {path}: no part-*.parquet shards")
    data = ds.dataset(files, format="parquet")
    names = data.schema.names
    truth = [n.removeprefix(TRUTH) for n in names if n.startswith(TRUTH)]
    wanted = ["user", "day", "order", "row", *(["request"] if "request" in names else []),
              *(PRED + t for t in tasks), *(LABEL + t for t in tasks), *(TRUTH + c for c in truth)]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ConfigError(f"--scored {path}: columns {missing} missing (has {names})")
    parts: dict[str, list] = {c: [] for c in wanted}
    flt = ds.field("day").isin(list(days)) if days else None
    for batch in data.to_batches(columns=wanted, filter=flt, batch_size=batch_rows):
        for c in wanted:
            parts[c].append(batch.column(c).to_numpy(zero_copy_only=False))
    cols = {c: np.concatenate(v) if v else np.zeros(0) for c, v in parts.items()}
    if not len(cols["row"]):
        raise ConfigError(f"--day {days}: no scored rows of {path} on these days")
    order = np.argsort(cols["row"], kind="stable")
    cols = {c: v[order] for c, v in cols.items()}
    return ScoredLog(cols["user"], cols["day"], cols["order"], {t: cols[PRED + t] for t in tasks},
                     {t: cols[LABEL + t] for t in tasks}, model, cols.get("request"),
                     {c: cols[TRUTH + c].astype(np.float64) for c in truth})
