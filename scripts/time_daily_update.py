"""Wall time of one daily update, one after another on the same machine: a warm start on day D from a parent
(the default: all weights, dense weights blended 0.25, biases recentred; the whole update; embeddings only; one
epoch, as ``daily_chain.py`` runs them) and a full retrain
through D (validated on D, refit), each as ``ranking.train.train`` is called by ``daily_chain.py``.

    .venv/bin/python scripts/time_daily_update.py --parent reports/chain_seq/seed0/through_20220430 --day 20220501

Prints seconds per update and each warm start's ratio to the full retrain; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import through_day  # noqa: E402  (scripts/ is on sys.path as the script's directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "kuairand.yaml"))
    ap.add_argument("--parent", required=True, help="a run trained through the day before --day")
    ap.add_argument("--day", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.chdir(ROOT)  # the config's side-table paths are relative to the project root

    from ranking.train import train

    out = Path(tempfile.mkdtemp(prefix="time_daily_update_"))
    through = through_day(args.config, out / "stats", "time_daily_update")

    def config(**training):
        return through(args.seed, args.day, **training)

    updates = {
        "warm start, blended (default)": lambda: train(config(epochs=1), out / "warm_blend", verbose=False,
                                                       warm_start=args.parent, days=[args.day]),
        "warm start, whole update": lambda: train(config(epochs=1, warm_start_blend=1.0), out / "warm_all",
                                                  verbose=False, warm_start=args.parent, days=[args.day]),
        "warm start, embeddings": lambda: train(config(epochs=1, warm_start_update="embeddings"), out / "warm_emb",
                                                verbose=False, warm_start=args.parent, days=[args.day]),
        "full retrain": lambda: train(config(), out / "full", refit=True, verbose=False),
    }
    seconds = {}
    for name, run in updates.items():
        t0 = time.perf_counter()
        run()
        seconds[name] = time.perf_counter() - t0
        print(f"{name}: {seconds[name]:.1f} s", flush=True)
    full = seconds["full retrain"]
    print(json.dumps({**{k: round(v, 1) for k, v in seconds.items()},
                      **{f"{k} / full retrain": round(v / full, 3) for k, v in seconds.items() if k != "full retrain"},
                      "load_average_end": os.getloadavg()[0], "runs": str(out)}))


if __name__ == "__main__":
    main()
