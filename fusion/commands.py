"""`rankstage replay`, `rankstage tune-fusion`, `rankstage calibrate`: flags map onto function arguments here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from features.spec import ConfigError

RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner", "PrismRunner")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-base-path", required=True, help="exported model base path (newest version) or version dir")
    p.add_argument("--logs", help="impression log, CSV/Parquet (default: the model's config log)")
    p.add_argument("--chunk-mb", type=float, default=8.0, help="size of a streamed log chunk")
    p.add_argument("--order-column", default="time_ms", help="logged order within a list (default: time_ms)")


def _lists(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", default="user_day", choices=["user_day", "user_window", "request"])
    p.add_argument("--min-list", type=int, default=5, help="drop lists shorter than this")
    p.add_argument("--k", type=int, default=5, help="cut-off K of NDCG@K and top-K sums")
    p.add_argument("--reps", type=int, default=1000, help="bootstrap resamples over lists")
    p.add_argument("--list-column", help="request id column for --group request (e.g. request_id)")
    p.add_argument("--truth-column", action="append", default=[],
                   help="planted-truth column summed over the top K (simulator logs, e.g. true_attraction)")


def beam_pipeline_args(args: argparse.Namespace) -> list[str]:
    """The Beam pipeline options of the command line: --runner, the DirectRunner's worker flags, --beam-option."""
    flags = [f"--runner={args.runner or 'DirectRunner'}"]
    if args.direct_num_workers is not None:
        flags.append(f"--direct_num_workers={args.direct_num_workers}")
    if args.direct_running_mode:
        flags.append(f"--direct_running_mode={args.direct_running_mode}")
    for opt in args.beam_option:
        if "=" not in opt:
            raise ConfigError(f"--beam-option {opt!r}: expected NAME=VALUE (e.g. flink_master=localhost:8081)")
        flags.append(f"--{opt.removeprefix('--')}")
    return flags


def cmd_beam_replay(args: argparse.Namespace) -> None:
    import tempfile

    from fusion.beam_replay import beam_replay, write_text
    from fusion.replay import format_report, fusion_for_version, replay_profiles

    if not args.examples:
        raise ConfigError("--runner: the Beam replay reads example shards; give --examples DIR")
    if args.logs:
        raise ConfigError("--logs and --examples: give one (--examples runs the Beam replay on example shards)")
    version_dir, config, cal = fusion_for_version(args.fusion, args.model_base_path, args.calibration)
    out = args.out or tempfile.mkdtemp(prefix="replay-")
    result = beam_replay(version_dir, args.examples, replay_profiles(config, args.profile), out, cal, args.day,
                         args.group, args.min_list, args.k, args.reps, "click_only", args.list_column,
                         tuple(args.truth_column), args.list_buckets, args.batch_rows, args.scored_out,
                         beam_pipeline_args(args), extra={"fusion_version": config.version}, passes=args.passes,
                         rows_per_pass=args.rows_per_pass, read_mb=args.read_mb, read_format=args.read_format)
    model = result["model"]
    title = (f"replay: model {model['name']} v{model['version']} ({model['path']}), fusion "
             f"{config.version}{', calibration ' + cal['version'] if cal else ''}, days {result['days']}")
    report = format_report(result, title)
    print(report)
    write_text(report, f"{out.rstrip('/')}/replay.md")
    print(f"wrote {out}/replay.md and replay.json" + (f"; scored lists in {args.scored_out}" if args.scored_out
                                                      else ""))


def cmd_replay(args: argparse.Namespace) -> None:
    if args.examples or args.runner:
        cmd_beam_replay(args)
        return
    from evaluation.scoring import score_log
    from fusion.replay import evaluate, format_report, fusion_for_version, replay_profiles
    from ranking.servable import load_servable

    version_dir, config, cal = fusion_for_version(args.fusion, args.model_base_path, args.calibration)
    scored = score_log(load_servable(version_dir), args.logs, days=args.day, order_column=args.order_column,
                       chunk_mb=args.chunk_mb, list_column=args.list_column, truth_columns=tuple(args.truth_column))
    profiles = replay_profiles(config, args.profile)
    result = evaluate(scored, profiles, args.group, args.min_list, args.k, cal, args.reps)
    days = sorted(set(scored.day.tolist()))
    title = (f"replay: model {scored.model['name']} v{scored.model['version']} ({scored.model['path']}), fusion "
             f"{config.version}{', calibration ' + cal['version'] if cal else ''}, days {days}")
    report = format_report(result, title)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "replay.md").write_text(report)
        (out / "replay.json").write_text(json.dumps({"model": scored.model, "fusion_version": config.version,
                                                     "days": days, **result}, indent=1, default=float))
        print(f"wrote {out / 'replay.md'} and replay.json")


def cmd_tune(args: argparse.Namespace) -> None:
    from fusion.tune import tune_fusion

    tune_fusion(model_base_path=args.model_base_path, log=args.logs, fusion_path=args.fusion,
                hand_profile=args.hand_profile, tune_days=args.tune_day, eval_day=args.eval_day, out=args.out,
                trials=args.trials, seed=args.seed, group=args.group, min_list=args.min_list, k=args.k,
                tolerance=args.click_tolerance, formula=args.formula, calibration=args.calibration,
                reps=args.reps, order_column=args.order_column, chunk_mb=args.chunk_mb,
                list_column=args.list_column, truth_columns=tuple(args.truth_column), scored_dir=args.scored)


def cmd_calibrate(args: argparse.Namespace) -> None:
    from fusion.calibrate import calibrate_command, calibrate_from_run

    if args.from_run:
        if args.fit_day:
            raise ConfigError("--fit-day and --from-run: give one (--from-run fits on the run's validation days)")
        calibrate_from_run(args.from_run, args.model_base_path, args.logs, args.eval_day, args.method, args.tasks,
                           args.out, args.chunk_mb, scored_dir=args.scored)
        return
    if not args.fit_day:
        raise ConfigError("--fit-day: required unless --from-run is given")
    calibrate_command(args.model_base_path, args.logs, fit_days=args.fit_day, eval_days=args.eval_day,
                      method=args.method, tasks=args.tasks, out=args.out, chunk_mb=args.chunk_mb,
                      scored_dir=args.scored)


def register(sub) -> None:
    p = sub.add_parser("replay", help="replay logged lists through the exported model, fuse, re-rank, measure")
    _common(p)
    _lists(p)
    p.add_argument("--fusion", required=True, help="fusion config (YAML)")
    p.add_argument("--profile", action="append", help="profile(s) to evaluate (default: all)")
    p.add_argument("--day", type=int, action="append", help="only these values of the time column (repeatable)")
    p.add_argument("--calibration", help="post-hoc calibration artifact (default: the fusion config's)")
    p.add_argument("--out", help="directory for replay.md / replay.json")
    beam = p.add_argument_group("Beam replay (on example shards; without --runner/--examples: in process on --logs)")
    beam.add_argument("--examples", help="example shards DIR (DIR/examples/date=<day>/part-*.tfrecord.gz or "
                      ".parquet, DIR/schema.json); --day selects day directories")
    beam.add_argument("--read-format", default="auto", choices=["auto", "tfrecord", "parquet"],
                      help="which shards to read (default auto: the Parquet shards when the feature pipeline wrote "
                      "them, --formats tfrecord,parquet; same result, ~9x less CPU to decode)")
    beam.add_argument("--runner", choices=RUNNERS, help="Beam runner (default with --examples: DirectRunner)")
    beam.add_argument("--direct_num_workers", type=int, help="DirectRunner: worker count")
    beam.add_argument("--direct_running_mode", choices=["in_memory", "multi_threading", "multi_processing"])
    beam.add_argument("--beam-option", action="append", default=[], metavar="NAME=VALUE",
                      help="any other Beam pipeline option, e.g. flink_master=localhost:8081 (repeatable)")
    beam.add_argument("--list-buckets", type=int, default=64, help="buckets of lists (the unit grouped and measured)")
    beam.add_argument("--batch-rows", type=int, default=65536, help="records parsed per batch")
    beam.add_argument("--read-mb", type=float, default=64.0, help="MB of shards one reader element reads, counted "
                      "in TFRecord bytes for Parquet too (the read's unit of parallelism; a tf.data pipeline costs "
                      "~0.15 s to build)")
    beam.add_argument("--passes", type=int, help="pipelines over disjoint lists, each holding only its rows in the "
                      "runner's shuffle (default: one per --rows-per-pass rows of the shards' manifest)")
    beam.add_argument("--rows-per-pass", type=int, default=1_000_000, help="rows per pass without --passes")
    beam.add_argument("--scored-out", help="also write the scored rows as Parquet here (tune-fusion/calibrate "
                      "--scored read them)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("tune-fusion", help="search fusion weights with Optuna on earlier days, judge on a later day")
    _common(p)
    _lists(p)
    p.add_argument("--fusion", required=True, help="fusion config holding the hand-set profile")
    p.add_argument("--hand-profile", default=None, help="hand-set profile to compare (default: the config's default)")
    p.add_argument("--tune-day", type=int, action="append", required=True, help="day(s) to tune on (repeatable)")
    p.add_argument("--eval-day", type=int, required=True, help="held-out day to judge on")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formula", default="weighted_product", choices=["weighted_product", "click_multiplier",
                                                                     "weighted_sum"])
    p.add_argument("--click-tolerance", type=float, default=0.01,
                   help="constraint: click NDCG@K >= (1 - tolerance) x click-only's, on the tuning days")
    p.add_argument("--calibration", help="post-hoc calibration artifact (default: the fusion config's)")
    p.add_argument("--out", required=True, help="directory: fusion_tuned.yaml, tune.md, tradeoff.png, trials.csv")
    p.add_argument("--scored", help="scored Parquet of rankstage replay --scored-out (no rescoring; must be this "
                   "version's)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("calibrate", help="fit post-hoc calibration per task on held-out days; diagnostics and plots")
    _common(p)
    p.add_argument("--fit-day", type=int, action="append", help="day(s) to fit on (repeatable)")
    p.add_argument("--from-run", help="fit on this training run's validation days as the version exported from it "
                   "predicts them (refused for a --refit run, which trained on them); --eval-day judges other days")
    p.add_argument("--eval-day", type=int, action="append", help="day(s) to judge on (default: the fit days)")
    p.add_argument("--method", default="platt", choices=["isotonic", "platt"])
    p.add_argument("--tasks", nargs="+", help="tasks to calibrate (default: the binary tasks); watch_time is always "
                   "fitted isotonic, in seconds")
    p.add_argument("--out", required=True, help="directory: calibration.json, calibration.md, reliability_*.png")
    p.add_argument("--scored", help="scored Parquet of rankstage replay --scored-out (no rescoring; must be this "
                   "version's)")
    p.set_defaults(func=cmd_calibrate)
