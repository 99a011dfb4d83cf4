"""Offline replay: stream a log through the exported model, correct, calibrate, fuse, re-rank and measure.

Scoring is done once (``score_log``) into a compact ``ScoredLog`` (per row: list keys, logged order, corrected
predictions, labels); any number of fusion profiles are then evaluated on it (``evaluate``), which is what makes
tuning cheap. The log is read in chunks with pyarrow: raw feature columns live only for one chunk, so memory is
bounded by the chunk size plus ~100 bytes per row kept (side tables are read once: they are per user / per item).
The model is the exported SavedModel called through its ``serving_default`` signature, as serving calls it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from calibration.outputs import correct_outputs
from calibration.posthoc import calibrate, check_artifact
from features.history import history_lists
from features.logs import evaluation_labels, join_side_tables, load_side_tables, raw_inputs, read_table
from features.spec import ConfigError, RankstageConfig
from features.statistics import join_statistics, statistics_tables
from fusion.config import FusionConfig, FusionProfile, calibration_path, load_fusion
from fusion.lists import Lists, group_lists, list_metrics, paired_difference, summarise

GROUPINGS = ("user_day", "user_window", "request")  # request: rows sharing --list-column (e.g. simulator logs)
NDCG_TASKS = ("click", "like", "collect", "share", "long_view")
SUM_TASKS = ("watch_time", "completion")
CLICK_ONLY = FusionProfile(formula="weighted_sum", weights={"click": 1.0}, description="rank by corrected click")


# ---------------------------------------------------------------- reading the log in chunks


def iter_log_chunks(path: str | Path, chunk_mb: float = 8.0) -> Iterator[pd.DataFrame]:
    """Yield the log as pandas chunks of roughly ``chunk_mb`` MB (CSV blocks / Parquet record batches)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--logs: file not found: {path}")
    if path.suffix in (".parquet", ".pq"):
        pf = pq.ParquetFile(path)
        row_bytes = max(1, pf.metadata.serialized_size // max(1, pf.metadata.num_rows)) * 8
        for batch in pf.iter_batches(batch_size=max(1024, int(chunk_mb * 2**20 / row_bytes))):
            yield batch.to_pandas()
    elif path.suffix == ".csv" or path.name.endswith(".csv.gz"):
        reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=int(chunk_mb * 2**20)))
        for batch in reader:
            yield batch.to_pandas()
    else:
        raise ConfigError(f"--logs {path}: unknown format (expected .csv, .csv.gz or .parquet)")


# ---------------------------------------------------------------- scoring


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


def fusion_for_version(fusion_path: str | Path, model_base_path: str | Path, calibration: str | Path | None = None
                       ) -> tuple[Path, FusionConfig, dict | None]:
    """-> (version directory, fusion config, calibration artifact or None) for replaying that version: the config
    checked against its tasks and the artifact against its name, version and outputs (``check_artifact``, as
    serving checks it), before any scoring. Score ``version directory``, not the base path, so a version published
    meanwhile is not the one scored."""
    from ranking.servable import load_metadata, resolve_version

    version_dir = resolve_version(model_base_path)
    meta = load_metadata(version_dir)
    tasks = [o["task"] for o in meta["outputs"]]
    config, cal = load_fusion(fusion_path, tasks, calibration)
    if cal is not None:
        check_artifact(cal, meta["model_name"], meta["version"], tasks, calibration or calibration_path(config,
                                                                                                     fusion_path))
    return version_dir, config, cal


def load_model(model_base_path: str | Path):
    """-> (serving_default function, metadata, config) of an exported version, through ``ranking.servable``."""
    from ranking.servable import load_servable

    sv = load_servable(model_base_path)
    meta = {**sv.metadata, "path": str(sv.version_dir), "_servable": sv}  # keeps the SavedModel alive
    return sv.signature(sv.metadata.get("signature", "serving_default")), meta, sv.config


def score_log(model_base_path: str | Path, log: str | Path | None = None, days: list[int] | None = None,
              order_column: str = "time_ms", chunk_mb: float = 8.0, verbose: bool = True,
              list_column: str | None = None, truth_columns: tuple[str, ...] = ()) -> ScoredLog:
    """Stream ``log`` (default: the model's own config log) through the model; keep rows of ``days`` (all if None).

    ``list_column`` keeps a request id per row (``--group request``); ``truth_columns`` keeps planted-truth columns
    (simulator logs) to be summed over the top K like watch time."""
    fn, meta, config = load_model(model_base_path)
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
                      "training_window": meta.get("training_window"), "log": str(log), "tasks": list(preds),
                      "task_types": {t.name: t.type for t in config.tasks}},
                     cat(keep["request"]) if list_column else None, {k: cat(v) for k, v in truth.items()})


def _score_chunk(fn, config: RankstageConfig, chunk: pd.DataFrame, sampling: dict, preds: dict, labels: dict,
                 max_batch: int = 65536) -> None:
    import tensorflow as tf

    x = raw_inputs(chunk, config.serving_features)  # (C,) packed arrays per feature
    for start in range(0, len(chunk), max_batch):
        tensors = {k: tf.constant(v[start:start + max_batch]) for k, v in x.items()}
        out = correct_outputs({k: np.asarray(v) for k, v in fn(**tensors).items()}, sampling)
        for task in preds:
            preds[task].append(out[task].astype(np.float32))
    for task, y in evaluation_labels(chunk, config).items():
        labels[task].append(y.astype(np.float32))


# ---------------------------------------------------------------- evaluation


def make_lists(scored: ScoredLog, group: str, min_list: int) -> Lists:
    if group not in GROUPINGS:
        raise ConfigError(f"--group: {group!r} is not one of {GROUPINGS}")
    if group == "request":
        if scored.request is None:
            raise ConfigError("--group request needs --list-column (e.g. request_id)")
        return group_lists([scored.request], scored.order, min_list)
    keys = [scored.user, scored.day] if group == "user_day" else [scored.user]
    return group_lists(keys, scored.order, min_list)


def list_counts(lists: Lists, labels: dict[str, np.ndarray]) -> dict:
    out = {"lists": int(len(lists.lengths)), "mean_length": float(np.mean(lists.lengths)) if len(lists.lengths)
           else 0.0, "rows": int(lists.lengths.sum())}
    for task in NDCG_TASKS:
        if task in labels:
            out[f"lists_with_{task}"] = int((lists.gather(labels[task]).sum(axis=1) > 0).sum())
    if "click" in labels:
        clicks = lists.gather(labels["click"]).sum(axis=1)
        out["lists_with_mixed_clicks"] = int(((clicks > 0) & (clicks < lists.lengths)).sum())
    return out


def per_list_metrics(scored: ScoredLog, lists: Lists, profile: FusionProfile | None, k: int,
                     calibration: dict | None = None) -> dict[str, np.ndarray]:
    """(L,) per metric for ranking the lists by ``profile`` (None = logged order)."""
    score = None if profile is None else profile.score(calibrate(scored.predictions, calibration))
    ndcg = [t for t in NDCG_TASKS if t in scored.labels]
    sums = [t for t in SUM_TASKS if t in scored.labels] + list(scored.truth)
    return list_metrics(lists, score, {**scored.labels, **scored.truth}, k, ndcg, sums)


def evaluate(scored: ScoredLog, profiles: dict[str, FusionProfile | None], group: str = "user_day",
             min_list: int = 5, k: int = 5, calibration: dict | None = None, reps: int = 1000,
             reference: str | None = "click_only") -> dict:
    """Metrics with bootstrap intervals over lists for each named ranking, and paired differences vs ``reference``."""
    lists = make_lists(scored, group, min_list)
    if not len(lists.lengths):
        raise ConfigError(f"--min-list {min_list}: no {group} list is that long")
    per = {name: per_list_metrics(scored, lists, prof, k, calibration) for name, prof in profiles.items()}
    result = {"counts": list_counts(lists, scored.labels), "group": group, "min_list": min_list, "k": k,
              "metrics": {name: summarise(m, reps) for name, m in per.items()}, "differences": {}}
    if reference in per:
        result["reference"] = reference
        result["differences"] = {name: paired_difference(m, per[reference], reps) for name, m in per.items()
                                 if name != reference}
    return result


def _fmt(m: dict, digits: int) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_report(result: dict, title: str = "replay") -> str:
    c = result["counts"]
    lines = [f"## {title}", "",
             f"{c['lists']} {result['group']} lists of >= {result['min_list']} impressions ({c['rows']} rows, "
             f"mean length {c['mean_length']:.1f}); lists holding a " +
             ", ".join(f"{t}: {c[f'lists_with_{t}']}" for t in NDCG_TASKS if f"lists_with_{t}" in c) +
             (f"; mixed clicks: {c['lists_with_mixed_clicks']}" if "lists_with_mixed_clicks" in c else "") + ".",
             "NDCG@K is averaged over lists holding at least one positive of that behaviour; top@K sums the logged "
             "watch seconds / completion ratios of the first K. Brackets: bootstrap 95% interval over lists.", ""]
    names = list(result["metrics"])
    metrics = list(result["metrics"][names[0]])
    lines.append("| ranking | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for n in names:
        row = result["metrics"][n]
        lines.append(f"| {n} | " + " | ".join(_fmt(row[m], 1 if "top@" in m and "watch" in m else 3)
                                                for m in metrics) + " |")
    if result["differences"]:
        ref = result["reference"]
        lines += ["", f"Paired difference vs {ref} (per list, same lists; * = interval excludes 0):", "",
                  "| ranking | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
        for n, row in result["differences"].items():
            cells = []
            for m in metrics:
                d = row[m]
                sig = "*" if d["ci95"][0] > 0 or d["ci95"][1] < 0 else ""
                cells.append(_fmt(d, 1 if "top@" in m and "watch" in m else 3) + sig)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
