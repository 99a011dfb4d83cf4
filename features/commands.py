"""`rankstage features build`: the feature pipeline (``features.pipeline``); flags map onto its arguments here, and
every flag this parser does not know is a Beam pipeline option (``--direct_num_workers 2`` ...)."""

from __future__ import annotations

import argparse

RUNNERS = ("DirectRunner", "FlinkRunner", "SparkRunner", "DataflowRunner")


def cmd_features_build(args: argparse.Namespace) -> None:
    from features.pipeline import build_features
    from features.spec import load_config

    config = load_config(args.config, args.set, None)
    manifest = build_features(config, args.out, runner=args.runner, pipeline_args=args.pipeline_args,
                              log=args.data, buckets=args.buckets, passes=args.passes,
                              rows_per_pass=args.rows_per_pass,
                              formats=tuple(f.strip() for f in args.formats.split(",") if f.strip()),
                              state_from=args.state_from)
    print(f"wrote {args.out}: {manifest['rows']} rows, days {list(manifest['rows_per_day'])}, "
          f"{manifest['seconds']} s")


def register(sub) -> None:
    p = sub.add_parser("features", help="the feature pipeline (Apache Beam)")
    features = p.add_subparsers(dest="features_command", required=True)
    b = features.add_parser("build", help="examples (TFRecord shards per day), feature stats and statistics snapshot "
                            "of a log; other flags are Beam pipeline options")
    b.add_argument("--config", required=True, help="feature/model/training spec (YAML)")
    b.add_argument("--data", help="impression log: file, directory, glob (default: data.log of the config)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    b.add_argument("--out", required=True, help="output directory (must not exist; written whole or not at all)")
    b.add_argument("--runner", default="DirectRunner", choices=RUNNERS)
    b.add_argument("--buckets", type=int, help="hash buckets of users / keys per pass: the groups of the shuffles "
                   "(default: one per 65,536 rows of a pass, 4 to 32; features.pipeline.default_buckets)")
    b.add_argument("--passes", type=int, help="passes over disjoint users, each holding only its rows in the "
                   "runner's shuffles (default: one per --rows-per-pass rows)")
    b.add_argument("--rows-per-pass", type=int, default=1_000_000, help="rows per pass when --passes is not given")
    b.add_argument("--formats", default="tfrecord", help="shard formats, comma-separated: tfrecord (what training "
                   "reads), parquet (part-*.parquet beside each TFRecord shard, the same rows: the Beam replay reads "
                   "them ~9x cheaper; +40%% disk, ~1%% more build CPU); e.g. --formats tfrecord,parquet")
    b.add_argument("--state-from", metavar="BUILD", help="a previous build (its state/, features.carry): only the "
                   "log's days after that build's last day are read and written, with the statistics and history "
                   "lists the whole log would give them (the daily build of a warm start)")
    b.set_defaults(func=cmd_features_build, pipeline_args=[])
