"""Training: time split, fit with early stopping, validation metrics, optional refit; the run directory written
(``ranking.runs``) and the newest statistics snapshot serving joins.

The parts: ``ranking.sampling`` (down-sampling, targets, initial logits), ``ranking.datasets`` (tf.data input),
``ranking.fit`` (one model trained), ``ranking.judging`` (validation metrics), ``ranking.runs`` (run directory IO).
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from features.logs import raw_inputs, read_log, time_split
from features.spec import RankstageConfig
from features.statistics import write_snapshot
from features.vocab import build_stats
from ranking.fit import fit
from ranking.judging import format_metrics, judged_predictions, judged_report, save_judged
from ranking.runs import PREDICTIONS, save_run


def write_statistics_snapshot(config: RankstageConfig, log: str | Path | None = None,
                              replace_newer: bool = False, path: str | Path | None = None) -> list[Path]:
    """Write ``data.statistics``' newest snapshot (as of the day after the last log day up to ``data.until``) to
    ``path`` (default ``data.statistics.path``, the one serving reads: ``rankstage statistics``); the written files
    (none without statistics). A newer snapshot already there is kept unless ``replace_newer``
    (``features.statistics.write_snapshot``, which publishes each table by rename)."""
    if config.data.statistics is None:
        return []
    window = read_log(config.data, log, statistics=False)
    if config.data.until is not None:
        window = window[window[config.data.time_column] <= config.data.until]
    return write_snapshot(window, config.data, path=path, replace_newer=replace_newer)


STATISTICS = "statistics"  # the run's statistics snapshot, <key>.parquet (not the one serving reads)


def train(config: RankstageConfig, out_dir: str | Path, log: str | Path | None = None, refit: bool = False,
          verbose: bool = True, publish_statistics: bool = False) -> Path:
    """Train, validate on the last period(s), optionally refit on the whole window; write the run directory.

    The newest statistics snapshot goes into the run directory (``statistics/``), never over the one a running
    service reads, unless ``publish_statistics`` (then to ``data.statistics.path``, as ``rankstage statistics``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    df = read_log(config.data, log)
    train_df, val_df = time_split(df, config)
    df = pd.concat([train_df, val_df], ignore_index=True)  # the window: without rows after data.until
    stats = build_stats(raw_inputs(train_df, config.features), config.features)
    if verbose:
        print(f"{len(train_df)} training rows, {len(val_df)} validation rows "
              f"({config.data.time_column} >= {val_df[config.data.time_column].min()})", flush=True)
    models, history, art = fit(config, train_df, stats, config.training.epochs, val_df, out / "tensorboard",
                               verbose)
    art.validation_periods = sorted(val_df[config.data.time_column].unique().tolist())
    judged = judged_predictions(config, models, val_df, art.sampling)
    save_judged(judged, out / PREDICTIONS)
    val_metrics = judged_report(config, judged)
    art.rows["validation"] = len(val_df)
    if refit:
        if verbose:
            print(f"refit on the whole window for {art.best_epoch} epoch(s)", flush=True)
        stats = build_stats(raw_inputs(df, config.features), config.features)
        best, val_periods, rows = art.best_epoch, art.validation_periods, art.rows
        models, refit_history, art = fit(config, df, stats, best, None, out / "tensorboard_refit", verbose)
        art.best_epoch, art.refit, art.validation_periods = best, True, val_periods
        art.rows = {**rows, "refit": art.rows["train"]}
        history["refit_loss"] = refit_history["loss"]
    written = write_statistics_snapshot(config, log, path=None if publish_statistics else out / STATISTICS)
    if verbose and written:
        print(f"statistics snapshot written: {', '.join(map(str, written))}", flush=True)
    report = {"tasks": val_metrics, "validation_periods": art.validation_periods, "best_epoch": art.best_epoch,
              "refit": refit, "seconds": round(time.perf_counter() - t0, 1), "config": config.name,
              "num_experts": config.model.num_experts}
    save_run(out, config, models, stats, art.__dict__, history, report)
    if verbose:
        print(format_metrics(val_metrics), flush=True)
        print(f"run written to {out}", flush=True)
    return out
