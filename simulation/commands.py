"""`rankstage simulate` and `rankstage debias-report`: flags map onto function arguments here."""

from __future__ import annotations

import argparse
import dataclasses


def cmd_simulate(args: argparse.Namespace) -> None:
    from simulation.simulator import SimulationConfig, write_simulation

    cfg = SimulationConfig(position_bias=args.position_bias, promotion_boost=args.promotion_boost)
    paths = write_simulation(args.out, cfg, args.rows, args.test_rows or args.rows // 3, args.seed)
    print(f"wrote {paths['train']}, {paths['test']} and {paths['truth']} "
          f"({dataclasses.asdict(cfg)['devices']} devices, {cfg.positions} positions)")


def cmd_debias_report(args: argparse.Namespace) -> None:
    from simulation.debias import debias_report

    debias_report(args.out, args.work, args.rows, args.seed, args.simulated_config, args.obd_config, args.obd,
                  log=lambda line: print(line, flush=True))


def register(sub) -> None:
    p = sub.add_parser("simulate", help="simulate an impression log with planted position bias and utility")
    p.add_argument("--out", default="runs/sim", help="directory for train.csv, test.csv, truth.json")
    p.add_argument("--rows", type=int, default=120_000, help="training impressions (biased logging policy)")
    p.add_argument("--test-rows", type=int, default=None, help="randomized test impressions (default rows / 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--position-bias", type=float, default=1.0, help="strength of the examination decay (0 = none)")
    p.add_argument("--promotion-boost", type=float, default=3.0,
                   help="logging-policy score bonus of promoted items (no effect on attraction)")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("debias-report", help="no debiasing vs position feature vs shallow tower, simulator and OBD")
    p.add_argument("--out", default="reports/debias", help="directory for debias.md, debias.json and the plots")
    p.add_argument("--work", default="runs/debias", help="directory for the simulated log and the training runs")
    p.add_argument("--rows", type=int, default=120_000, help="simulated training impressions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulated-config", default="configs/simulated.yaml")
    p.add_argument("--obd-config", default="configs/obd.yaml")
    p.add_argument("--obd", default="../shared/data/obd", help="Open Bandit Dataset root (read in place)")
    p.set_defaults(func=cmd_debias_report)
