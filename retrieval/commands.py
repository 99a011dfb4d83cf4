"""``rankstage retrieval train | evaluate | export``. TensorFlow is imported inside the commands only."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _config(args: argparse.Namespace):
    from features.spec import apply_overrides, read_config_data
    from retrieval.spec import parse_retrieval_config

    return parse_retrieval_config(apply_overrides(read_config_data(args.config), args.set), args.config)


def cmd_train(args: argparse.Namespace) -> None:
    from retrieval.train import train

    run, metrics = train(_config(args), args.out, verbose=2, bootstrap=args.bootstrap)
    print(json.dumps(metrics["test"], indent=2))
    print(f"run written to {run}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    if args.run:
        from retrieval.data import build_data
        from retrieval.evaluate import format_table
        from retrieval.train import evaluate_trained, load_run

        trained = load_run(args.run)
        print(f"split: {trained.config.data.split}")
        print(format_table({args.run: evaluate_trained(trained, build_data(trained.config), args.bootstrap)},
                           with_interval=args.bootstrap > 0))
        return
    from retrieval.ablation import run_ablation

    command = "rankstage retrieval evaluate " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    run_ablation(_config(args), args.out, args.variants, args.bootstrap, args.author_column, command, args.splits)


def cmd_export(args: argparse.Namespace) -> None:
    from retrieval.export import export_run

    print(f"exported {export_run(args.run, args.model_base_path, version=args.version)}")


def register(sub: argparse._SubParsersAction) -> None:
    from retrieval.spec import SPLITS  # pydantic only: no TensorFlow
    group = sub.add_parser("retrieval", help="two-tower retrieval (TFRS): train, evaluate, export the index")
    rsub = group.add_subparsers(dest="retrieval_command", required=True)

    def config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--config", required=required, help="retrieval spec (YAML), e.g. configs/retrieval_ml100k.yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set model.temperature=0.1 (repeatable)")

    p = rsub.add_parser("train", help="train on the config's training window, evaluate on its test split")
    config_args(p)
    p.add_argument("--out", required=True, help="run directory, e.g. runs/retrieval_ml100k")
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for intervals (0: none)")
    p.set_defaults(func=cmd_train)

    p = rsub.add_parser("evaluate", help="evaluate a run (--run), or the ablation with baselines (--config --out)")
    config_args(p, required=False)
    p.add_argument("--run", help="a run directory of `retrieval train`")
    p.add_argument("--out", help="ablation report path without suffix, e.g. reports/retrieval_ml100k")
    p.add_argument("--variants", nargs="+", default=["ids", "features", "history", "logq"],
                   choices=["ids", "features", "history", "logq"])
    p.add_argument("--bootstrap", type=int, default=0)
    p.add_argument("--author-column", help="item column for the most-popular-among-the-user's-authors baseline")
    p.add_argument("--splits", nargs="+", choices=SPLITS,
                   help="protocols to report (default: the config's split, then the other where it applies)")
    p.set_defaults(func=cmd_evaluate)

    p = rsub.add_parser("export", help="export a run: BruteForce + ScaNN top-K SavedModels, embeddings, metadata")
    p.add_argument("--run", required=True)
    p.add_argument("--model-base-path", required=True, help="e.g. models/retrieval")
    p.add_argument("--version", type=int, help="integer version (default: next free)")
    p.set_defaults(func=cmd_export)
