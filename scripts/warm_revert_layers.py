"""Which weights a warm start's update moved to cost it the next day: the warm start judged as trained, then with one
layer group at a time put back to its parent's values (a grown table: its old rows the parent's, its new rows kept).

    .venv/bin/python scripts/warm_revert_layers.py --parent reports/chain_seq/seed0/through_20220430 \
        --warm reports/chain_seq/seed0/warm_20220501 --day 20220502

A group whose revert lifts a figure is where the update cost it. First, the new ids' rows of the grown tables put
back at their start (the mean of the OOV rows), the rest as trained. Prints one line per group (``--all``: every group,
default only those that move click GAUC or AUC by ≥ ``--min-change``); nothing is trained or written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kuairand_days import warm_pair  # noqa: E402  (scripts/ is on sys.path as the script's directory)

SHOWN = [("click", "auc"), ("click", "gauc"), ("like", "auc"), ("long_view", "auc")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", required=True)
    ap.add_argument("--warm", required=True)
    ap.add_argument("--day", type=int, required=True, help="the judged day (after the warm start's days)")
    ap.add_argument("--min-change", type=float, default=0.001)
    ap.add_argument("--all", action="store_true")
    args = ap.parse_args()

    from ranking.warm_start import oov_rows

    parent, warm, before, after, judged = warm_pair(args.parent, args.warm, args.day, "warm_revert_layers")
    groups: dict[str, list] = {}
    for v in warm.models.train.weights:
        groups.setdefault(v.path.split("/")[0], []).append(v)

    def figures() -> dict[str, float]:
        return judged(SHOWN)

    def put(variables: list, source: dict) -> None:
        for v in variables:
            w = source[v.path]
            if w.shape != tuple(v.shape):  # the parent's table before it grew: its rows, the new ones kept
                w = np.concatenate([w, after[v.path][w.shape[0]:]])
            v.assign(w)

    base = figures()
    print(f"warm start as trained, judged on {args.day}: " + ", ".join(f"{k} {x:.4f}" for k, x in base.items()))
    grown = warm.artifacts["lineage"]["grown"]  # path -> (old rows, new rows)
    oov = oov_rows(warm.config)
    for v in warm.models.train.weights:  # the new ids' rows back at their start, the mean of the OOV rows
        if v.path in grown:
            w = after[v.path].copy()
            w[grown[v.path][0]:] = w[:oov[v.path.split("/")[0]]].mean(axis=0)
            v.assign(w)
    got = figures()
    put([v for v in warm.models.train.weights if v.path in grown], after)
    print("new ids' rows at their start: " + ", ".join(f"{k} {got[k] - base[k]:+.4f}" for k in got), flush=True)
    for name, variables in groups.items():
        put(variables, before)
        got = figures()
        put(variables, after)
        change = {k: got[k] - base[k] for k in got}
        if args.all or max(abs(change["click gauc"]), abs(change["click auc"])) >= args.min_change:
            print(f"revert {name}: " + ", ".join(f"{k} {x:+.4f}" for k, x in change.items()), flush=True)


if __name__ == "__main__":
    main()
