"""`rankstage logs import` and `rankstage logs synth`: a log as a day-partitioned directory of Parquet shards
(``features/logfiles.py``, ``features/synth.py``). Flags map onto function arguments here."""

from __future__ import annotations

import argparse


def cmd_import(args: argparse.Namespace) -> None:
    from features.logfiles import import_csv, log_files
    from features.spec import load_config

    config = load_config(args.config, args.set, None)
    files = log_files(args.csv if args.csv else config.data.log)
    done = import_csv(config, files, args.out, overwrite=args.overwrite, part_rows=args.part_rows,
                      block_mb=args.block_mb, append=args.append)
    print(f"wrote {args.out}: {done['rows']:,} rows, {done['days']} days, {done['files']} files "
          f"({done['rows'] / max(done['seconds'], 1e-9):,.0f} rows/s)")


def cmd_synth(args: argparse.Namespace) -> None:
    from features.synth import SynthConfig, write_synthetic

    done = write_synthetic(args.out, SynthConfig(rows=args.rows, days=args.days, seed=args.seed),
                           overwrite=args.overwrite, part_rows=args.part_rows)
    print(f"wrote {args.out}: {done['rows']:,} rows, {done['days']} days, {done['files']} files, "
          f"{done['users']:,} users, {done['items']:,} items ({done['rows'] / max(done['seconds'], 1e-9):,.0f} "
          f"rows/s)")


def register(sub) -> None:
    logs = sub.add_parser("logs", help="the log as a dataset: import CSV into day-partitioned Parquet, synthesize")
    inner = logs.add_subparsers(dest="logs_command", required=True)

    p = inner.add_parser("import", help="CSV files -> DIR/date=YYYYMMDD/part-NNNNN.parquet, checked against a config")
    p.add_argument("--config", required=True, help="the spec whose columns are checked (and whose data.log is read)")
    p.add_argument("--out", required=True, help="the directory to write (refused if it exists, unless --overwrite)")
    p.add_argument("csv", nargs="*", help="CSV files (default: the config's data.log files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the import succeeded")
    p.add_argument("--append", action="store_true",
                   help="add the files' days to an existing --out (a day already there is refused)")
    p.add_argument("--part-rows", type=int, default=1_000_000, help="rows per Parquet file before the next part")
    p.add_argument("--block-mb", type=float, default=16.0, help="CSV block read at a time")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.set_defaults(func=cmd_import)

    p = inner.add_parser("synth", help="a synthetic log with planted affinity, popularity drift and position bias")
    p.add_argument("--rows", type=int, required=True)
    p.add_argument("--days", type=int, required=True)
    p.add_argument("--out", required=True, help="DIR: the log (date=YYYYMMDD/part-*.parquet) and DIR/side/ tables")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--part-rows", type=int, default=1_000_000, help="rows per Parquet file before the next part")
    p.set_defaults(func=cmd_synth)
