"""Training: time split, fit with early stopping, validation metrics, optional refit; the run directory written
(``ranking.runs``) and the newest statistics snapshot serving joins.

The parts: ``ranking.shards`` (tf.data input from example records: down-sampling, targets, label summaries),
``ranking.sampling`` (the numpy reference of down-sampling, targets, initial logits), ``ranking.fit`` and
``ranking.loop`` (one model trained: the custom distributed step, early stopping, checkpoints),
``ranking.judging`` (validation metrics), ``ranking.runs`` (run directory IO).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pandas as pd
import tensorflow as tf
import yaml

from features.examples import DAY
from features.logs import raw_inputs, read_log, time_split
from features.spec import ConfigError, RankstageConfig
from features.statistics import publish_snapshot, write_snapshot
from features.vocab import build_stats
from ranking import loop
from ranking.fit import DEFAULT_SHUFFLE_BUFFER, fit
from ranking.judging import format_metrics, judged_from_records, judged_predictions, judged_report, save_judged
from ranking.model import RankingModels
from ranking.recenter import recenter_biases
from ranking.runs import PREDICTIONS, save_run
from ranking.shards import read_layout, shard_source


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
FEATURES_CONFIG = "features.config.yaml"  # the config the run's features/ were built with (reused only for it)
CHECKPOINTS = "checkpoints"  # while training: tf.train checkpoints to resume from (removed when the run is written)


def pipeline_examples(config: RankstageConfig, out: Path, log, verbose: bool, days=None,
                      state_from: Path | None = None) -> Path | None:
    """The feature pipeline's shards of the run (``out/features``) when ``features.pipeline`` exists, else None
    (training then reads the log in memory). ``days``: a ``features.pipeline.DaySelect`` (a warm start's days);
    ``state_from``: the parent build's ``state/`` (``features.carry``) the new days are built from."""
    import features

    found = importlib.util.find_spec("features.pipeline")
    if found is None or Path(found.origin).parent != Path(features.__file__).parent:  # not another checkout's
        return None
    from features.pipeline import build_features

    mark = out / FEATURES_CONFIG
    text = yaml.safe_dump({"config": config.model_dump(), "log": None if log is None else str(log),
                           "days": None if days is None else repr(days),
                           "state_from": None if state_from is None else str(state_from)}, sort_keys=False)
    if (out / "features").exists() and not (mark.exists() and mark.read_text() == text):
        if verbose:  # derived from the log by another config (or not finished): built again, never reused
            print(f"{out / 'features'}: shards of another config; building them again", flush=True)
        shutil.rmtree(out / "features")
    if not (out / "features" / "manifest.json").exists():  # a restarted run resumes on the shards it wrote
        # the buckets by rows (``features.pipeline.default_buckets``: 4 on the bundled log; 32 took 54.5 s, 8 33.0 s)
        build_features(config, out / "features", log=log, verbose=verbose, days=days, state_from=state_from)
        mark.write_text(text)
    return out / "features"


def parent_state(parent, config: RankstageConfig, verbose: bool, select) -> Path | None:
    """The ``state/`` (``features.carry``) of the feature build a warm start's parent trained from, when it is as of
    the parent's last day and the days of ``select`` (a ``features.pipeline.DaySelect``) all follow it
    (``features.pipeline.days_after``): the new days are then built from it and their own rows only. None otherwise
    (a parent trained in memory or before builds wrote states, a build of other days, a replay buffer of days the
    parent saw): every earlier day is read."""
    from features import carry
    from features.pipeline import days_after

    built, seen = parent.run.artifacts.get("examples"), parent.days_seen
    if not built or not seen:
        reason = "it was trained without the feature pipeline"
    else:
        try:
            state = carry.load(Path(built) / carry.STATE, config)
            days_after(state, select, config.data.time_column)
        except ConfigError as err:
            reason = str(err)
        else:
            if str(state.last) == str(max(seen)):
                return state.root
            reason = f"its features' state is through {state.last}, the parent's last day is {max(seen)}"
    if verbose:
        print(f"warm start: the feature build reads every earlier day ({reason})", flush=True)
    return None


def _checkpoint_dir(config: RankstageConfig, out: Path, name: str) -> Path:
    """``out/<name>``; checkpoints left there by a run of another config are refused, not resumed."""
    path = out / name
    mark = path / "config.yaml"
    text = yaml.safe_dump(config.model_dump(), sort_keys=False)
    if loop.is_chief():  # the others restore what the chief wrote
        if mark.exists() and mark.read_text() != text:
            raise ConfigError(f"--out {out}: {name}/ holds checkpoints of another config; delete it to start over")
        path.mkdir(parents=True, exist_ok=True)
        mark.write_text(text)
    return path


def _day(value, kind: str):
    return int(value) if kind == "int" else str(value)


def _warm_days(parent, window: list, days: list | None, kind: str | None = None) -> list:
    """The days a warm start trains on: ``days`` (each must be in the window), default the window's days after
    every day the parent has seen; a ConfigError when there are none."""
    norm = (lambda d: _day(d, kind)) if kind else (lambda d: d)
    window = [norm(d) for d in window]
    if days:
        chosen = [norm(type(window[0])(d)) if window else d for d in days]
        missing = [d for d in chosen if d not in window]
        if missing:
            raise ConfigError(f"--days {missing}: not in the log's window {window}")
        return sorted(chosen)
    seen = parent.days_seen
    last = max(norm(d) for d in seen) if seen else None
    chosen = [d for d in window if last is None or d > last]
    if not chosen:
        raise ConfigError(f"--warm-start: no day in the window {window} after the parent's last day {last}; "
                          "add the new day to the log (or data.until) or give --days")
    return chosen


def train(config: RankstageConfig, out_dir: str | Path, log: str | Path | None = None, refit: bool = False,
          verbose: bool = True, publish_statistics: bool = False, examples: str | Path | None = None,
          strategy: tf.distribute.Strategy | None = None, checkpoint_every: int = 0,
          shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, warm_start: str | Path | None = None,
          days: list | None = None) -> Path:
    """Train, validate on the last period(s), optionally refit on the whole window; write the run directory.

    ``examples``: a feature pipeline's output directory (``ranking.shards``: shards per day, schema, stats, manifest)
    to train from; None: the pipeline's ``build_features`` writes ``out/features`` when ``features.pipeline`` exists,
    otherwise the log is read in memory (``read_log``). ``strategy`` (default: from ``TF_CONFIG``,
    ``ranking.loop.strategy_from_env``); only the chief writes the run directory. Checkpoints under
    ``out/checkpoints`` every ``checkpoint_every`` steps and each epoch; a restarted run resumes from them.

    The newest statistics snapshot goes into the run directory (``statistics/``), never over the one a running
    service reads, unless ``publish_statistics`` (then to ``data.statistics.path``, as ``rankstage statistics``).

    ``warm_start``: a parent run or exported version (``ranking.warm_start``): its weights and vocabularies, grown
    by the new values of ``days``, trained ``training.epochs`` epochs on ``days`` only (default: the window's days
    after every day the parent has seen, up to ``data.until``; the pipeline writes examples of those days only), with
    no validation day (judge the next day separately); the run records its lineage."""
    strategy = strategy or loop.strategy_from_env()  # MWMS must exist before TensorFlow's first op
    chief = loop.is_chief(strategy)
    out = Path(out_dir)
    if chief:
        out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parent = None
    if warm_start is not None:
        from ranking import warm_start as ws

        if refit:
            raise ConfigError("--warm-start with --refit: a warm start trains on its new days once; drop --refit")
        parent = ws.load_parent(warm_start)
        ws.check_spec(parent, config)
    if examples is None and loop.num_workers(strategy) == 1:
        select, state = None, None
        if parent is not None:  # examples of the new days only, from the parent build's state when it has one
            from features.pipeline import DaySelect

            col = config.data.time_column
            select = (DaySelect(col, values=tuple(days)) if days else
                      DaySelect(col, after=max(parent.days_seen) if parent.days_seen else None,
                                until=config.data.until))
            state = parent_state(parent, config, verbose, select)
        examples = pipeline_examples(config, out, log, verbose, select, state)
    if examples is None and loop.num_workers(strategy) > 1:
        raise ConfigError(f"--workers {loop.num_workers(strategy)}: several workers train from shards; give "
                          "--examples DIR (a feature pipeline's output)")
    opts = {"strategy": strategy, "checkpoint_every": checkpoint_every, "shuffle_buffer": shuffle_buffer}
    if examples is None:
        df = read_log(config.data, log)
        train_rows, val_rows = time_split(df, config)
        window = pd.concat([train_rows, val_rows], ignore_index=True)  # without rows after data.until
        stats = build_stats(raw_inputs(train_rows, config.features), config.features)
        val_periods = sorted(val_rows[config.data.time_column].unique().tolist())
        n_val = len(val_rows)
        window_stats = lambda: build_stats(raw_inputs(window, config.features), config.features)  # noqa: E731
        judged_of = lambda models, sampling: judged_predictions(config, models, val_rows, sampling)  # noqa: E731
        day_rows = lambda d: window[window[config.data.time_column] == d].reset_index(drop=True)  # noqa: E731
        last_days = sorted(train_rows[config.data.time_column].unique().tolist())
        if parent is not None:
            col = config.data.time_column
            days = _warm_days(parent, sorted(window[col].unique().tolist()), days)
            train_rows, val_rows = window[window[col].isin(days)].reset_index(drop=True), None
            stats = ws.grown_stats(parent.run.stats, build_stats(raw_inputs(train_rows, config.features),
                                                                 config.features))
    else:
        layout = read_layout(examples)
        kind = layout.kinds.get(DAY, "string")
        train_days = [_day(d, kind) for d in layout.manifest["train_days"]]
        val_periods = [_day(d, kind) for d in layout.manifest["validation_days"]]
        if parent is None:  # (a warm start's shards hold its new days only)
            train_rows, val_rows = shard_source(layout, train_days), shard_source(layout, val_periods)
            window = shard_source(layout, train_days + val_periods)
            stats = layout.stats("train")
        rows = layout.manifest.get("rows_per_day", layout.manifest.get("rows"))  # the pipeline's key; the fixture's
        per_day = {str(k): v for k, v in rows.items()} if isinstance(rows, dict) else {}
        n_val = sum(int(per_day.get(str(d), 0)) for d in val_periods)
        window_stats = lambda: layout.stats("window")  # noqa: E731
        judged_of = lambda models, sampling: judged_from_records(config, models, val_rows, sampling)  # noqa: E731
        day_rows = lambda d: shard_source(layout, [d])  # noqa: E731
        last_days = list(train_days)
        if parent is not None:
            written = [_day(d, kind) for d in layout.manifest.get("rows_per_day", {})]
            days = _warm_days(parent, [d for d in train_days + val_periods if not written or d in written], days,
                              kind)
            train_rows, val_rows = shard_source(layout, days), None
            stats = ws.grown_stats(parent.run.stats, window_stats())  # the written days': the new ones
    grew: dict = {}

    def recentre(models: RankingModels, art, day) -> None:
        """``training.recenter_biases``: the binary tasks' logit biases on ``day``'s rate (``ranking.recenter``)."""
        if not config.training.recenter_biases:
            return
        art.recentred = {"day": day, "shifts": recenter_biases(models, config, day_rows(day), art.sampling)}
        if verbose:
            shown = ", ".join(f"{k} {v:+.3f}" for k, v in art.recentred["shifts"].items())
            print(f"logit biases recentred on {config.data.time_column} {day}: {shown or 'none'}", flush=True)

    if parent is not None:
        val_periods, n_val = [], 0
        carried = ws.parent_optimizer(parent) if config.training.warm_start_optimizer else None

        def init(models: RankingModels, optimizer) -> frozenset[str] | None:
            grew.update(ws.transfer_weights(parent.run.models, models, config))
            if carried is not None:
                ws.restore_optimizer(optimizer, models, carried, config)
            return ws.dense_paths(models, config) if config.training.warm_start_update == "embeddings" else None

        opts["init"] = init
    if verbose and parent is not None:
        print(f"warm start from {parent.run_dir} (days seen {parent.days_seen}): training on "
              f"{config.data.time_column} {days} only, no validation day; Adam "
              f"{'continues from step ' + str(int(carried['iterations'])) if carried is not None else 'starts fresh'}"
              f"{'; embedding tables only' if config.training.warm_start_update == 'embeddings' else ''}",
              flush=True)
    elif verbose:
        print(f"training on {'shards of ' + str(examples) if examples else 'the log in memory'}; validation "
              f"{config.data.time_column} {val_periods}, {n_val} rows", flush=True)
    models, history, art = fit(config, train_rows, stats, config.training.epochs, val_rows, out / "tensorboard",
                               verbose, checkpoint_dir=_checkpoint_dir(config, out, CHECKPOINTS), **opts)
    art.validation_periods = val_periods
    art.rows["validation"] = n_val
    if parent is not None:
        blend = config.training.warm_start_blend
        if blend < 1 and config.training.warm_start_update == "all":
            n = ws.blend_dense(parent.run.models, models, config, blend)
            if verbose:
                print(f"dense weights blended: parent + {blend:g} x update ({n} variables)", flush=True)
        recentre(models, art, max(days))
        art.lineage = {**ws.lineage(parent, days), "grown": grew, "blend": blend}
        val_metrics = {}
        if verbose:
            shown = ", ".join(f"{k.split('/')[0]} {a} -> {b} rows" for k, (a, b) in grew.items())
            print(f"vocabularies grown: {shown or 'none'}", flush=True)
    elif chief:
        recentre(models, art, max(last_days))
        judged = judged_of(models, art.sampling)
        save_judged(judged, out / PREDICTIONS)
        val_metrics = judged_report(config, judged)
    if refit:
        if verbose:
            print(f"refit on the whole window for {art.best_epoch} epoch(s)", flush=True)
        stats = window_stats()
        best, rows = art.best_epoch, art.rows
        models, refit_history, art = fit(config, window, stats, best, None, out / "tensorboard_refit", verbose,
                                         checkpoint_dir=_checkpoint_dir(config, out, CHECKPOINTS + "_refit"),
                                         **opts)
        art.best_epoch, art.refit, art.validation_periods = best, True, val_periods
        art.rows = {**rows, "refit": art.rows["train"]}
        history["refit_loss"] = refit_history["loss"]
        if chief:
            recentre(models, art, max(last_days + list(val_periods)))
    if not chief:
        return out
    art.examples = str(Path(examples).resolve()) if examples is not None else None
    target = None if publish_statistics else out / STATISTICS
    built = sorted((Path(examples) / STATISTICS).glob("*.parquet")) if examples is not None else []
    if built and config.data.statistics is not None:  # the pipeline's snapshot: the log is not read again
        written = publish_snapshot({f.stem: pd.read_parquet(f) for f in built}, config.data, target)
    else:
        written = write_statistics_snapshot(config, log, path=target)
    if verbose and written:
        print(f"statistics snapshot written: {', '.join(map(str, written))}", flush=True)
    report = {"tasks": val_metrics, "validation_periods": art.validation_periods, "best_epoch": art.best_epoch,
              "refit": refit, "seconds": round(time.perf_counter() - t0, 1), "config": config.name,
              "num_experts": config.model.num_experts}
    save_run(out, config, models, stats, art.__dict__, history, report)
    for name in (CHECKPOINTS, CHECKPOINTS + "_refit"):
        loop.clear_checkpoints(out / name)
    if verbose:
        print(format_metrics(val_metrics), flush=True)
        print(f"run written to {out}", flush=True)
    return out
