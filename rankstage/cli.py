"""`rankstage` command line: train, export, compare, serve, rank, ...

Flags map onto config fields here and nowhere else."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_train(args: argparse.Namespace) -> None:
    from features.spec import load_config
    from ranking.train import train

    config = load_config(args.config, args.set, args.tasks)
    train(config, args.out, log=args.data, refit=args.refit)


def cmd_statistics(args: argparse.Namespace) -> None:
    from features.spec import load_config
    from ranking.train import write_statistics_snapshot

    config = load_config(args.config, args.set, None)
    if config.data.statistics is None:
        raise SystemExit(f"--config {args.config}: no data.statistics section")
    for path in write_statistics_snapshot(config, args.data, replace_newer=args.replace_newer):
        print(f"wrote {path}")


def cmd_export(args: argparse.Namespace) -> None:
    from ranking.export import export_run

    export_run(args.run, args.model_base_path, version=args.version, log=args.data)


def cmd_compare(args: argparse.Namespace) -> None:
    from features.spec import load_config
    from ranking.compare import compare

    config = load_config(args.config, args.set, None)
    compare(config, args.out, log=args.data, single_task=not args.no_single_task, gbdt=not args.no_gbdt,
            ple=not args.no_ple)


def cmd_compare_runs(args: argparse.Namespace) -> None:
    from ranking.compare import compare_runs

    runs = dict(r.split("=", 1) if "=" in r else (Path(r).name, r) for r in args.runs)
    print(compare_runs({name: Path(path) for name, path in runs.items()}, args.out))


def cmd_gbdt(args: argparse.Namespace) -> None:
    from features.spec import load_config
    from ranking.baselines.gbdt import run_gbdt
    from ranking.judging import format_metrics

    config = load_config(args.config, args.set, args.tasks)
    print(format_metrics(run_gbdt(config, args.out, log=args.data, num_trees=args.trees)))


def _config_args(p: argparse.ArgumentParser) -> None:
    """--config, --data and --set, shared by the commands that read a training config."""
    p.add_argument("--config", required=True, help="feature/model/training spec (YAML)")
    p.add_argument("--data", help="impression log: a CSV/Parquet file, a day-partitioned directory or a glob; "
                                   "default: data.log of the config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set model.num_experts=0 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankstage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the multitask ranker on a log; writes a run directory")
    _config_args(p)
    p.add_argument("--out", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--refit", action="store_true",
                   help="after early stopping, retrain on the whole window (validation included) for the chosen "
                        "number of epochs and keep that model (metrics stay those of the non-refit run)")
    p.add_argument("--tasks", nargs="+", help="train only these tasks (e.g. single-task baselines)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("statistics", help="write the newest statistics snapshot (data.statistics.path) for serving")
    _config_args(p)
    p.add_argument("--replace-newer", action="store_true",
                   help="write even where the snapshot there is newer (a deliberate rollback); by default it is kept")
    p.set_defaults(func=cmd_statistics)

    p = sub.add_parser("export", help="export a run as a versioned SavedModel for TF Serving")
    p.add_argument("--run", required=True)
    p.add_argument("--model-base-path", required=True)
    p.add_argument("--version", type=int, help="integer version (default: next free)")
    p.add_argument("--data", help="log to draw warmup requests from (default: the run's config)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="MMoE vs shared-bottom vs PLE vs single-task models vs LightGBM on one split")
    _config_args(p)
    p.add_argument("--out", required=True, help="report directory (compare.md, compare.json, runs/)")
    p.add_argument("--no-single-task", action="store_true")
    p.add_argument("--no-gbdt", action="store_true")
    p.add_argument("--no-ple", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("compare-runs", help="finished runs on the same validation rows, paired against the first")
    p.add_argument("runs", nargs="+", metavar="[NAME=]RUN_DIR", help="run directories; the first is the base")
    p.add_argument("--out", help="directory for compare.md and compare.json")
    p.set_defaults(func=cmd_compare_runs)

    p = sub.add_parser("gbdt-baseline", help="LightGBM baseline, one model per task, same split and metrics")
    _config_args(p)
    p.add_argument("--out", help="directory for metrics.json")
    p.add_argument("--trees", type=int, default=300)
    p.add_argument("--tasks", nargs="+")
    p.set_defaults(func=cmd_gbdt)

    if importlib.util.find_spec("features.commands") is not None:  # features build (the Beam pipeline)
        from features.commands import register as register_features

        register_features(sub)
    if importlib.util.find_spec("fusion.commands") is not None:  # replay / tune-fusion live with fusion/
        from fusion.commands import register

        register(sub)
    if importlib.util.find_spec("serving.commands") is not None:  # serve / rank / requests / model-server
        from serving.commands import register as register_serving

        register_serving(sub)
    if importlib.util.find_spec("simulation.commands") is not None:  # simulate / debias-report
        from simulation.commands import register as register_simulation

        register_simulation(sub)
    if importlib.util.find_spec("retrieval.commands") is not None:  # retrieval train / evaluate / export
        from retrieval.commands import register as register_retrieval

        register_retrieval(sub)
    from features.logs_commands import register as register_logs  # logs import / synth

    register_logs(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # only commands with pipeline_args (Beam options) take extra flags
    if extra and not hasattr(args, "pipeline_args"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.pipeline_args = extra
    from features.spec import ConfigError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"rankstage {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
