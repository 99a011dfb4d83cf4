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
    from features.spec import ConfigError, load_config

    config = load_config(args.config, args.set, args.tasks)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers: {args.workers} is not a positive number of workers")
    if args.workers is not None and args.workers > 1:
        if os.environ.get("TF_CONFIG"):
            raise ConfigError("--workers: TF_CONFIG is already set (a cluster operator's); run one process per task "
                              "without --workers")
        examples = args.examples
        if examples is None:
            from ranking.train import pipeline_examples

            examples = pipeline_examples(config, Path(args.out), args.data, verbose=True)
            if examples is None:
                raise ConfigError(f"--workers {args.workers}: several workers train from shards; give --examples DIR "
                                  "(features.pipeline is not installed to write them)")
        from ranking.shards import read_layout

        layout = read_layout(examples)  # refused here, before N processes start TensorFlow to refuse it
        files = layout.files(layout.manifest["train_days"])
        if args.workers > len(files):
            raise ConfigError(f"--workers {args.workers}: file-based sharding needs at least one shard file per "
                              f"worker; the training days have {len(files)}")
        argv = _without_option(args.argv, "--workers") + ([] if args.examples else ["--examples", str(examples)])
        raise SystemExit(launch_workers(argv, args.workers))
    from ranking.train import train

    train(config, args.out, log=args.data, refit=args.refit, examples=args.examples,
          checkpoint_every=args.checkpoint_every, shuffle_buffer=args.shuffle_buffer, warm_start=args.warm_start,
          days=args.days)


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held open together so they differ)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launch_workers(argv: list[str], n: int, command: list[str] | None = None) -> int:
    """Run ``rankstage <argv>`` (or ``command + argv``) as ``n`` local worker processes of one
    MultiWorkerMirroredStrategy cluster on loopback ports (``TF_CONFIG`` per worker; worker 0 is the chief, which
    writes the run directory). Their output is forwarded line by line, prefixed ``[worker i]``. When one fails, the
    others are stopped: the exit status is the first failure's (0 when all succeed). Checkpoints let the same
    command resume."""
    import json
    import signal
    import subprocess
    import threading
    import time

    cluster = {"worker": [f"127.0.0.1:{p}" for p in free_loopback_ports(n)]}
    procs = []
    for i in range(n):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})}
        procs.append(subprocess.Popen([*(command or [sys.executable, "-m", "rankstage.cli"]), *argv], env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        print(f"[launcher] worker {i} pid {procs[-1].pid} on {cluster['worker'][i]}", flush=True)

    def forward(i: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(f"[worker {i}] {line}", end="", flush=True)

    threads = [threading.Thread(target=forward, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    status = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed:
                status = failed[0].returncode
                print(f"[launcher] worker {procs.index(failed[0])} exited with {status}; stopping the others",
                      flush=True)
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in threads:
            t.join(5)
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode), 0)
    return status if status >= 0 else 128 - status


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
            ple=not args.no_ple, plain=not args.no_plain)


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
    p.add_argument("--examples", help="a feature pipeline's output directory (TFRecord shards per day, schema, stats, "
                                      "manifest) to train from; default: written by the pipeline under OUT/features, "
                                      "or the log read in memory when the pipeline is not installed")
    p.add_argument("--warm-start", metavar="RUN_OR_VERSION", help="start from this run's (or exported version's) "
                   "weights and vocabularies, grown by new ids; train on the new days only (ranking.warm_start)")
    p.add_argument("--days", type=int, nargs="+", help="with --warm-start: the days to train on (default: the "
                   "log's days after every day the parent has seen, up to data.until)")
    p.add_argument("--workers", type=int, help="train with N local worker processes (MultiWorkerMirroredStrategy on "
                                               "loopback, one shard file per worker at least); a cluster operator "
                                               "sets TF_CONFIG per process instead")
    p.add_argument("--checkpoint-every", type=int, default=200, metavar="STEPS",
                   help="checkpoint every STEPS training steps besides each epoch's end (0: epoch ends only); a "
                        "restarted run resumes from OUT/checkpoints")
    p.add_argument("--shuffle-buffer", type=int, default=65536, metavar="RECORDS",
                   help="shuffle buffer of shard records (rows in memory are shuffled whole)")
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
    p.add_argument("--no-plain", action="store_true", help="without the plain MMoE peer (DeepCTR's MMOE defaults)")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # only commands with pipeline_args (Beam options) take extra flags
    if extra and not hasattr(args, "pipeline_args"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.pipeline_args = extra
    args.argv = argv
    from features.spec import ConfigError

    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as err:
        print(f"rankstage {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
